"""PASCAL VOC 2012 segmentation data under the MoCo protocol: dataset, transforms, sampler, setup.

    from data import VOCSegmentation, TrainAugment, normalize
    train = VOCSegmentation("data/voc", "train_aug", augment=TrainAugment(crop_size=513))
    image, label = train[(0, 1234)]         # (index, augmentation seed) -> uint8 (3,H,W), (H,W)
    x = normalize(image[None].cuda(), mean, std)        # float, on the device

`--data-root` is the folder that holds `VOCdevkit/VOC2012/`. A split is the name of a list
file in `VOC2012/ImageSets/Segmentation/`. Labels come from `SegmentationClass/<id>.png`
and, for ids with none there, from `SegmentationClassAug/<id>.png`; both palette ('P') and
grayscale ('L') PNGs hold class indices directly (0..20, 255 = ignore).

Images stay uint8 through augmentation and are normalised as late as possible (on the GPU
when there is one): scaling and cropping uint8 is about twice as fast as float.

    python data.py prepare --data-root data/voc      # download, verify, extract, convert, list
    python data.py prepare --archives ~/Downloads    # archives fetched by hand
    python data.py check --data-root data/voc        # what is there, what is wrong

`prepare` builds train_aug (10,582 ids: VOC train + SBD train + SBD val, minus VOC val) and
needs scipy for SBD's .mat labels; nothing else here does.

This file imports nothing else from the repository: copy it alone into your own code.
"""
import argparse
import hashlib
import http.client
import json
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zlib

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

NUM_CLASSES = 21
IGNORE_INDEX = 255
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")
# The ImageNet mean as uint8 RGB: the fill for padded image pixels, so that padding becomes
# (close to) zero after normalisation, as in DeepLab's training pipeline.
MEAN_PIXEL = (124, 116, 104)
OFFICIAL_VAL_SIZE = 1449


class DataError(ValueError):
    """Bad input data; the message names the file or id and what is wrong."""


def voc_dir(root):
    return os.path.join(root, "VOCdevkit", "VOC2012")


def read_split(root, split):
    """The ids listed in `ImageSets/Segmentation/<split>.txt`, in file order."""
    if not os.path.isdir(voc_dir(root)):
        raise DataError(f"--data-root {root}: no VOCdevkit/VOC2012 folder there")
    path = os.path.join(voc_dir(root), "ImageSets", "Segmentation", f"{split}.txt")
    if not os.path.isfile(path):
        raise DataError(f"split {split!r}: no list file {path}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise DataError(f"split {split!r}: {path} is not a UTF-8 text file") from None
    ids = []
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if len(fields) > 1:  # e.g. DeepLab's "image label" path pairs: not a list of ids
            raise DataError(f"split {split!r}: {path} line {n} holds {len(fields)} fields; "
                            "expected one id per line")
        ids += fields
    if not ids:
        raise DataError(f"split {split!r}: list file {path} is empty")
    if len(set(ids)) != len(ids):
        raise DataError(f"split {split!r}: {path} lists {len(ids) - len(set(ids))} ids twice")
    return ids


def read_image(path):
    """A JPEG as a uint8 tensor (3, H, W), RGB. Raises DataError naming a broken file."""
    try:
        with Image.open(path) as im:
            im.load()  # decode fully here, so a truncated file fails now, with its name
            rgb = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: image file missing") from None
    except Exception as e:
        raise DataError(f"{path}: cannot decode image ({e})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


_VALID = np.zeros(256, dtype=bool)
_VALID[:NUM_CLASSES] = True
_VALID[IGNORE_INDEX] = True


def read_label(path):
    """A label PNG as a uint8 tensor (H, W) of class indices (0..20, 255 = ignore).

    Only palette ('P') and grayscale ('L') modes hold class indices; a label converted to
    RGB holds colours instead, and mapping colours back is a guess, so it is refused.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("P", "L"):
                raise DataError(f"{path}: label is mode {im.mode}, expected P or L (a label "
                                "converted to RGB or another mode has lost its class indices)")
            label = np.array(im)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: label file missing") from None
    except Exception as e:
        raise DataError(f"{path}: cannot decode label ({e})") from None
    bad = ~_VALID[label]
    if bad.any():
        values = sorted(set(np.unique(label[bad]).tolist()))[:5]
        raise DataError(f"{path}: label values {values} outside 0..20 and 255")
    return torch.from_numpy(label)


class TrainAugment:
    """The protocol's training augmentation on uint8 tensors, driven by a given generator.

    Random scale by a ratio in [0.5, 2.0] of the image's own size (image bilinear with
    antialiasing, label nearest), pad bottom/right up to the crop (image with the mean
    pixel, label with 255 so padding is never scored), random crop, horizontal flip with
    p=0.5. Output: image uint8 (3, crop, crop), label uint8 (crop, crop).

    Written on torchvision.transforms.v2's functional ops with tv_tensors (so the label is
    always resized with nearest) rather than v2.RandomResize/RandomCrop because: those draw
    from the global RNG (we need randomness as a function of seed, pass and sample so that
    resume is exact with any number of workers), RandomResize scales to absolute sizes
    instead of a ratio of the image's own size, and RandomCrop's pad_if_needed pads both
    sides by the full shortfall, which shows more padding than the crop needs.
    """

    def __init__(self, crop_size=513, scale_range=(0.5, 2.0), flip=True):
        if crop_size <= 0:
            raise ValueError(f"--crop-size must be positive, got {crop_size}")
        self.crop_size, self.scale_range, self.flip = crop_size, scale_range, flip

    def __call__(self, image, label, generator):
        """image uint8 (3,H,W), label uint8 (H,W), generator torch.Generator -> crops."""
        lo, hi = self.scale_range
        ratio = lo + (hi - lo) * torch.rand((), generator=generator).item()
        h, w = label.shape
        size = [max(1, round(h * ratio)), max(1, round(w * ratio))]
        image = TF.resize(tv_tensors.Image(image), size, InterpolationMode.BILINEAR,
                          antialias=True)
        label = TF.resize(tv_tensors.Mask(label[None]), size, InterpolationMode.NEAREST)

        c = self.crop_size
        pad_h, pad_w = max(c - size[0], 0), max(c - size[1], 0)
        if pad_h or pad_w:
            image = TF.pad(image, [0, 0, pad_w, pad_h], fill=list(MEAN_PIXEL))
            label = TF.pad(label, [0, 0, pad_w, pad_h], fill=IGNORE_INDEX)

        top = int(torch.randint(0, size[0] + pad_h - c + 1, (), generator=generator))
        left = int(torch.randint(0, size[1] + pad_w - c + 1, (), generator=generator))
        image = TF.crop(image, top, left, c, c)
        label = TF.crop(label, top, left, c, c)
        if self.flip and torch.rand((), generator=generator).item() < 0.5:
            image, label = TF.horizontal_flip(image), TF.horizontal_flip(label)
        return image.as_subclass(torch.Tensor), label[0].as_subclass(torch.Tensor)


def normalize(images, mean, std):
    """uint8 (N,3,H,W) RGB in 0..255 -> float32 (x/255 - mean)/std, on images' device."""
    x = TF.to_dtype(images, torch.float32, scale=True)
    return TF.normalize(x, mean=list(mean), std=list(std))


