"""Fine-tune a pretrained ResNet-50 on VOC 2012 train_aug under the MoCo protocol.

    torchrun --nproc_per_node=8 train.py --data-root /data/voc --init moco.pth --lr-schedule step
    python train.py --data-root /data/voc --init moco.pth          # one process: a GPU or the CPU

Defaults are the protocol (MoCo paper, appendix): 30k iterations, batch 16 images in total,
SGD lr 0.003 momentum 0.9 weight decay 1e-4 on every parameter, x0.1 at 70% and 90%, 513x513
crops, SyncBN across GPUs. The run folder gets `args.json`, `run.json` (every resolved
setting, versions, the init file's hash), `log.jsonl` (one JSON object per log step and per
evaluation), `checkpoint.pth`, and `eval.json`: the final iteration's val mIoU, which is the
number to report. Evaluations during training are diagnostics, never a "best" to report.
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import eval as evaluation
import model as segmodel
import schedules

PROTOCOL = {"iters": 30000, "batch_size": 16, "crop_size": 513, "lr": 0.003,
            "lr_schedule": "step", "weight_decay": 1e-4, "momentum": 0.9,
            "wd_norm_bias": True, "amp": False, "conv5_dilation": "all",
            "align_corners": True, "train_split": "train_aug", "val_split": "val"}


def get_args_parser():
    p = argparse.ArgumentParser(description="Fine-tune on VOC 2012 under the MoCo protocol; "
                                            "defaults are the protocol.")
    g = p.add_argument_group("data")
    g.add_argument("--data-root", default="data/voc",
                   help="folder holding VOCdevkit/VOC2012 (default: data/voc)")
    g.add_argument("--train-split", default="train_aug", help="(default: train_aug)")
    g.add_argument("--val-split", default="val", help="(default: val)")
    g.add_argument("--crop-size", type=int, default=513, help="square crop, px (default: 513)")
    g.add_argument("--workers", type=int, default=4,
                   help="data loading processes per training process (default: 4)")

    g = p.add_argument_group("model")
    g.add_argument("--init", required=True,
                   help="pretrained backbone: a checkpoint path, 'imagenet' (torchvision "
                        "IMAGENET1K_V1 from the torch.hub cache) or 'random'; required, so "
                        "that no run starts from random weights by accident")
    g.add_argument("--init-pkl-torchvision-style", action=argparse.BooleanOptionalAction,
                   default=False, help="take a detectron2 .pkl without MoCo's converter marks "
                   "as a torchvision-style ResNet-50 (stride in the 3x3 conv, RGB input)")
    g.add_argument("--init-encoder", choices=("default", "momentum"), default="default",
                   help="which encoder of a two-encoder checkpoint (default: the query one)")
    g.add_argument("--conv5-dilation", choices=("all", "torchvision"), default="all",
                   help="'all' dilates every conv5 block (protocol); 'torchvision' leaves the "
                        "first at dilation 1 as replace_stride_with_dilation does")
    g.add_argument("--align-corners", action=argparse.BooleanOptionalAction, default=True,
                   help="bilinear logit upsampling convention (default: on, as DeepLab)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=int, default=30000, help="iterations (default: 30000)")
    g.add_argument("--batch-size", type=int, default=16,
                   help="images per iteration across all processes (default: 16)")
    g.add_argument("--lr", type=float, default=0.003, help="base learning rate (default: 0.003)")
    g.add_argument("--lr-schedule", default="step",
                   help=f"one of {', '.join(schedules.SCHEDULES)} (default: step)")
    g.add_argument("--warmup-iters", type=int, default=0, help="linear warmup (default: 0)")
    g.add_argument("--poly-power", type=float, default=None, help="poly power (default: 0.9)")
    g.add_argument("--exp-final-ratio", type=float, default=None,
                   help="exp schedule's final lr / base lr (default: 1e-2)")
    g.add_argument("--linear-end-ratio", type=float, default=None,
                   help="linear schedule's final lr / base lr (default: 0)")
    g.add_argument("--cosine-floor-ratio", type=float, default=None,
                   help="cosine schedule's final lr / base lr (default: 0)")
    g.add_argument("--match-footprint", choices=("step",), default=None,
                   help="choose the schedule's free parameter so its footprint (area under "
                        "the lr curve) equals the step schedule's (opt-in variant)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="(default: 1e-4)")
    g.add_argument("--wd-norm-bias", action=argparse.BooleanOptionalAction, default=True,
                   help="weight decay on BN parameters and biases too (default: on, as the "
                        "protocol)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")

    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=None,
                   help="run folder (default: runs/<init>-<schedule>-seed<seed>)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from CKPT, or without a value from the run folder's "
                        "checkpoint.pth when there is one")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run folder that holds another run's checkpoint")
    g.add_argument("--save-every", type=int, default=1000,
                   help="checkpoint period, iterations (default: 1000; always at the end)")
    g.add_argument("--eval-every", type=int, default=0,
                   help="diagnostic val evaluation period, iterations (default: 0 = final only)")
    g.add_argument("--log-every", type=int, default=20, help="(default: 20)")
    g.add_argument("--seed", type=int, default=0, help="data order and augmentation (default 0)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="autocast: bf16 where supported, else fp16 with a grad scaler")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for CUDA)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=False,
                   help="deterministic algorithms, no cudnn benchmark (slower)")
    return p


class UsageError(ValueError):
    """A bad flag or run-folder state; the message names it."""


# ----------------------------------------------------------------------------------------
# Setup


def setup_distributed(args):
    """torchrun's environment decides: (rank, world size, device). gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device {args.device}: not a device (cpu, cuda, cuda:N)") \
                from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available here")
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return rank, world, device


