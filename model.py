"""The MoCo-protocol segmentation network: a dilated ResNet-50 with a small FCN head.

Backbone: torchvision's ResNet-50 convolutional layers (no avgpool, no fc), with all three
conv5 (layer4) blocks dilated by 2 at stride 1, so the output stride is 16. Head: two 3x3
convs of 256 channels with dilation 6, each followed by BN and ReLU, then a 1x1 classifier.
Logits are upsampled bilinearly to the input's size. (He et al., "Momentum Contrast for
Unsupervised Visual Representation Learning", CVPR 2020, appendix A.)

Pretrained backbones load from a checkpoint path with a strict, reported load:

    from model import build_model
    net = build_model(init="moco_v1_200ep_pretrain.pth.tar")   # prints a one-line report
    logits = net(images)            # (N, 21, H, W) at the input's own size

`net.backbone` has exactly torchvision's ResNet-50 key names (without `fc`), so a torchvision
state_dict loads into it without renaming. `net.input_normalization` holds the mean/std (RGB
in [0, 1]) that the loaded weights expect; feed the network `(x - mean) / std`.

This file imports nothing else from the repository: copy it alone into your own code.
"""
import hashlib
import os
import pickle

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

NUM_CLASSES = 21
IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                          "range": "rgb_0_1"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded faithfully; the message names the file and why."""


# ----------------------------------------------------------------------------------------
# The network


class Backbone(torchvision.models.ResNet):
    """torchvision's ResNet-50 trunk at output stride 16; returns the conv5 feature map.

    `conv5_dilation="all"` (the protocol) dilates the 3x3 conv of every conv5 block by 2.
    torchvision's `replace_stride_with_dilation=[False, False, True]` leaves the first conv5
    block's 3x3 conv at dilation 1 (it only removes the stride there); `"torchvision"` keeps
    that variant for comparison with code built on it.
    """

    def __init__(self, conv5_dilation="all"):
        if conv5_dilation not in ("all", "torchvision"):
            raise ValueError(f"conv5_dilation must be 'all' or 'torchvision', "
                             f"got {conv5_dilation!r}")
        super().__init__(torchvision.models.resnet.Bottleneck, [3, 4, 6, 3],
                         replace_stride_with_dilation=[False, False, True])
        if conv5_dilation == "all":
            # The MoCo appendix: "the 3x3 convolutions in conv5 blocks have dilation 2 and
            # stride 1" -- all three blocks, including the first.
            conv = self.layer4[0].conv2
            conv.dilation, conv.padding = (2, 2), (2, 2)
        self.conv5_dilation = conv5_dilation
        # No classifier: the state_dict keys are torchvision's minus fc.* and avgpool has
        # no parameters.
        del self.fc
        del self.avgpool

    def forward(self, x):
        """(N, 3, H, W) float -> (N, 2048, ceil(H/16), ceil(W/16)) conv5 features."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class SegmentationNet(nn.Module):
    """Backbone + FCN head; forward returns (N, num_classes, H, W) logits at input size."""

    def __init__(self, num_classes=NUM_CLASSES, conv5_dilation="all", align_corners=True):
        super().__init__()
        self.backbone = Backbone(conv5_dilation)
        self.head = nn.Sequential(
            nn.Conv2d(2048, 256, 3, padding=6, dilation=6, bias=False),  # BN follows: no bias
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=6, dilation=6, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(256, num_classes, 1)
        # Head initialisation (the paper does not state one): the 3x3 convs use Kaiming
        # normal (fan_out, ReLU gain) as torchvision initialises ResNet convs; BN weight 1,
        # bias 0; the classifier N(0, 0.01) with zero bias so the initial logits are near
        # zero and the first loss is close to ln(21).
        for m in self.head.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)
        self.num_classes = num_classes
        # DeepLab's convention, shared by the public ports of this protocol: corner pixels
        # of the logits align with corner pixels of the image (a 513 crop maps onto a 33x33
        # logit grid exactly). Recorded in checkpoints so train and eval always agree.
        self.align_corners = align_corners
        self.input_normalization = dict(IMAGENET_NORMALIZATION)
        self.init_report = {"layout": "random", "loaded": 0}

    def forward(self, x):
        """(N, 3, H, W) normalised float images -> (N, num_classes, H, W) float logits."""
        logits = self.classifier(self.head(self.backbone(x)))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear",
                             align_corners=self.align_corners)

    def config(self):
        """The constructor settings and input normalization, as plain data for checkpoints."""
        return {"num_classes": self.num_classes,
                "conv5_dilation": self.backbone.conv5_dilation,
                "align_corners": self.align_corners,
                "input_normalization": self.input_normalization}


