"""Whole-image evaluation on VOC 2012: one confusion matrix over the split, then mIoU.

    python eval.py runs/<name>/checkpoint.pth --data-root data/voc [--json out.json]
    torchrun --nproc_per_node=8 eval.py runs/<name>/checkpoint.pth      # every image once

Each image is scored at its original size against its original label (no crop, no resize),
label 255 ignored. The counts of the whole split go into one 21x21 int64 confusion matrix;
the IoU of each class is computed from it and mIoU is their mean. Averaging IoU per image or
per batch gives a different, wrong number.

The two metric functions work alone when this file is copied into your own code:

    from eval import confusion_matrix, mean_iou
    cm = sum(confusion_matrix(p, t) for p, t in zip(preds, labels))   # int64 (21, 21)
    per_class, miou = mean_iou(cm)
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")
OFFICIAL_VAL_SIZE = 1449


# ----------------------------------------------------------------------------------------
# The metric


def confusion_matrix(pred, target, num_classes=21, ignore_index=255):
    """Count (label, prediction) pairs over labelled pixels.

    pred, target: integer tensors or arrays of the same shape (class indices). Pixels whose
    target is `ignore_index` are skipped. Returns an int64 tensor (num_classes, num_classes)
    on pred's device, rows = label, columns = prediction. Computed in int64 whatever the
    input dtype, so uint8 labels cannot overflow the index.
    """
    pred, target = torch.as_tensor(pred), torch.as_tensor(target, device=torch.as_tensor(
        pred).device)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape "
                         f"{tuple(target.shape)}")
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = target != ignore_index
    target, pred = target[keep], pred[keep]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"label values outside 0..{num_classes - 1} and {ignore_index}")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predicted classes outside 0..{num_classes - 1}")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes ** 2)
    return counts.reshape(num_classes, num_classes)


def mean_iou(confmat):
    """Per-class IoU and their mean from a confusion matrix (rows = label, cols = prediction).

    IoU_c = TP / (TP + FP + FN), as float64 fractions in [0, 1]. A class absent from both the
    labels and the predictions has no IoU (nan) and is left out of the mean. Returns
    (per-class IoU float64 tensor (C,), mIoU float).
    """
    cm = torch.as_tensor(confmat).double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    valid = ~iou.isnan()
    miou = iou[valid].mean().item() if valid.any() else float("nan")
    return iou, miou


def pixel_accuracy(confmat):
    """Fraction of labelled pixels predicted correctly."""
    cm = torch.as_tensor(confmat).double()
    return (cm.diag().sum() / cm.sum()).item() if cm.sum() > 0 else float("nan")


# ----------------------------------------------------------------------------------------
# Inference over a split


@torch.inference_mode()
def evaluate(model, dataset, device, mean, std, amp_dtype=None, workers=2, save_pred=None,
             progress=True):
    """Score every image of `dataset` once (this process's share under torch.distributed).

    Each image runs alone at its original size; predictions are argmax over logits that
    the model upsampled to that size. Returns the int64 (C, C) confusion matrix summed over
    all processes. BN runs in eval mode (running statistics); the model's mode is restored.
    """
    from data import normalize  # the command line needs data.py beside this file
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    indices = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=indices, num_workers=workers,
        pin_memory=device.type == "cuda")
    num_classes = model.num_classes
    confmat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    bar = _progress(loader, rank == 0 and progress, "eval")
    for image, label, image_id in bar:
        x = normalize(image[None].to(device, non_blocking=True), mean, std)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        pred = logits.float().argmax(1)[0]
        confmat += confusion_matrix(pred, label.to(device), num_classes)
        if save_pred:
            save_palette_png(pred.cpu().numpy().astype(np.uint8),
                             os.path.join(save_pred, f"{image_id}.png"))
    model.train(was_training)
    if world > 1:
        dist.all_reduce(confmat)
    return confmat.cpu()


def _progress(iterable, enabled, desc):
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, dynamic_ncols=True, file=sys.stderr, disable=None)


def voc_palette():
    """The VOC colour map: 256 RGB triples, class i coloured by interleaving its bits."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def save_palette_png(pred, path):
    """Write class indices (H, W) uint8 as a palette PNG with the VOC colours."""
    from PIL import Image
    im = Image.fromarray(pred, mode="P")
    im.putpalette(voc_palette())
    im.save(path)


def summarize(confmat, images, class_names=VOC_CLASSES):
    """The evaluation result as plain data (fractions in [0, 1], null for absent classes)."""
    iou, miou = mean_iou(confmat)
    return {"miou": miou,
            "per_class_iou": {n: (None if v != v else v) for n, v in zip(class_names,
                                                                      iou.tolist())},
            "pixel_acc": pixel_accuracy(confmat), "images": images,
            "labelled_pixels": int(confmat.sum()), "confusion_matrix": confmat.tolist()}


def format_table(result):
    """Per-class IoU table and the mIoU, in percent, for a terminal."""
    lines = [f"{'class':<14} {'IoU %':>7}"]
    for name, v in result["per_class_iou"].items():
        lines.append(f"{name:<14} {'n/a' if v is None else f'{100 * v:7.2f}':>7}")
    lines.append(f"{'mIoU':<14} {100 * result['miou']:7.2f}   (pixel acc "
                 f"{100 * result['pixel_acc']:.2f}%, {result['images']} images, "
                 f"{result['labelled_pixels']} labelled pixels)")
    return "\n".join(lines)


def split_warnings(split, dataset):
    """Warnings when the numbers cannot be compared with the official val numbers."""
    out = []
    if split == "val" and len(dataset) != OFFICIAL_VAL_SIZE:
        out.append(f"split 'val' has {len(dataset)} ids, not the official {OFFICIAL_VAL_SIZE}: "
                   "this mIoU is not comparable with published VOC val numbers")
    fallback = dataset.label_sources.get("SegmentationClassAug", 0)
    if fallback:
        out.append(f"{fallback} of {len(dataset)} labels came from SegmentationClassAug, not "
                   "the official SegmentationClass: official numbers use official labels only")
    return out


def evaluate_split(model, data_root, split, device, amp_dtype=None, workers=2, save_pred=None,
                   progress=True):
    """Build the split, evaluate, and return the result dict with label sources and warnings.

    The input normalization is the model's own (`model.input_normalization`), so a
    checkpoint always sees what it was trained on.
    """
    from data import VOCSegmentation, DataError
    dataset = VOCSegmentation(data_root, split)
    if save_pred:
        taken = [i for i in dataset.ids if os.path.exists(os.path.join(save_pred, f"{i}.png"))]
        if taken:
            raise DataError(f"--save-pred {save_pred}: already holds {len(taken)} of the "
                            f"split's PNGs (e.g. {taken[0]}.png); choose an empty folder")
    norm = model.input_normalization
    confmat = evaluate(model, dataset, device, norm["mean"], norm["std"], amp_dtype, workers,
                       save_pred, progress)
    if confmat.sum() == 0:
        raise DataError(f"split {split!r}: no labelled pixels (every label is 255): "
                        "there is nothing to score")
    result = summarize(confmat, len(dataset))
    result.update(split=split, label_sources=dict(dataset.label_sources),
                  warnings=split_warnings(split, dataset))
    return result


# ----------------------------------------------------------------------------------------
# Command line


def load_checkpoint_model(path):
    """A model from a train.py checkpoint or a bare state_dict of this repository's model."""
    from model import SegmentationNet, read_checkpoint, CheckpointError
    obj = read_checkpoint(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        sd, config = obj["model"], obj.get("config", {})
    elif isinstance(obj, dict) and any(str(k).startswith("backbone.") for k in obj):
        sd, config = obj, {}
    else:
        keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: not a checkpoint of this repository's model "
                              f"(top-level: {keys})")
    if "classifier.weight" not in sd:
        raise CheckpointError(f"{path}: no classifier.weight; not a segmentation checkpoint")
    num_classes = sd["classifier.weight"].shape[0]
    if num_classes != len(VOC_CLASSES):
        raise CheckpointError(f"{path}: the classifier has {num_classes} classes; VOC "
                              f"segmentation has {len(VOC_CLASSES)}")
    try:
        net = SegmentationNet(num_classes, config.get("conv5_dilation", "all"),
                              config.get("align_corners", True))
    except ValueError as e:
        raise CheckpointError(f"{path}: bad model config ({e})") from None
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: state_dict does not fit the model: "
                              f"{str(e).splitlines()[1].strip()}") from None
    if config.get("input_normalization"):
        net.input_normalization = dict(config["input_normalization"])
    return net, obj


