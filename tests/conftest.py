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
