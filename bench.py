"""Speed of the data pipeline, training and evaluation, each beside a plain baseline.

    python bench.py                         # CPU: small crops, a minute or two
    python bench.py --device cuda           # GPU: the protocol's 513 crop, batch 16

Prints one table and writes it to JSON (`--json`, default bench.json):
- data: decoded, scaled, cropped samples per second in one process (= per loader worker),
  ours (uint8 tensors through transforms.v2) vs the same augmentation with classic PIL
  operations followed by float conversion;
- train: images/s and peak memory at a crop and batch, ours (every speed option the device
  supports) vs a plain fp32, NCHW, eager model built directly from torchvision;
- eval: images/s at original image sizes, one image at a time;
- the projected wall time of the full protocol (30,000 iterations x 16 images) and the
  fraction of the device's peak arithmetic rate, measured with a large matrix product.
"""
import argparse
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import data
import eval as evaluation
import model as segmodel


def get_args_parser():
    p = argparse.ArgumentParser(description="Benchmark data, training and evaluation.")
    p.add_argument("--data-root", default=None,
                   help="folder holding VOCdevkit/VOC2012 (default: $SHARED_DATA/voc or "
                        "data/voc)")
    p.add_argument("--split", default=None, help="ids to read (default: every available id)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--crop-size", type=int, default=None, help="(default: 513 GPU, 129 CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="(default: 16 GPU, 2 CPU)")
    p.add_argument("--iters", type=int, default=None,
                   help="timed training iterations (default: 30 GPU, 3 CPU)")
    p.add_argument("--data-samples", type=int, default=96, help="samples per data timing")
    p.add_argument("--eval-images", type=int, default=None, help="(default: 50 GPU, 4 CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="also torch.compile ours")
    p.add_argument("--json", default="bench.json", help="write the table here")
    return p


# ----------------------------------------------------------------------------------------
# Data pipeline


class PILAugment:
    """The baseline: the same augmentation with classic PIL operations, then float."""

    def __init__(self, crop_size):
        self.crop = crop_size

    def __call__(self, image_path, label_path, rng):
        image = Image.open(image_path).convert("RGB")
        label = Image.open(label_path)
        ratio = rng.uniform(0.5, 2.0)
        size = (max(1, round(image.width * ratio)), max(1, round(image.height * ratio)))
        image, label = image.resize(size, Image.BILINEAR), label.resize(size, Image.NEAREST)
        w, h = max(size[0], self.crop), max(size[1], self.crop)
        if (w, h) != size:
            padded = Image.new("RGB", (w, h), data.MEAN_PIXEL)
            padded.paste(image)
            plabel = Image.new("L", (w, h), 255)
            plabel.paste(label)
            image, label = padded, plabel
        left, top = rng.randint(0, w - self.crop), rng.randint(0, h - self.crop)
        box = (left, top, left + self.crop, top + self.crop)
        image, label = image.crop(box), label.crop(box)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            label = label.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
        x = torchvision.transforms.functional.normalize(x, [0.485, 0.456, 0.406],
                                                        [0.229, 0.224, 0.225])
        return x, torch.from_numpy(np.array(label, dtype=np.int64))


def bench_data(dataset, crop, samples):
    """(ours, baseline) samples/s in one thread, over the same ids.

    One thread, as in a DataLoader worker (torch gives each worker one thread): with more,
    torch's resize would borrow cores that the other workers need.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _time_data(dataset, crop, samples)
    finally:
        torch.set_num_threads(threads)


def _time_data(dataset, crop, samples):
    ours = data.TrainAugment(crop)
    n = len(dataset)
    t = time.perf_counter()
    for s in range(samples):
        image, label = dataset.load(s % n)
        ours(image, label, torch.Generator().manual_seed(s))
    t_ours = time.perf_counter() - t
    base, rng = PILAugment(crop), random.Random(0)
    t = time.perf_counter()
    for s in range(samples):
        base(dataset.images[s % n], dataset.labels[s % n], rng)
    t_base = time.perf_counter() - t
    return samples / t_ours, samples / t_base


# ----------------------------------------------------------------------------------------
# Training


def plain_torchvision_model(num_classes=21):
    """The baseline network, built directly from torchvision: same layers, fp32, NCHW."""
    trunk = torchvision.models.resnet50(replace_stride_with_dilation=[False, False, True])
    trunk.layer4[0].conv2.dilation, trunk.layer4[0].conv2.padding = (2, 2), (2, 2)
    head = torch.nn.Sequential(
        torch.nn.Conv2d(2048, 256, 3, padding=6, dilation=6, bias=False),
        torch.nn.BatchNorm2d(256), torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(256, 256, 3, padding=6, dilation=6, bias=False),
        torch.nn.BatchNorm2d(256), torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(256, num_classes, 1))
    body = torch.nn.Sequential(*list(trunk.children())[:-2], head)

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body

        def forward(self, x):
            return F.interpolate(self.body(x), size=x.shape[-2:], mode="bilinear",
                                 align_corners=True)
    return Plain()


def bench_train(net, device, crop, batch, iters, amp_dtype=None, channels_last=False):
    """Images/s and peak memory (MiB, CUDA only) of SGD steps on random uint8 batches."""
    net = net.to(device).train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    images = torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 21, (batch, crop, crop), device=device)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

    def step():
        x = data.normalize(images, mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), labels, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2 if device.type == "cpu" else 5):  # warm up (cudnn autotuning, compile)
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return batch * iters / seconds, peak


def train_flops_per_image(crop):
    """Forward + backward FLOPs of one image at crop x crop, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode
    net = segmodel.build_model()
    x = torch.randn(1, 3, crop, crop)
    with FlopCounterMode(display=False) as counter:
        net(x).sum().backward()
    return counter.get_total_flops()


def peak_flops(device, dtype):
    """Measured arithmetic rate (FLOP/s) of a large matrix product on the device."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    best = float("inf")
    for _ in range(3):  # the best of three: a busy machine only ever makes it slower
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 * reps / best


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------
# Evaluation


def bench_eval(dataset, device, n, amp_dtype):
    net = segmodel.build_model().to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    subset = torch.utils.data.Subset(dataset, range(min(n, len(dataset))))
    subset.label_sources = dataset.label_sources
    evaluation.evaluate(net, subset, device, net.input_normalization["mean"],
                        net.input_normalization["std"], amp_dtype, workers=0, progress=False)
    sync(device)
    t = time.perf_counter()
    evaluation.evaluate(net, subset, device, net.input_normalization["mean"],
                        net.input_normalization["std"], amp_dtype, workers=0, progress=False)
    sync(device)
    return len(subset) / (time.perf_counter() - t)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    crop = args.crop_size or (513 if gpu else 129)
    batch = args.batch_size or (16 if gpu else 2)
    iters = args.iters or (30 if gpu else 3)
    eval_images = args.eval_images or (50 if gpu else 4)
    root = args.data_root or os.path.join(os.environ.get("SHARED_DATA", "data"), "voc")
    split = args.split or ("available_aug_train_aug" if os.path.isfile(os.path.join(
        data.voc_dir(root), "ImageSets", "Segmentation", "available_aug_train_aug.txt"))
        else "train_aug")
    try:
        dataset = data.VOCSegmentation(root, split)
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if gpu:
        torch.backends.cudnn.benchmark = True
    amp_dtype = evaluation.amp_dtype_for(device) if gpu else None
    print(f"bench: device {device}, crop {crop}, batch {batch}, {iters} timed iterations, "
          f"{len(dataset)} images from {root} ({split})", flush=True)

    rows = []
    # The data pipeline is cheap to time at the protocol's crop on any device.
    ours, base = bench_data(dataset, 513, args.data_samples)
    rows.append(("data: samples/s per worker", ours, base, "crop 513, scale 0.5-2"))

    net = segmodel.build_model()
    if args.compile:
        net = torch.compile(net)
    ours, ours_mem = bench_train(net, device, crop, batch, iters, amp_dtype, channels_last=gpu)
    base, base_mem = bench_train(plain_torchvision_model(), device, crop, batch, iters)
    options = (f"{'bf16/fp16 autocast, channels_last, cudnn.benchmark' if gpu else 'fp32'}"
               f"{', compile' if args.compile else ''}")
    rows.append(("train: images/s", ours, base, options))
    if gpu:
        rows.append(("train: peak memory MiB", ours_mem, base_mem, f"batch {batch}"))
    train_rate = ours

    rows.append(("eval: images/s (original size)", bench_eval(dataset, device, eval_images,
                                                             amp_dtype), None,
                 f"{eval_images} images, one at a time"))

    flops = train_flops_per_image(crop)
    peak = peak_flops(device, torch.bfloat16 if gpu else torch.float32)
    protocol_hours = 30000 * 16 / train_rate / 3600 * (513 / crop) ** 2
    rows.append(("train: GFLOP per image (fwd+bwd)", flops / 1e9, None, f"crop {crop}"))
    rows.append(("device peak TFLOP/s (matmul)", peak / 1e12, None,
                 "bf16" if gpu else "fp32"))
    rows.append(("fraction of peak achieved", train_rate * flops / peak, None, "ours"))
    rows.append(("protocol wall time, hours", protocol_hours, None,
                 "30k it x 16 images" + ("" if crop == 513 else
                                          f", scaled from crop {crop} by area")))

    print(f"\n{'measure':<36} {'ours':>10} {'baseline':>10}  notes")
    for name, a, b, note in rows:
        fa = "-" if a is None else f"{a:10.3f}"
        fb = "-" if b is None else f"{b:10.3f}"
        print(f"{name:<36} {fa:>10} {fb:>10}  {note}")
    result = {"device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if gpu
                                       else ""),
              "crop": crop, "batch": batch, "torch": str(torch.__version__),
              "rows": [{"measure": r[0], "ours": r[1], "baseline": r[2], "notes": r[3]}
                       for r in rows]}
    evaluation.write_json(args.json, result)
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