class VOCSegmentation(torch.utils.data.Dataset):
    """One split of VOC 2012 segmentation; every listed id must have an image and a label.

    Without `augment`, `ds[i]` returns (image uint8 (3,H,W), label uint8 (H,W), id) at the
    original size. With `augment`, `ds[(i, seed)]` returns the augmented (image, label),
    with all randomness drawn from a generator seeded by `seed`.
    `label_sources` counts where the labels came from: {"SegmentationClass": n,
    "SegmentationClassAug": m}.
    """

    def __init__(self, root, split, augment=None):
        self.root, self.split, self.augment = root, split, augment
        self.ids = read_split(root, split)
        base = voc_dir(root)
        self.images, self.labels = [], []
        self.label_sources = {"SegmentationClass": 0, "SegmentationClassAug": 0}
        for i in self.ids:
            image = os.path.join(base, "JPEGImages", f"{i}.jpg")
            if not os.path.isfile(image):
                raise DataError(f"split {split!r}: id {i} has no image {image}")
            for folder in ("SegmentationClass", "SegmentationClassAug"):
                label = os.path.join(base, folder, f"{i}.png")
                if os.path.isfile(label):
                    self.label_sources[folder] += 1
                    break
            else:
                raise DataError(f"split {split!r}: id {i} has no label in SegmentationClass/ "
                                "or SegmentationClassAug/")
            self.images.append(image)
            self.labels.append(label)

    def __len__(self):
        return len(self.ids)

    def load(self, index):
        """(image uint8 (3,H,W), label uint8 (H,W)) at original size; sizes must agree."""
        image, label = read_image(self.images[index]), read_label(self.labels[index])
        if image.shape[1:] != label.shape:
            raise DataError(f"id {self.ids[index]}: label {self.labels[index]} is "
                            f"{label.shape[1]}x{label.shape[0]}, image is "
                            f"{image.shape[2]}x{image.shape[1]} (width x height)")
        return image, label

    def __getitem__(self, item):
        if self.augment is None:
            image, label = self.load(item)
            return image, label, self.ids[item]
        index, seed = item
        image, label = self.load(index)
        g = torch.Generator().manual_seed(seed)
        return self.augment(image, label, g)


class TrainSampler(torch.utils.data.Sampler):
    """An endless, reproducible stream of (index, augmentation seed) for one process.

    Global sample position s = it * global_batch + j runs over passes of the data: pass
    p = s // n sees a fresh permutation seeded by (seed, p), and the augmentation seed of a
    sample is a function of (seed, p, index) only. Process `rank` takes positions
    it * global_batch + rank * local_batch + k, k < local_batch: shards are disjoint, the
    stream does not depend on the number of workers, and starting at `start_iter` continues
    a run exactly where it stopped. Runs with the same seed see the same samples with the
    same augmentations whatever their init or schedule, so comparisons are paired.

    torch's DistributedSampler is epoch-based (set_epoch, pads the last batch) and cannot
    restart in the middle of an epoch, which iteration-based resume needs.
    """

    def __init__(self, n, global_batch, rank=0, world_size=1, seed=0, start_iter=0,
                 total_iters=None):
        if global_batch % world_size:
            raise ValueError(f"--batch-size {global_batch} does not divide across "
                             f"{world_size} processes")
        self.n, self.global_batch, self.rank = n, global_batch, rank
        self.local_batch = global_batch // world_size
        self.seed, self.start_iter, self.total_iters = seed, start_iter, total_iters
        self._perm_pass, self._perm = None, None

    def _permutation(self, p):
        if self._perm_pass != p:
            g = torch.Generator().manual_seed(int(np.random.SeedSequence(
                [self.seed, p, 0x5EED]).generate_state(1, np.uint64)[0] >> 1))
            self._perm, self._perm_pass = torch.randperm(self.n, generator=g).tolist(), p
        return self._perm

    def sample(self, s):
        """The (index, augmentation seed) at global stream position s."""
        p, r = divmod(s, self.n)
        index = self._permutation(p)[r]
        aug_seed = int(np.random.SeedSequence([self.seed, p, index]).generate_state(
            1, np.uint64)[0] >> 1)
        return index, aug_seed

    def __iter__(self):
        it = self.start_iter
        while self.total_iters is None or it < self.total_iters:
            first = it * self.global_batch + self.rank * self.local_batch
            for k in range(self.local_batch):
                yield self.sample(first + k)
            it += 1

    def __len__(self):
        if self.total_iters is None:
            raise TypeError("endless sampler has no length")
        return (self.total_iters - self.start_iter) * self.local_batch