def build_model(init="random", num_classes=NUM_CLASSES, conv5_dilation="all",
                align_corners=True, encoder="default", verbose=True):
    """Build the network and load `init` into its backbone.

    init: "random", or a path to a pretrained checkpoint (see `load_init`).
    encoder: "default" or "momentum" (which copy to take from a two-encoder checkpoint).
    Prints a one-line load report when `verbose`; the report is also `net.init_report`.
    """
    net = SegmentationNet(num_classes, conv5_dilation, align_corners)
    if init != "random":
        report = load_init(net, init, encoder=encoder)
        if verbose:
            print(format_report(report), flush=True)
    return net


# ----------------------------------------------------------------------------------------
# Loading pretrained weights
#
# The rule: detect the file's layout, map every backbone tensor from it exactly once, with
# the right shape, and fail loudly otherwise. A run that silently starts from random
# weights because a prefix did not match gives a plausible, wrong number.


def sha256_of(path, chunk=1 << 20):
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_checkpoint(path):
    """Read a checkpoint file without running pickled code; returns its top-level object.

    torch.load(weights_only=True) admits tensors and plain containers only. Anything that
    would need arbitrary classes to load is refused rather than executed.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        why = next((ln for ln in first if "Unsupported global" in ln), first[0] if first else "")
        raise CheckpointError(f"{path}: refused to load, the pickle needs code to run "
                              f"({why.strip()})") from None
    except Exception as e:  # zip/pickle format errors carry no file name of their own
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})"
                              ) from None


def _is_tensor_dict(obj):
    return isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values())


# Each layout: a name, where the state_dict sits in the file, and the key prefix of the
# default and momentum encoders. Prefixes are tried on the tensors found; the first layout
# that explains a full ResNet-50 trunk wins.
LAYOUTS = [
    # name, default-encoder prefix, momentum-encoder prefix
    ("moco_v1_v2", "module.encoder_q.", "module.encoder_k."),
    ("moco_v1_v2", "encoder_q.", "encoder_k."),
    ("moco_v3", "module.base_encoder.", "module.momentum_encoder."),
    ("moco_v3", "base_encoder.", "momentum_encoder."),
    ("this_repo", "backbone.", None),
    ("torchvision_ddp", "module.", None),
    ("torchvision", "", None),
]

# Tensors that are expected in a pretrained file but are not part of the trunk; they are
# dropped and counted by group in the report.
DROP_GROUPS = [
    ("momentum encoder", ("encoder_k.", "momentum_encoder.")),
    ("queue", ("queue",)),
    ("heads", ("fc.", "head.", "classifier.", "projector.", "predictor.")),
]


def _unwrap_state_dict(obj, path):
    """Find the dict of tensors in a checkpoint; return (state_dict, container key, extra)."""
    if _is_tensor_dict(obj):
        return obj, None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state", "module"):
            if key in obj and isinstance(obj[key], dict):
                sd = {k: v for k, v in obj[key].items() if torch.is_tensor(v)}
                if sd:
                    return sd, key
        if any(torch.is_tensor(v) for v in obj.values()):
            return {k: v for k, v in obj.items() if torch.is_tensor(v)}, None
    keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{path}: no tensors found where a state_dict is expected "
                          f"(top-level: {keys})")


def _drop_group(key):
    for group, needles in DROP_GROUPS:
        if any(n in key for n in needles):
            return group
    return "other"


def load_init(net, path, encoder="default"):
    """Load a pretrained ResNet-50 trunk from `path` into `net.backbone`, strictly.

    Every backbone weight, bias and BN running statistic must be assigned exactly once with
    the right shape (`num_batches_tracked` may be absent). A checkpoint written by this
    repository's train.py also sets the head when its class count matches. Returns a report
    dict: layout, encoder, tensors loaded, tensors dropped by group, input normalization,
    sha256. Raises CheckpointError naming the file, the layout and the first keys that did
    not fit.
    """
    obj = read_checkpoint(path)
    sd, container = _unwrap_state_dict(obj, path)
    target = net.backbone.state_dict()
    required = [k for k in target if not k.endswith("num_batches_tracked")]

    best = None
    for layout, default_prefix, momentum_prefix in LAYOUTS:
        prefix = momentum_prefix if encoder == "momentum" else default_prefix
        if prefix is None:
            continue
        found = sum(1 for k in required if prefix + k in sd)
        if best is None or found > best[3]:
            best = (layout, prefix, default_prefix, found)
        if found == len(required):
            break
    layout, prefix, default_prefix, found = best
    if encoder == "momentum" and best[1] == best[2]:
        raise CheckpointError(f"{path}: layout {layout!r} has no momentum encoder; "
                              "drop --init-encoder momentum")
    if found == 0:
        raise CheckpointError(f"{path}: not a recognised ResNet-50 checkpoint; "
                              f"first keys: {list(sd)[:6]}")

    missing = [k for k in required if prefix + k not in sd]
    wrong_shape = [f"{prefix + k} {tuple(sd[prefix + k].shape)} != {tuple(target[k].shape)}"
                   for k in required if prefix + k in sd and sd[prefix + k].shape
                   != target[k].shape]
    if missing or wrong_shape:
        raise CheckpointError(
            f"{path}: layout {layout!r} (prefix {prefix!r}) does not fit a ResNet-50 trunk: "
            f"{len(missing)} missing (first: {missing[:3]}), {len(wrong_shape)} wrong shape "
            f"(first: {wrong_shape[:3]})")

    new = {k: sd[prefix + k].to(target[k].dtype) for k in required}
    for k in target:
        if k.endswith("num_batches_tracked"):
            new[k] = sd.get(prefix + k, target[k])
    net.backbone.load_state_dict(new, strict=True)
    used = {prefix + k for k in new if prefix + k in sd}

    head_loaded = False
    if layout == "this_repo":
        head_sd = {k: v for k, v in sd.items() if k.startswith(("head.", "classifier."))}
        own = {k: v for k, v in net.state_dict().items()
               if k.startswith(("head.", "classifier."))}
        if head_sd.keys() == own.keys() and all(head_sd[k].shape == own[k].shape
                                                for k in own):
            net.load_state_dict(head_sd, strict=False)
            used |= set(head_sd)
            head_loaded = True

    dropped = {}
    for k in sd:
        if k not in used:
            group = _drop_group(k)
            dropped[group] = dropped.get(group, 0) + 1
    if isinstance(obj, dict) and "optimizer" in obj:
        dropped["optimizer state"] = 1

    norm = obj.get("input_normalization") if isinstance(obj, dict) else None
    if norm is None and isinstance(obj, dict) and isinstance(obj.get("config"), dict):
        norm = obj["config"].get("input_normalization")
    net.input_normalization = dict(norm) if norm else dict(IMAGENET_NORMALIZATION)
    report = {"file": str(path), "sha256": sha256_of(path), "layout": layout,
              "encoder": "momentum" if encoder == "momentum" else "default",
              "prefix": prefix, "loaded": len(new), "head_loaded": head_loaded,
              "dropped": dropped, "input_normalization": net.input_normalization}
    net.init_report = report
    return report


def format_report(report):
    """One line a person reads: what was loaded from where and what was dropped."""
    if report["layout"] == "random":
        return "init: random (no pretrained weights)"
    dropped = ", ".join(f"{n} {g}" for g, n in sorted(report["dropped"].items())) or "nothing"
    norm = report["input_normalization"]
    return (f"init: {report['file']} layout={report['layout']} encoder={report['encoder']} "
            f"loaded {report['loaded']} backbone tensors"
            f"{' + head' if report['head_loaded'] else ''}; dropped {dropped}; "
            f"input mean={norm['mean']} std={norm['std']}")