def get_args_parser():
    p = argparse.ArgumentParser(description="Evaluate a checkpoint on a VOC split: mIoU over "
                                            "one confusion matrix, images at original size.")
    p.add_argument("checkpoint", help="checkpoint.pth written by train.py, or a state_dict")
    p.add_argument("--data-root", default="data/voc",
                   help="folder holding VOCdevkit/VOC2012 (default: data/voc)")
    p.add_argument("--split", default="val", help="split list name (default: val)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (default: auto)")
    p.add_argument("--workers", type=int, default=2, help="data loading workers (default: 2)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="autocast inference (default: what the run trained with)")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON")
    p.add_argument("--save-pred", metavar="DIR", help="write predictions as VOC palette PNGs")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        device = torch.device(args.device if args.device != "auto" else
                              ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        print(f"error: --device {args.device}: not a device (cpu, cuda, cuda:N)",
              file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device}: CUDA is not available here", file=sys.stderr)
        return 2
    if distributed:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0
    from data import DataError
    from model import CheckpointError
    try:
        check_outputs(args)
        model, ckpt = load_checkpoint_model(args.checkpoint)
        run_args = ckpt.get("args", {}) if isinstance(ckpt, dict) else {}
        amp = args.amp if args.amp is not None else bool(run_args.get("amp", False))
        amp_dtype = amp_dtype_for(device) if amp else None
        if rank == 0:
            print(f"eval: {args.checkpoint} on {args.split} ({args.data_root}), device {device}"
                  f", amp {amp_dtype}, align_corners {model.align_corners}, input mean "
                  f"{model.input_normalization['mean']} std {model.input_normalization['std']}",
                  flush=True)
        model.to(device)
        if args.save_pred and rank == 0:
            os.makedirs(args.save_pred, exist_ok=True)
        if distributed and args.save_pred:
            dist.barrier()
        t0 = time.time()
        result = evaluate_split(model, args.data_root, args.split, device, amp_dtype,
                                args.workers, args.save_pred)
    except (DataError, CheckpointError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    result["checkpoint"] = os.path.abspath(args.checkpoint)
    result["seconds"] = round(time.time() - t0, 2)
    if isinstance(ckpt, dict):
        result["iteration"] = ckpt.get("iteration")
        result["run"] = ckpt.get("run")
    if rank == 0:
        print_warnings(result["warnings"])
        print(format_table(result), flush=True)
        if args.json:
            write_json(args.json, result)
    if distributed:
        dist.destroy_process_group()
    return 0


def check_outputs(args):
    """Refuse, before any work, outputs that cannot be written or would destroy an input."""
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.json:
        if os.path.isdir(args.json):
            raise ValueError(f"--json {args.json}: is a folder; give a file name")
        if os.path.exists(args.json) and os.path.samefile(args.json, args.checkpoint):
            raise ValueError(f"--json {args.json}: is the checkpoint being evaluated")
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"--json {args.json}: {folder} is not a folder")
    if args.save_pred:
        if os.path.exists(args.save_pred) and not os.path.isdir(args.save_pred):
            raise ValueError(f"--save-pred {args.save_pred}: is a file, not a folder")
        voc = os.path.abspath(os.path.join(args.data_root, "VOCdevkit"))
        if os.path.abspath(args.save_pred).startswith(voc + os.sep):
            raise ValueError(f"--save-pred {args.save_pred}: inside the data root's VOCdevkit;"
                             " predictions must never be written among the labels")


def one_line(error):
    """An error's message on one line. A DataLoader worker's re-raised error carries the
    worker's traceback in its text; its last line is the original message."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def print_warnings(lines):
    """Print each warning on stderr where a person cannot miss it."""
    for w in lines:
        print(f"{'!' * 80}\nWARNING: {w}\n{'!' * 80}", file=sys.stderr, flush=True)


def amp_dtype_for(device):
    """bf16 where the device supports it, else fp16 (CUDA) -- the CPU autocasts to bf16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def write_json(path, obj):
    """Write JSON atomically: a temporary file in the same folder, then rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
