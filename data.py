"""PASCAL VOC 2012 segmentation data under the MoCo protocol: dataset, transforms, sampler.

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

    python data.py check --data-root data/voc        # what is there, what is wrong

This file imports nothing else from the repository: copy it alone into your own code.
"""
import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

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
    with open(path) as f:
        ids = [line.split()[0] for line in f if line.strip()]
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
# python data.py check


def check_split(root, split):
    """Scan one split; returns a dict of counts and a list of problems (strings)."""
    ids = read_split(root, split)
    base = voc_dir(root)
    out = {"split": split, "ids": len(ids), "images": 0, "labels": 0, "label_modes": {},
           "problems": []}
    for i in ids:
        image = os.path.join(base, "JPEGImages", f"{i}.jpg")
        label = next((p for p in (os.path.join(base, d, f"{i}.png")
                                  for d in ("SegmentationClass", "SegmentationClassAug"))
                      if os.path.isfile(p)), None)
        size = None
        if os.path.isfile(image):
            out["images"] += 1
            try:
                size = tuple(read_image(image).shape[1:])
            except DataError as e:
                out["problems"].append(str(e))
        else:
            out["problems"].append(f"id {i}: image missing")
        if label is None:
            out["problems"].append(f"id {i}: label missing")
            continue
        out["labels"] += 1
        try:
            with Image.open(label) as im:
                out["label_modes"][im.mode] = out["label_modes"].get(im.mode, 0) + 1
            lbl = read_label(label)
            if size is not None and tuple(lbl.shape) != size:
                out["problems"].append(f"id {i}: label size {tuple(lbl.shape)} != image "
                                       f"size {size} (height, width)")
        except DataError as e:
            out["problems"].append(str(e))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="report what is there and what is wrong, per split")
    check.add_argument("--data-root", default="data/voc",
                       help="folder holding VOCdevkit/VOC2012 (default: data/voc)")
    check.add_argument("--splits", nargs="+", default=None,
                       help="splits to check (default: every list file in "
                            "ImageSets/Segmentation)")
    args = parser.parse_args(argv)

    try:
        seg = os.path.join(voc_dir(args.data_root), "ImageSets", "Segmentation")
        if not os.path.isdir(seg):
            raise DataError(f"--data-root {args.data_root}: no VOCdevkit/VOC2012/ImageSets/"
                            "Segmentation folder there")
        splits = args.splits or sorted(f[:-4] for f in os.listdir(seg) if f.endswith(".txt"))
        results = [check_split(args.data_root, s) for s in splits]
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = False
    for r in results:
        modes = ", ".join(f"{m} {n}" for m, n in sorted(r["label_modes"].items())) or "-"
        status = "ok" if not r["problems"] else f"{len(r['problems'])} problems"
        print(f"{r['split']:<28} ids {r['ids']:>6}  images {r['images']:>6}  labels "
              f"{r['labels']:>6}  modes [{modes}]  {status}")
        for p in r["problems"][:5]:
            print(f"    {p}")
        if len(r["problems"]) > 5:
            print(f"    ... {len(r['problems']) - 5} more")
        failed |= bool(r["problems"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
