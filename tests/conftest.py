"""Shared fixtures: where the real test data lives.

The data in ../shared/data (real VOC files, a real TensorFlow SimCLR checkpoint) is read in
place through the SHARED_DATA environment variable that .ci/run sets; nothing is copied into
the repository. A missing folder is an error, never a skip: a skipped data test would count
as a pass that checked nothing.
"""
import os
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _shared_data():
    default = REPO.parent / "shared" / "data"
    root = pathlib.Path(os.environ.get("SHARED_DATA", default)).resolve()
    if not (root / "voc" / "VOCdevkit" / "VOC2012").is_dir():
        raise RuntimeError(f"SHARED_DATA={root} does not hold voc/VOCdevkit/VOC2012; "
                           "set SHARED_DATA to the shared data folder (see .ci/run)")
    return root


@pytest.fixture(scope="session")
def shared_data():
    """The shared data folder (holds voc/ and simclr/)."""
    return _shared_data()


@pytest.fixture(scope="session")
def voc_root(shared_data):
    """The folder that holds VOCdevkit/VOC2012 (read-only in CI)."""
    return shared_data / "voc"


@pytest.fixture(scope="session")
def simclr_dir(shared_data):
    """The TensorFlow SimCLR fixture folder (read-only in CI)."""
    return shared_data / "simclr"


@pytest.fixture(scope="session")
def repo():
    return REPO


@pytest.fixture
def tiny_voc(voc_root, tmp_path):
    """A VOC root in tmp_path sharing the real images and labels (one symlink per file, so a
    test may replace a single file) with its own short split lists: `tiny_train` (4 ids,
    both label folders) and `tiny_val` (1 id), so a full train + final evaluation runs in
    seconds. Split lists are copies, free to edit."""
    root = tmp_path / "voc"
    real = voc_root / "VOCdevkit" / "VOC2012"
    seg = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug"):
        (root / "VOCdevkit" / "VOC2012" / d).mkdir()
        for f in (real / d).iterdir():
            os.symlink(f, root / "VOCdevkit" / "VOC2012" / d / f.name)
    for f in (real / "ImageSets" / "Segmentation").iterdir():
        (seg / f.name).write_text(f.read_text())
    (seg / "tiny_train.txt").write_text(
        "2007_000032\n2007_000129\n2008_000008\n2009_000430\n")
    (seg / "tiny_val.txt").write_text("2007_000033\n")
    return root