# ----------------------------------------------------------------------------------------
# python data.py prepare
#
# train_aug is VOC train + SBD train + SBD val, minus VOC val. SBD (Hariharan et al., ICCV
# 2011) annotated 11,355 VOC 2011 trainval images and split them independently of VOC 2012,
# so SBD's lists hold VOC val ids: a plain union leaks val images into training.
#
# Facts relied on (from torchvision 0.29's datasets/voc.py and datasets/sbd.py, and the
# archives' published layouts):
# - VOCtrainval_11-May-2012.tar holds VOCdevkit/VOC2012/{JPEGImages (17,125 JPEGs),
#   SegmentationClass, ImageSets/Segmentation/{train,val,trainval}.txt, ...}. VOC 2012 kept
#   VOC 2011's classification/detection trainval images, which are the images SBD annotated,
#   so for the real archives every train_aug id already has a JPEG there; SBD's img/ only
#   fills gaps (mirrors or trimmed archives), and the summary says how many it filled.
# - benchmark.tgz holds benchmark_RELEASE/dataset/{img/*.jpg, cls/*.mat, inst/*.mat,
#   train.txt, val.txt}; each cls/<id>.mat holds a struct GTcls whose field Segmentation
#   is the class map (uint8 H x W, 0 = background, 1..20 = VOC classes, no 255 border).

VOC_URL = "https://thor.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
VOC_MD5 = "6cd6e144f989b92b3379bac3b3de84fd"
SBD_URL = ("https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/"
           "semantic_contours/benchmark.tgz")
SBD_MD5 = "82b4d87ceb2ed10f6038a1cba92111cb"
VOC_PREFIX = "VOCdevkit/VOC2012/"
SBD_PREFIX = "benchmark_RELEASE/dataset/"
# Only the real archives (recognised by their md5) must give these numbers; any other pair
# of archives is checked by set arithmetic alone.
OFFICIAL_COUNTS = {"train": 1464, "val": OFFICIAL_VAL_SIZE, "train_aug": 10582,
                   "sbd_only": 9118}
STATE_FILE = "prepare.json"


def _quiet(*args, **kwargs):
    pass


def _progress(progress, **kwargs):
    # progress=None lets tqdm decide: a bar on a terminal, nothing in logs and tests.
    return tqdm(disable=None if progress is None else not progress, **kwargs)


def _set_aside(path, name=None):
    """Rename `path` to a free `<name>.corrupt[-k]` (name defaults to path) and return the
    new name: a bad file is kept for inspection, never deleted."""
    base = f"{name or path}.corrupt"
    aside, k = base, 0
    while os.path.exists(aside):
        k += 1
        aside = f"{base}-{k}"
    os.replace(path, aside)
    return aside