def resolve_args(args, world):
    """Validate flags against each other and fill derived values; raises UsageError."""
    if args.crop_size <= 0:
        raise UsageError(f"--crop-size must be positive, got {args.crop_size}")
    for flag, value, low in (("--momentum", args.momentum, 0), ("--weight-decay",
                             args.weight_decay, 0), ("--workers", args.workers, 0),
                             ("--seed", args.seed, 0), ("--save-every", args.save_every, 1),
                             ("--log-every", args.log_every, 1),
                             ("--eval-every", args.eval_every, 0)):
        if not value >= low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if args.iters <= 0:
        raise UsageError(f"--iters must be positive, got {args.iters}")
    if args.batch_size <= 0 or args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} does not divide evenly across "
                         f"{world} processes")
    side = -(-args.crop_size // 16)  # the conv5 feature map's side at output stride 16
    if args.batch_size // world * side * side < 2:
        raise UsageError(f"--crop-size {args.crop_size} with {args.batch_size // world} image "
                         "per process leaves BN one value per channel; use a larger crop")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; choose one")
    if args.lr_schedule not in schedules.SCHEDULES:
        raise UsageError(f"--lr-schedule {args.lr_schedule!r} is unknown; choose one of "
                         f"{', '.join(schedules.SCHEDULES)}")
    options = schedule_options(args)
    try:
        schedules.lr_at(args.lr_schedule, 0, args.iters, args.lr, **options)
    except ValueError as e:
        raise UsageError(str(e)) from None
    args.schedule_options = options
    if args.output_dir is None:
        stem = "random" if args.init == "random" else os.path.basename(args.init).split(".")[0]
        args.output_dir = os.path.join("runs", f"{stem}-{args.lr_schedule}-seed{args.seed}")
    return args


def schedule_options(args):
    """The lr_at options the flags ask for (matched to the step footprint if requested)."""
    explicit = {"poly": ("power", args.poly_power), "exp": ("final_ratio", args.exp_final_ratio),
                "linear": ("end_ratio", args.linear_end_ratio),
                "cosine": ("floor_ratio", args.cosine_floor_ratio)}
    options = {"warmup_iters": args.warmup_iters} if args.warmup_iters else {}
    for schedule, (option, value) in explicit.items():
        if value is not None and schedule != args.lr_schedule:
            flag = schedules.OPTION_FLAGS[option]
            raise UsageError(f"{flag} applies to --lr-schedule {schedule}, not "
                             f"{args.lr_schedule}")
    name, value = explicit.get(args.lr_schedule, (None, None))
    if args.match_footprint:
        if value is not None:
            raise UsageError(f"--match-footprint chooses the {name} option itself; drop the "
                             "explicit value")
        try:
            options.update(schedules.match_footprint(args.lr_schedule, args.iters, args.lr,
                                                     target=args.match_footprint, **options))
        except ValueError as e:
            raise UsageError(f"--match-footprint {args.match_footprint}: {e}") from None
    elif value is not None:
        options[name] = value
    return options


def prepare_run_folder(args, rank):
    """Decide where training starts: returns the checkpoint path to resume from, or None.

    A run folder holding another run's checkpoint is never overwritten silently.
    """
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UsageError(f"--output-dir {args.output_dir}: is a file, not a folder")
    ckpt = os.path.join(args.output_dir, "checkpoint.pth")
    if os.path.exists(ckpt) and not os.path.isfile(ckpt):
        raise UsageError(f"--output-dir {args.output_dir}: checkpoint.pth there is not a file")
    if args.resume == "auto":
        return ckpt if os.path.isfile(ckpt) else None
    if args.resume:
        if not os.path.isfile(args.resume):
            raise UsageError(f"--resume {args.resume}: no such checkpoint")
        if os.path.isfile(ckpt) and not os.path.samefile(ckpt, args.resume):
            raise UsageError(f"--output-dir {args.output_dir} holds another run's checkpoint; "
                             f"resume {args.resume} into its own folder")
        return args.resume
    if os.path.isfile(ckpt) and not args.overwrite:
        raise UsageError(f"--output-dir {args.output_dir} already holds a checkpoint; pass "
                         "--resume to continue it or --overwrite to start afresh")
    return None


def set_aside_earlier_run(folder):
    """A fresh start (--overwrite, or nothing to resume) must not mix its log with an
    earlier run's or leave that run's eval.json looking like its own: rename them. The
    earlier checkpoint stays until this run's first save replaces it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in ("log.jsonl", "eval.json"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            os.replace(path, f"{path}.replaced-{stamp}")


def build_network(args, device, world, rank):
    """The model on its device, with SyncBN across CUDA processes; returns (model, bn_type)."""
    if args.init == "imagenet" and world > 1:
        if rank == 0:  # one download into the torch.hub cache, not one per process
            segmodel.imagenet_file()
        dist.barrier()
    torch.manual_seed(args.seed)  # the head's initialisation
    net = segmodel.build_model(args.init, conv5_dilation=args.conv5_dilation,
                               align_corners=args.align_corners, encoder=args.init_encoder,
                               pkl_torchvision_style=args.init_pkl_torchvision_style,
                               verbose=False)
    if world > 1 and device.type == "cuda":
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        bn_type = "SyncBatchNorm"
    elif world > 1:
        # PyTorch's SyncBatchNorm has no CPU kernel: each CPU process normalises over its
        # own share of the batch, which is not the protocol's batch statistics.
        bn_type = "BatchNorm2d per process (CPU: no SyncBatchNorm)"
    else:
        bn_type = "BatchNorm2d"
    net.to(device)
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    return net, bn_type


def build_optimizer(net, args):
    """SGD; weight decay on every parameter unless --no-wd-norm-bias excludes BN and biases."""
    if args.wd_norm_bias:
        groups = [{"params": [p for p in net.parameters() if p.requires_grad]}]
    else:
        decay = [p for p in net.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in net.parameters() if p.requires_grad and p.ndim <= 1]
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay)


def build_loader(args, rank, world, start_iter, device):
    """The training data: an iteration-indexed stream, disjoint shards per process."""
    train_set = data.VOCSegmentation(args.data_root, args.train_split,
                                     augment=data.TrainAugment(args.crop_size))
    sampler = data.TrainSampler(len(train_set), args.batch_size, rank, world, args.seed,
                                start_iter, args.iters)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=sampler.local_batch, sampler=sampler,
        num_workers=args.workers, pin_memory=device.type == "cuda",
        prefetch_factor=4 if args.workers > 0 else None)
    return train_set, loader


# ----------------------------------------------------------------------------------------
# Checkpoints and faults


def fault(point, iteration):
    """Test hook: TRAIN_FAULT='<point>=<iteration>' triggers a failure there.

    Points: kill-after-iter (SIGKILL after that iteration), kill-mid-save (SIGKILL after the
    temporary checkpoint is written, before the rename), enospc-save (the save fails with
    'no space left'), nan-loss (the loss becomes NaN), raise-rank<R> (an exception on rank
    R only). Lets tests hit every failure path
    deterministically instead of racing a timer.
    """
    spec = os.environ.get("TRAIN_FAULT", "")
    return any(s == f"{point}={iteration}" for s in spec.split(","))


def save_checkpoint(state, path, iteration):
    """Write atomically: temporary file in the same folder, flush, fsync, rename.

    The previous checkpoint stays intact until the rename, so a crash or a full disk during
    the write never destroys the last good state.
    """
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            if fault("enospc-save", iteration):
                raise OSError(28, "No space left on device (TRAIN_FAULT)")
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if fault("kill-mid-save", iteration):
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(e.errno, f"saving {path} at iteration {iteration} failed ({e.strerror}); "
                               "the previous checkpoint is kept") from None


def checkpoint_state(net, optimizer, scaler, iteration, args, manifest):
    """Everything needed to continue exactly; arguments as plain data, never objects."""
    return {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "iteration": iteration, "args": plain_args(args), "config": net.config(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                    else []},
            "run": manifest}


def plain_args(args):
    return {k: v for k, v in vars(args).items()}


# Flags that do not change the result and may differ on resume; every other argument must
# match the checkpoint's, or the resumed run would silently be a different experiment.
RESUME_MAY_CHANGE = {"resume", "overwrite", "workers", "log_every", "save_every", "eval_every",
                     "output_dir"}


def restore(path, net, optimizer, scaler, args):
    """Load a train.py checkpoint into model/optimizer/scaler; returns the next iteration."""
    ckpt = segmodel.read_checkpoint(path)
    if not isinstance(ckpt, dict) or "optimizer" not in ckpt or "iteration" not in ckpt:
        raise segmodel.CheckpointError(f"--resume {path}: not a train.py checkpoint")
    saved = ckpt.get("args", {})
    now = plain_args(args)
    changed = [k for k in sorted(set(saved) | set(now))
               if k not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k)]
    if changed:
        raise UsageError(f"--resume {path}: the checkpoint was trained with other settings "
                         f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed[:4])}); "
                         "resume with the same flags")
    net.load_state_dict(ckpt["model"], strict=True)
    net.input_normalization = dict(ckpt["config"]["input_normalization"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if torch.cuda.is_available() and ckpt["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["iteration"], ckpt.get("run")


# ----------------------------------------------------------------------------------------
# The run manifest


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "") or None
    except (OSError, subprocess.SubprocessError):
        return None


def split_record(dataset):
    ids = "\n".join(dataset.ids).encode()
    return {"name": dataset.split, "ids": len(dataset.ids),
            "ids_sha256": hashlib.sha256(ids).hexdigest(),
            "label_sources": dict(dataset.label_sources)}


def build_manifest(args, net, device, world, bn_type, amp_dtype, train_set, val_ids):
    """Every resolved setting that decides the number, as plain data (run.json)."""
    deviations = [f"{k}={getattr(args, k)!r}" for k, v in PROTOCOL.items()
                  if getattr(args, k) != v]
    if args.schedule_options:
        deviations.append(f"schedule_options={args.schedule_options}")
    if "per process" in bn_type:
        deviations.append("bn=per-process")
    if args.init == "imagenet" and not net.init_report.get("known_release"):
        deviations.append("init=imagenet file is not the published IMAGENET1K_V1")
    return {
        "args": plain_args(args),
        "init": net.init_report,
        "deviations_from_protocol": deviations,
        "git_commit": git_commit(),
        "versions": {"python": platform.python_version(), "torch": str(torch.__version__),
                     "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available()
                     else None},
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})"
                                 if device.type == "cuda" else ""),
        "world_size": world, "batch_per_process": args.batch_size // world,
        "bn": bn_type, "amp_dtype": str(amp_dtype) if amp_dtype else None,
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                 "cudnn": torch.backends.cudnn.allow_tf32},
        "seed": args.seed,
        "input_normalization": net.input_normalization,
        "splits": {"train": split_record(train_set), "val": val_ids},
    }


def setup_lines(args, manifest):
    """The resolved setup, printed once so a user sees the protocol they got."""
    init = manifest["init"]
    lines = [f"run folder   {args.output_dir}",
             f"init         {segmodel.format_report(init)}",
             f"device       {manifest['device']}, world size {manifest['world_size']}, "
             f"{manifest['batch_per_process']} images per process "
             f"({args.batch_size} per iteration)",
             f"BN           {manifest['bn']}",
             f"AMP          {manifest['amp_dtype'] or 'off (float32)'}",
             f"schedule     {args.lr_schedule} lr {args.lr} for {args.iters} iterations "
             f"{args.schedule_options or ''}",
             f"data         {args.train_split} ({manifest['splits']['train']['ids']} ids) "
             f"crop {args.crop_size}, val {args.val_split}",
             "deviations   " + (", ".join(manifest["deviations_from_protocol"]) or "none")]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# One iteration


def train_step(net, images, labels, optimizer, scaler, amp_dtype, world, device, it):
    """Forward, loss, backward, step. Returns (global loss sum, global labelled pixels).

    The loss is normalised by the number of labelled pixels in the *global* batch: each
    process scales its sum by world / global count, and DDP averages gradients over the
    processes, so 8 processes x 2 images give the gradient of 1 x 16 exactly (up to float
    summation order). A per-process mean would weight images by their share of pixels.
    A non-finite loss stops every process before the step, so no weights are spoiled.
    """
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = net(images)
    loss_sum = F.cross_entropy(logits.float(), labels, ignore_index=data.IGNORE_INDEX,
                               reduction="sum")
    if fault("nan-loss", it):
        loss_sum = loss_sum * float("nan")
    totals = torch.stack([loss_sum.detach().double(),
                          (labels != data.IGNORE_INDEX).sum().double()])
    if world > 1:
        dist.all_reduce(totals)  # every process sees the same sums, and stops together
    global_loss, global_count = totals.tolist()
    if not math.isfinite(global_loss):
        raise FloatingPointError(f"non-finite loss at iteration {it}")
    loss = loss_sum * (world / max(global_count, 1.0))
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return global_loss, global_count


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        rank, world, device = setup_distributed(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        return run(args, rank, world, device)
    except (UsageError, data.DataError, segmodel.CheckpointError, OSError,
            FloatingPointError) as e:
        print(f"error{f' (rank {rank})' if world > 1 else ''}: {evaluation.one_line(e)}",
              file=sys.stderr, flush=True)
        return 2
    except BaseException:
        # Shown on every rank, never swallowed: torchrun then reports the failed process.
        print(f"[rank {rank}] " + traceback.format_exc(), file=sys.stderr, flush=True)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, rank, world, device):
    # Setup
    args = resolve_args(args, world)
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop size: autotuning pays off
    amp_dtype = evaluation.amp_dtype_for(device) if args.amp else None
    resume_from = prepare_run_folder(args, rank)
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)

    # Model and optimiser
    net, bn_type = build_network(args, device, world, rank)
    optimizer = build_optimizer(net, args)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    start_iter, manifest = 0, None
    if resume_from:
        start_iter, manifest = restore(resume_from, net, optimizer, scaler, args)
    ddp = net
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(ddp) if args.compile else ddp

    # Data
    train_set, loader = build_loader(args, rank, world, start_iter, device)
    val_set = data.VOCSegmentation(args.data_root, args.val_split)
    shared = sorted(set(train_set.ids) & set(val_set.ids))
    if shared:
        raise data.DataError(f"--train-split {args.train_split} and --val-split "
                             f"{args.val_split} share {len(shared)} ids (e.g. {shared[0]}): "
                             "the val score would be inflated")
    val_record = split_record(val_set)
    if manifest is None:
        manifest = build_manifest(args, net, device, world, bn_type, amp_dtype, train_set,
                                  val_record)
    mean, std = net.input_normalization["mean"], net.input_normalization["std"]
    if rank == 0:
        print(setup_lines(args, manifest), flush=True)
        if resume_from:
            print(f"resume       {resume_from} at iteration {start_iter}", flush=True)
        if resume_from is None:
            set_aside_earlier_run(args.output_dir)
        write_json(os.path.join(args.output_dir, "run.json"), manifest)
        write_json(os.path.join(args.output_dir, "args.json"), plain_args(args))
        log = open(os.path.join(args.output_dir, "log.jsonl"), "a")
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")

    # Training loop
    net.train()
    bar = progress(range(start_iter, args.iters), rank == 0, args.iters, start_iter)
    batches = iter(loader)
    t_last = time.perf_counter()
    meter = new_meter()
    for it in bar:
        lr = schedules.lr_at(args.lr_schedule, it, args.iters, args.lr,
                             **args.schedule_options)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, labels = next(batches)
        t_data = time.perf_counter()
        images = data.normalize(images.to(device, non_blocking=True), mean, std)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True).long()
        try:
            loss_sum, pixels = train_step(forward, images, labels, optimizer, scaler,
                                          amp_dtype, world, device, it)
        except FloatingPointError as e:
            kept = (f"the last good checkpoint {ckpt_path} is kept"
                    if os.path.isfile(ckpt_path) else "no checkpoint was written yet")
            raise FloatingPointError(f"{e}; stopped, {kept}") from None
        t_step = time.perf_counter()
        meter["loss"] += loss_sum
        meter["pixels"] += pixels
        meter["data"] += t_data - t_last
        meter["step"] += t_step - t_data
        meter["n"] += 1
        t_last = t_step
        done = it + 1

        if done % args.log_every == 0 or done == args.iters:
            line = log_line(meter, done, lr, args.batch_size, world, device)
            if rank == 0:
                log.write(json.dumps(line) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{line['loss']:.4f}", lr=f"{lr:.2e}")
            meter = new_meter()
        if fault("kill-after-iter", done):
            os.kill(os.getpid(), signal.SIGKILL)
        if fault(f"raise-rank{rank}", done):
            raise RuntimeError(f"TRAIN_FAULT raise-rank{rank} at iteration {done}")
        if done % args.save_every == 0 or done == args.iters:
            if rank == 0:
                save_checkpoint(checkpoint_state(net, optimizer, scaler, done, args, manifest),
                                ckpt_path, done)
            if world > 1:
                dist.barrier()
        if args.eval_every and done % args.eval_every == 0 and done != args.iters:
            result = evaluation.evaluate_split(net, args.data_root, args.val_split, device,
                                               amp_dtype, args.workers, progress=False)
            if rank == 0:
                log.write(json.dumps({"iter": done, "eval": brief(result)}) + "\n")
                log.flush()
            net.train()

    # Final evaluation: the number this run reports.
    result = evaluation.evaluate_split(net, args.data_root, args.val_split, device, amp_dtype,
                                       args.workers, progress=rank == 0)
    if rank == 0:
        result.update(iteration=args.iters, checkpoint=os.path.abspath(ckpt_path),
                      run=manifest)
        log.write(json.dumps({"iter": args.iters, "eval": brief(result), "final": True}) + "\n")
        log.close()
        write_json(os.path.join(args.output_dir, "eval.json"), result)
        evaluation.print_warnings(result["warnings"])
        print(evaluation.format_table(result), flush=True)
        print(f"final mIoU {100 * result['miou']:.2f} at iteration {args.iters} "
              f"({args.output_dir})", flush=True)
    return 0


def new_meter():
    """Sums over one log step: loss and labelled pixels (global), seconds waiting for data
    and stepping, iterations."""
    return {"loss": 0.0, "pixels": 0, "data": 0.0, "step": 0.0, "n": 0}


def log_line(meter, it, lr, batch_size, world, device):
    """One log step's averages: loss per labelled pixel, data wait vs step time, memory."""
    n = meter["n"]
    step = meter["step"] / n
    line = {"iter": it, "lr": lr, "loss": meter["loss"] / max(meter["pixels"], 1),
            "data_time": meter["data"] / n, "step_time": step,
            "images_per_s": batch_size / max(meter["data"] / n + step, 1e-9),
            "time": time.time()}
    if device.type == "cuda":
        line["max_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return line


def brief(result):
    return {k: result[k] for k in ("split", "miou", "pixel_acc", "images", "per_class_iou")}


def progress(iterable, enabled, total, initial):
    if not enabled:
        return _Quiet(iterable)
    from tqdm import tqdm
    # disable=None: a bar on a terminal only; piped logs get the JSON lines, not \r noise.
    return tqdm(iterable, total=total, initial=initial, desc="train", dynamic_ncols=True,
                file=sys.stderr, disable=None)


class _Quiet:
    """A stand-in for tqdm on ranks other than 0."""

    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **kwargs):
        pass


write_json = evaluation.write_json


if __name__ == "__main__":
    sys.exit(main())