def md5sum(path, progress=None):
    """The md5 hex digest of a file (the checksum VOC's and SBD's archives are known by)."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f, _progress(progress, total=os.path.getsize(path), unit="B",
                                          unit_scale=True, unit_divisor=1024,
                                          desc=f"md5 {os.path.basename(path)}") as bar:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def download(url, part, progress=None, timeout=60):
    """Append the rest of `url` to the file `part`, resuming with an HTTP Range request.

    Raises DataError when the connection fails or ends early; `part` then keeps every byte
    received, so the next call continues from there.
    """
    start = os.path.getsize(part) if os.path.isfile(part) else 0
    headers = {"Range": f"bytes={start}-"} if start else {}
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                      timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # nothing left to send: the part is already complete
            return
        raise DataError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"{url}: cannot connect ({getattr(e, 'reason', e)}); the host may "
                        "be down: fetch the archive by hand and pass --archives, or use a "
                        "mirror (--voc-url/--sbd-url)") from None
    with resp:
        if start and resp.status != 206:
            start = 0  # the server ignored the Range header and sends the whole file
        elif start and not resp.headers.get("Content-Range", "").startswith(
                f"bytes {start}-"):
            raise DataError(f"{url}: the server resumed at another offset than {start} "
                            f"({resp.headers.get('Content-Range')}); delete {part} to "
                            "download from the start")
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        received = start
        try:
            with open(part, "ab" if start else "wb") as f, _progress(
                    progress, total=total, initial=start, unit="B", unit_scale=True,
                    unit_divisor=1024, desc=os.path.basename(part)[:-len(".part")]) as bar:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:
            raise DataError(f"{url}: download interrupted after {received} bytes ({e}); run "
                            f"again to resume from {part}") from None
    # http.client returns a short body without an error when the peer closes early.
    if total is not None and received != total:
        raise DataError(f"{url}: download interrupted after {received} of {total} bytes; "
                        f"run again to resume from {part}")


def fetch(url, path, md5, download_missing=True, redownload=False, progress=None, timeout=60,
          log=_quiet):
    """Make `path` a copy of `url` whose md5 is `md5`, and return `path`.

    A file already at `path` is used when its md5 matches. One that does not match is an
    error, unless `redownload`: then it is renamed to `<path>.corrupt` and fetched again.
    Downloads go to `<path>.part` and are renamed to `path` only once the checksum matches,
    so `path` never holds a partial or unverified file.
    """
    md5 = md5.lower()
    if os.path.isfile(path):
        got = md5sum(path, progress)
        if got == md5:
            return path
        if not redownload:
            raise DataError(f"{path}: md5 {got}, expected {md5} (corrupt, or not this "
                            f"archive); --redownload moves it aside and fetches {url} again")
        log(f"{path}: md5 {got}, expected {md5}; moved aside to {_set_aside(path)}")
    elif os.path.isfile(f"{path}.corrupt") and not redownload:
        raise DataError(f"{path}.corrupt: an earlier download of {url} failed its checksum; "
                        "--redownload fetches it again")
    part = f"{path}.part"
    if not download_missing:
        raise DataError(f"{path}: archive missing; fetch {url} into {os.path.dirname(path)} "
                        "(or allow downloads: drop --no-download)")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    log(f"downloading {url} -> {path}" + (" (resuming)" if os.path.isfile(part) else ""))
    download(url, part, progress, timeout)
    got = md5sum(part, progress)
    if got != md5:
        # A complete download with the wrong bytes: resuming it cannot help, and deleting
        # it would hide the evidence, so it is kept aside and the next run refuses it.
        aside = _set_aside(part, path)
        raise DataError(f"{url}: downloaded file has md5 {got}, expected {md5}; kept as "
                        f"{aside}; --redownload fetches it again")
    os.replace(part, path)
    return path


class _ReadCounter:
    """A file wrapper that reports the bytes read to a progress bar (archive position)."""

    def __init__(self, f, bar):
        self.f, self.bar = f, bar

    def read(self, n=-1):
        data = self.f.read(n)
        self.bar.update(len(data))
        return data


def _archive_files(archive, prefix, progress=None):
    """Yield (tar, member, relative path) for each regular file under `prefix`, in archive
    order, in one sequential pass (the stream mode reads a .tgz without seeking back).

    Member names are checked lexically: no absolute path, no '..', nothing outside
    `prefix`. Links and special files are skipped, never created, so nothing in the archive
    can redirect a write; a symlink the user made inside the data root (a folder on another
    disk) stays usable, which a realpath-based check such as tarfile's data filter refuses.
    """
    with open(archive, "rb") as raw, _progress(progress, total=os.path.getsize(archive),
                                               unit="B", unit_scale=True, unit_divisor=1024,
                                               desc=f"extract {os.path.basename(archive)}"
                                               ) as bar:
        try:
            with tarfile.open(fileobj=_ReadCounter(raw, bar), mode="r|*") as tar:
                for member in tar:
                    # tar run on "./VOCdevkit" writes "./" before every name
                    name = member.name[2:] if member.name.startswith("./") else member.name
                    parts = name.split("/")
                    if name.startswith(("/", "\\")) or ".." in parts or "\\" in name:
                        raise DataError(f"{archive}: unsafe member name {name!r} (absolute "
                                        "or leaving the extraction folder); not extracting")
                    if member.isfile() and name.startswith(prefix):
                        yield tar, member, name[len(prefix):]
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise DataError(f"{archive}: cannot read archive ({e})") from None


def _write_member(tar, member, target, archive):
    """Extract one member to `target` through `<target>.part`: never a half-written file
    under its final name."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    part = f"{target}.part"
    try:
        with tar.extractfile(member) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise DataError(f"{archive}: cannot read {member.name} ({e})") from None
    os.replace(part, target)


def _extract_file(tar, member, target, archive):
    """Extract unless an identical-size file is there; 1 if written, 0 if kept."""
    if os.path.isfile(target):
        if os.path.getsize(target) == member.size:
            return 0  # done by an earlier, interrupted run (or the user): keep it
        raise DataError(f"{target} exists and differs from {member.name} in {archive}; "
                        "move it away and run again")
    _write_member(tar, member, target, archive)
    return 1


def extract_voc(archive, root, progress=None):
    """Extract VOCdevkit/VOC2012/ of the VOC tar into `root`; returns {"files", "written"}."""
    files = written = 0
    for tar, member, rel in _archive_files(archive, VOC_PREFIX, progress):
        written += _extract_file(tar, member, os.path.join(voc_dir(root), *rel.split("/")),
                                 archive)
        files += 1
    if not files:
        raise DataError(f"{archive}: no {VOC_PREFIX} folder inside (not the VOC 2012 "
                        "trainval tar)")
    for split in ("train", "val"):
        if not os.path.isfile(os.path.join(voc_dir(root), "ImageSets", "Segmentation",
                                           f"{split}.txt")):
            raise DataError(f"{archive}: no {VOC_PREFIX}ImageSets/Segmentation/{split}.txt")
    return {"files": files, "written": written}


def sbd_dir(root):
    """Where prepare keeps SBD's lists and cls/*.mat (the archive's own layout)."""
    return os.path.join(root, *SBD_PREFIX.rstrip("/").split("/"))


def extract_sbd(archive, root, progress=None):
    """From SBD's benchmark.tgz, extract train.txt, val.txt and cls/*.mat under
    `root/benchmark_RELEASE/dataset/`, and img/<id>.jpg into VOC2012/JPEGImages for the ids
    VOC's tar has no JPEG for (inst/ and the benchmark code are not needed).
    Returns {"labels": n .mat files, "images": n JPEGs added}."""
    out = {"labels": 0, "images": 0}
    lists = set()
    for tar, member, rel in _archive_files(archive, SBD_PREFIX, progress):
        if rel in ("train.txt", "val.txt"):
            _extract_file(tar, member, os.path.join(sbd_dir(root), rel), archive)
            lists.add(rel)
        elif rel.startswith("cls/") and rel.endswith(".mat") and rel.count("/") == 1:
            _extract_file(tar, member, os.path.join(sbd_dir(root), "cls", rel[4:]), archive)
            out["labels"] += 1
        elif rel.startswith("img/") and rel.endswith(".jpg") and rel.count("/") == 1:
            target = os.path.join(voc_dir(root), "JPEGImages", rel[4:])
            if not os.path.isfile(target):
                _write_member(tar, member, target, archive)
                out["images"] += 1
    missing = {"train.txt", "val.txt"} - lists
    if missing or not out["labels"]:
        what = ", ".join(sorted(missing)) or "cls/*.mat"
        raise DataError(f"{archive}: no {SBD_PREFIX}{what} inside (not SBD's benchmark.tgz)")
    return out


def read_id_list(path):
    """Ids in a list file, one per line (first field), in file order."""
    try:
        with open(path) as f:
            return [line.split()[0] for line in f if line.strip()]
    except OSError as e:
        raise DataError(f"{path}: cannot read id list ({e.strerror})") from None


def build_train_aug(voc_train, voc_val, sbd_train, sbd_val):
    """(train_aug, sbd_only): sorted id lists.

    train_aug = (VOC train | SBD train | SBD val) - VOC val, without duplicates.
    sbd_only = the train_aug ids outside VOC train: the only ids that take an SBD label; an
    id VOC annotated keeps VOC's label, and a VOC val id never gets one from SBD.
    """
    val = set(voc_val)
    sbd = set(sbd_train) | set(sbd_val)
    train_aug = sorted((set(voc_train) | sbd) - val)
    sbd_only = sorted(sbd - set(voc_train) - val)
    return train_aug, sbd_only


def verify_train_aug(voc_train, voc_val, train_aug, sbd_only, official=False):
    """Raise DataError unless the lists add up: train_aug has no duplicates, holds VOC
    train, shares no id with VOC val, and is VOC train plus the SBD-only ids exactly.
    With `official` (the real archives), the counts must also be VOC 2012's and SBD's:
    1,464 train, 1,449 val, 10,582 train_aug, 9,118 SBD-only."""
    train, val, aug = set(voc_train), set(voc_val), set(train_aug)
    problems = []
    if len(aug) != len(train_aug):
        problems.append(f"train_aug lists {len(train_aug) - len(aug)} ids twice")
    if train - aug:
        problems.append(f"{len(train - aug)} VOC train ids missing from train_aug, e.g. "
                        f"{min(train - aug)}")
    if aug & val:
        problems.append(f"{len(aug & val)} VOC val ids in train_aug, e.g. {min(aug & val)}")
    if aug - train != set(sbd_only) or len(aug) != len(train) + len(set(sbd_only)):
        problems.append(f"train_aug ({len(aug)}) is not VOC train ({len(train)}) plus the "
                        f"SBD-only ids ({len(set(sbd_only))})")
    if official:
        counts = {"train": len(voc_train), "val": len(voc_val), "train_aug": len(train_aug),
                  "sbd_only": len(sbd_only)}
        problems += [f"{k} has {counts[k]} ids, expected {n:,} for the real archives"
                     for k, n in OFFICIAL_COUNTS.items() if counts[k] != n]
    if problems:
        raise DataError("train_aug does not add up: " + "; ".join(problems))


def read_sbd_label(path):
    """SBD's class map from a cls/<id>.mat file: uint8 ndarray (H, W) of class indices.

    The file is MATLAB's; the map is the Segmentation field of the struct GTcls.
    """
    try:
        import scipy.io  # only here: nothing else in this file needs scipy
    except ImportError:
        raise DataError("reading SBD's .mat labels needs scipy, which is not installed: "
                        "pip install scipy (only `data.py prepare` uses it)") from None
    try:
        mat = scipy.io.loadmat(path, variable_names=["GTcls"], squeeze_me=True,
                               struct_as_record=False)
    except FileNotFoundError:
        raise DataError(f"{path}: SBD label file missing") from None
    except Exception as e:
        raise DataError(f"{path}: cannot read .mat file ({e})") from None
    try:
        seg = np.asarray(mat["GTcls"].Segmentation)
    except (KeyError, AttributeError):
        raise DataError(f"{path}: no GTcls.Segmentation inside (not an SBD cls/ label)")
    if seg.ndim != 2 or not np.issubdtype(seg.dtype, np.integer):
        raise DataError(f"{path}: GTcls.Segmentation is {seg.dtype} {seg.shape}, expected an "
                        "integer H x W class map")
    if seg.size and (seg.min() < 0 or seg.max() > 255 or (~_VALID[seg.astype(np.uint8)]).any()):
        values = sorted(set(np.unique(seg).tolist()) - set(np.flatnonzero(_VALID).tolist()))
        raise DataError(f"{path}: class values {values[:5]} outside 0..20 and 255")
    return seg.astype(np.uint8)


def voc_palette():
    """VOC's label colour map as a flat list of 768 ints: class c gets the colour whose
    bits interleave c's bits (background black, 1 = (128, 0, 0), 255 = (224, 224, 192))."""
    palette = []
    for c in range(256):
        rgb = [0, 0, 0]
        for bit in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> (3 * bit + ch)) & 1) << (7 - bit)
        palette += rgb
    return palette


def write_label_png(label, path):
    """Save a uint8 (H, W) class map as a palette PNG, atomically.

    Palette ('P') rather than grayscale: it is the format of VOC's own SegmentationClass, so
    a viewer shows the usual class colours, while the pixel values stay the class indices.
    """
    im = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8))
    im.putpalette(voc_palette())  # turns the 'L' image into 'P' without touching values
    part = f"{path}.part"
    im.save(part, format="PNG")
    os.replace(part, path)


def convert_sbd_labels(root, ids, compare_existing=True, progress=None):
    """SBD's cls/<id>.mat -> VOC2012/SegmentationClassAug/<id>.png for `ids` (the SBD-only
    ids). An existing PNG is kept; with `compare_existing` it must hold the same indices.
    Returns the number of PNGs written."""
    out_dir = os.path.join(voc_dir(root), "SegmentationClassAug")
    os.makedirs(out_dir, exist_ok=True)
    written = 0
    for i in _progress(progress, iterable=ids, desc="SBD labels", unit="label"):
        png = os.path.join(out_dir, f"{i}.png")
        if os.path.isfile(png) and not compare_existing:
            continue
        mat = os.path.join(sbd_dir(root), "cls", f"{i}.mat")
        if not os.path.isfile(mat):
            raise DataError(f"id {i}: SBD lists it but has no label {mat}")
        label = read_sbd_label(mat)
        if os.path.isfile(png):
            if not np.array_equal(read_label(png).numpy(), label):
                raise DataError(f"{png}: differs from SBD's {mat}; move it away and run "
                                "again")
            continue
        image = os.path.join(voc_dir(root), "JPEGImages", f"{i}.jpg")
        try:
            with Image.open(image) as im:
                size = (im.height, im.width)  # header only: cheap
        except (OSError, ValueError) as e:
            raise DataError(f"id {i}: cannot open its image {image} ({e})") from None
        if size != label.shape:
            raise DataError(f"{mat}: label is {label.shape[1]}x{label.shape[0]}, image "
                            f"{image} is {size[1]}x{size[0]} (width x height)")
        write_label_png(label, png)
        written += 1
    return written


def _write_text(path, text):
    part = f"{path}.part"
    with open(part, "w") as f:
        f.write(text)
    os.replace(part, path)


def _read_state(root):
    path = os.path.join(root, STATE_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e}); move it away to prepare again") from None


def _save_state(root, state):
    path = os.path.join(root, STATE_FILE)
    text = json.dumps(state, indent=1, sort_keys=True) + "\n"
    if os.path.isfile(path):
        with open(path) as f:
            if f.read() == text:
                return  # a rerun changes nothing, not even a timestamp
    _write_text(path, text)


def _archive_name(url):
    name = os.path.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    if not name:
        raise DataError(f"{url}: the URL names no file")
    return name


def prepare(root, archives=None, voc_url=VOC_URL, voc_md5=VOC_MD5, sbd_url=SBD_URL,
            sbd_md5=SBD_MD5, download=True, redownload=False, progress=None, timeout=60,
            log=_quiet):
    """Download, verify, extract and convert VOC 2012 and SBD into `root`; write train_aug.

    Archives are looked for, and downloaded to, `archives` (default `root/archives`).
    Steps already done (recorded in `root/prepare.json` with the archives' md5) are
    skipped, so a rerun needs neither the archives nor the network. Returns a summary dict.
    """
    voc_md5, sbd_md5 = voc_md5.lower(), sbd_md5.lower()
    official = voc_md5 == VOC_MD5 and sbd_md5 == SBD_MD5
    archives = archives or os.path.join(root, "archives")
    os.makedirs(root, exist_ok=True)
    state = _read_state(root)
    for key, md5 in (("voc", voc_md5), ("sbd", sbd_md5)):
        if key in state and state[key]["md5"] != md5:
            raise DataError(f"--data-root {root} was prepared from a {key.upper()} archive "
                            f"with md5 {state[key]['md5']}, not {md5}; use another --data-root")

    # 1. Archives: both are fetched and verified before any long extraction starts.
    todo = [(k, url, md5) for k, url, md5 in (("voc", voc_url, voc_md5),
                                               ("sbd", sbd_url, sbd_md5)) if k not in state]
    paths = {k: fetch(url, os.path.join(archives, _archive_name(url)), md5, download,
                      redownload, progress, timeout, log) for k, url, md5 in todo}

    # 2. Extraction, each archive recorded as done only once all its files are in place.
    if "voc" in paths:
        log(f"extracting {paths['voc']}")
        state["voc"] = {"md5": voc_md5, **extract_voc(paths["voc"], root, progress)}
        _save_state(root, state)
    if "sbd" in paths:
        log(f"extracting {paths['sbd']}")
        state["sbd"] = {"md5": sbd_md5, **extract_sbd(paths["sbd"], root, progress)}
        _save_state(root, state)

    # 3. The set arithmetic, checked before the long conversion.
    voc_train, voc_val = read_split(root, "train"), read_split(root, "val")
    sbd_train = read_id_list(os.path.join(sbd_dir(root), "train.txt"))
    sbd_val = read_id_list(os.path.join(sbd_dir(root), "val.txt"))
    train_aug, sbd_only = build_train_aug(voc_train, voc_val, sbd_train, sbd_val)
    verify_train_aug(voc_train, voc_val, train_aug, sbd_only, official)

    # 4. SBD labels for the SBD-only ids, then the list.
    converted = convert_sbd_labels(root, sbd_only, "train_aug" not in state, progress)
    list_path = os.path.join(voc_dir(root), "ImageSets", "Segmentation", "train_aug.txt")
    wrote_list = not os.path.isfile(list_path)
    if not wrote_list:
        existing = read_id_list(list_path)
        if sorted(existing) != train_aug:
            raise DataError(f"{list_path} exists and lists other ids ({len(existing)}) than "
                            f"VOC train + SBD - VOC val ({len(train_aug)}); move it away")
    else:
        _write_text(list_path, "".join(f"{i}\n" for i in train_aug))

    # 5. Every listed id has its files; only then is the folder marked as prepared.
    base, from_sbd = voc_dir(root), set(sbd_only)
    for split, ids in (("train_aug", train_aug), ("val", voc_val)):
        for i in ids:
            if not os.path.isfile(os.path.join(base, "JPEGImages", f"{i}.jpg")):
                raise DataError(f"split {split!r}: id {i} has no image in either archive")
            # VOC train and val ids are labelled by VOC itself, the others by SBD.
            folder = "SegmentationClassAug" if i in from_sbd else "SegmentationClass"
            if not os.path.isfile(os.path.join(base, folder, f"{i}.png")):
                raise DataError(f"split {split!r}: id {i} has no label {folder}/{i}.png")
    state["train_aug"] = {"ids": len(train_aug), "sbd_only": len(sbd_only),
                          "official_counts": official}
    _save_state(root, state)
    return {"train": len(voc_train), "val": len(voc_val), "train_aug": len(train_aug),
            "sbd_only": len(sbd_only), "labels_written": converted,
            "images_from_sbd": state["sbd"]["images"], "official": official,
            "changed": bool(paths or converted or wrote_list)}


# ----------------------------------------------------------------------------------------
# python data.py check


def check_split(root, split, progress=None):
    """Scan one split, decoding every image and label.

    Returns {"split", "ids", "images", "labels", "label_modes": {mode: n}, "counts":
    {problem kind: n}, "problems": [one line per id and problem]}.
    """
    ids = read_split(root, split)
    base = voc_dir(root)
    out = {"split": split, "ids": len(ids), "images": 0, "labels": 0, "label_modes": {},
           "counts": {}, "problems": []}

    def problem(text, *kinds):
        for kind in kinds:
            out["counts"][kind] = out["counts"].get(kind, 0) + 1
        out["problems"].append(text)

    for i in _progress(progress, iterable=ids, desc=split, unit="id", leave=False):
        image = os.path.join(base, "JPEGImages", f"{i}.jpg")
        label = next((p for p in (os.path.join(base, d, f"{i}.png")
                                  for d in ("SegmentationClass", "SegmentationClassAug"))
                      if os.path.isfile(p)), None)
        has_image = os.path.isfile(image)
        if not has_image and label is None:  # the usual case in a partial folder: one line
            problem(f"id {i}: image and label missing", "missing images", "missing labels")
            continue
        size = None
        if has_image:
            out["images"] += 1
            try:
                with Image.open(image) as im:
                    im.load()  # a full decode: a truncated JPEG fails here, not in training
                    size = (im.height, im.width)
            except Exception as e:
                problem(f"{image}: cannot decode image ({e})", "undecodable images")
        else:
            problem(f"id {i}: image missing", "missing images")
        if label is None:
            problem(f"id {i}: label missing", "missing labels")
            continue
        out["labels"] += 1
        try:
            with Image.open(label) as im:
                mode = im.mode
                out["label_modes"][mode] = out["label_modes"].get(mode, 0) + 1
                values = np.array(im) if mode in ("P", "L") else None
                palette = im.getpalette() if mode == "P" else None
        except Exception as e:
            problem(f"{label}: cannot decode label ({e})", "undecodable labels")
            continue
        if values is None:
            problem(f"{label}: mode {mode}, expected P or L (a label converted to RGB has "
                    "lost its class indices)", "labels not P/L")
            continue
        bad = ~_VALID[values]
        if bad.any():
            problem(f"{label}: values {np.unique(values[bad]).tolist()[:5]} outside 0..20 "
                    "and 255", "labels with values outside 0..20/255")
        elif palette is not None:
            # An editor that re-quantises a palette PNG renumbers its colours: the indices
            # still look valid but name other classes. VOC's own labels use VOC's palette.
            used = np.unique(values).tolist()
            voc = voc_palette()
            if any(palette[3 * v:3 * v + 3] != voc[3 * v:3 * v + 3] for v in used):
                problem(f"{label}: palette differs from VOC's for the indices used (was it "
                        "re-saved by an editor?); indices may name other classes",
                        "labels with a non-VOC palette")
        if size is not None and values.shape != size:
            problem(f"id {i}: label {values.shape[1]}x{values.shape[0]}, image {size[1]}x"
                    f"{size[0]} (width x height)", "size mismatches")
    return out


def split_overlaps(root, pairs=(("train_aug", "val"), ("train", "val"))):
    """{(a, b): sorted shared ids} for each pair of splits whose list files both exist."""
    seg = os.path.join(voc_dir(root), "ImageSets", "Segmentation")
    out = {}
    for a, b in pairs:
        if all(os.path.isfile(os.path.join(seg, f"{s}.txt")) for s in (a, b)):
            out[(a, b)] = sorted(set(read_split(root, a)) & set(read_split(root, b)))
    return out


# ----------------------------------------------------------------------------------------
# Command line


def _add_data_root(parser):
    parser.add_argument("--data-root", default="data/voc",
                        help="folder holding VOCdevkit/VOC2012 (default: data/voc)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: only on a terminal)")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser(
        "prepare", help="download, verify, extract and convert VOC 2012 + SBD; write "
                        "train_aug.txt",
        description="Prepare VOC 2012 train_aug (10,582 ids) and val (1,449 ids): download "
                    "VOCtrainval_11-May-2012.tar and SBD's benchmark.tgz, check their md5, "
                    "extract into DATA_ROOT/VOCdevkit/VOC2012, convert SBD's labels to "
                    "SegmentationClassAug/*.png and write ImageSets/Segmentation/"
                    "train_aug.txt. Running it again does nothing.")
    _add_data_root(prep)
    src = prep.add_argument_group("archives")
    src.add_argument("--archives", default=None,
                     help="folder where the archives are looked for and downloaded to, e.g. "
                          "~/Downloads for archives fetched by hand (default: "
                          "DATA_ROOT/archives)")
    src.add_argument("--voc-url", default=VOC_URL, help=f"VOC 2012 trainval tar (default: "
                     f"{VOC_URL}; the original host is host.robots.ox.ac.uk)")
    src.add_argument("--voc-md5", default=VOC_MD5, help=f"its md5 (default: {VOC_MD5})")
    src.add_argument("--sbd-url", default=SBD_URL, help=f"SBD benchmark.tgz (default: "
                     f"{SBD_URL})")
    src.add_argument("--sbd-md5", default=SBD_MD5, help=f"its md5 (default: {SBD_MD5})")
    net = prep.add_argument_group("network")
    net.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                     help="download missing archives (default: on); --no-download only "
                          "uses what is in --archives")
    net.add_argument("--redownload", action=argparse.BooleanOptionalAction, default=False,
                     help="an archive failing its checksum is renamed to *.corrupt and "
                          "downloaded again (default: off: it is an error)")
    net.add_argument("--timeout", type=float, default=60,
                     help="seconds without data before a download fails (default: 60)")

    check = sub.add_parser("check", help="report what is there and what is wrong, per split")
    _add_data_root(check)
    check.add_argument("--splits", nargs="+", default=None,
                       help="splits to check (default: every list file in "
                            "ImageSets/Segmentation)")
    return parser


def run_prepare(args):
    official = (args.voc_md5.lower(), args.sbd_md5.lower()) == (VOC_MD5, SBD_MD5)
    counts = ("the real archives': 10,582 train_aug, 1,449 val" if official else
              "not the real archives: checked by set arithmetic only")
    print(f"prepare --data-root {args.data_root} --archives "
          f"{args.archives or os.path.join(args.data_root, 'archives')}\n"
          f"  VOC {args.voc_url} md5 {args.voc_md5}\n"
          f"  SBD {args.sbd_url} md5 {args.sbd_md5}\n  counts: {counts}")
    s = prepare(args.data_root, args.archives, args.voc_url, args.voc_md5, args.sbd_url,
                args.sbd_md5, args.download, args.redownload, args.progress, args.timeout,
                log=print)
    print(f"train {s['train']}  val {s['val']}  train_aug {s['train_aug']} (= train + "
          f"{s['sbd_only']} SBD-only ids, no val id)  SBD labels written "
          f"{s['labels_written']}  JPEGs taken from SBD {s['images_from_sbd']}")
    print("prepared" if s["changed"] else "already prepared: nothing to do")
    return 0


def run_check(args):
    seg = os.path.join(voc_dir(args.data_root), "ImageSets", "Segmentation")
    if not os.path.isdir(seg):
        raise DataError(f"--data-root {args.data_root}: no VOCdevkit/VOC2012/ImageSets/"
                        "Segmentation folder there")
    splits = args.splits or sorted(f[:-4] for f in os.listdir(seg) if f.endswith(".txt"))
    print(f"check --data-root {args.data_root}: {len(splits)} splits")
    failed = False
    for split in splits:
        r = check_split(args.data_root, split, args.progress)
        modes = ", ".join(f"{m} {n}" for m, n in sorted(r["label_modes"].items())) or "-"
        status = ", ".join(f"{n} {k}" for k, n in r["counts"].items()) or "ok"
        print(f"{r['split']:<28} ids {r['ids']:>6}  images {r['images']:>6}  labels "
              f"{r['labels']:>6}  modes [{modes}]  {status}")
        for p in r["problems"][:5]:
            print(f"    {p}")
        if len(r["problems"]) > 5:
            print(f"    ... {len(r['problems']) - 5} more")
        failed |= bool(r["problems"])
    for (a, b), shared in split_overlaps(args.data_root).items():
        print(f"{a} & {b}: " + (f"{len(shared)} shared ids, e.g. {', '.join(shared[:3])}"
                                if shared else "no shared ids"))
        failed |= bool(shared)
    return 1 if failed else 0


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        return run_prepare(args) if args.command == "prepare" else run_check(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
