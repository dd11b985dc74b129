"""The MoCo-protocol segmentation network: a dilated ResNet-50 with a small FCN head.

Backbone: torchvision's ResNet-50 convolutional layers (no avgpool, no fc), with all three
conv5 (layer4) blocks dilated by 2 at stride 1, so the output stride is 16. Head: two 3x3
convs of 256 channels with dilation 6, each followed by BN and ReLU, then a 1x1 classifier.
Logits are upsampled bilinearly to the input's size. (He et al., "Momentum Contrast for
Unsupervised Visual Representation Learning", CVPR 2020, appendix A.)

Pretrained backbones load with a strict, reported load:

    from model import build_model
    net = build_model(init="moco_v1_200ep_pretrain.pth.tar")   # prints a one-line report
    logits = net(images)            # (N, 21, H, W) at the input's own size

`init` is "random", "imagenet" (torchvision's ResNet50_Weights.IMAGENET1K_V1, the supervised
baseline; read from the torch.hub cache, downloaded when missing), or a file in one of these
layouts (the report's "layout"; "momentum" is what `encoder="momentum"` takes instead):

    layout            where the trunk is                    dropped          momentum copy
    moco_v1_v2        state_dict: [module.]encoder_q.       fc/MLP, queue    encoder_k
    moco_v3           state_dict: [module.]base_encoder.    projector, pred. momentum_encoder
    swav              module. (SwAV, DeepCluster-v2, SeLa-v2) projection_head, prototypes
    torchvision_ddp   module. + torchvision names           fc
    torchvision       torchvision names, bare or in state_dict/model (supervised, BYOL or
                      DenseCL converted to torchvision keys, ...)
    mmselfsup_mmseg   state_dict: backbone.                 neck, head,      momentum_encoder,
                                                            decode_head      target_net, encoder_k
    vissl             classy_state_dict ... trunk._feature_blocks.  heads    loss.moco_encoder
    detectron2_pkl    .pkl from MoCo's (or detectron2's torchvision) converter: stem.conv1,
                      res2..res5, shortcut, convN.norm; numpy arrays
    simclr_converted  convert_simclr.py's output, with the input normalization it records
    this_repo         a checkpoint of this model: backbone always, head if the classes match

Every backbone weight, bias and BN running statistic is assigned exactly once with the right
shape, or loading fails naming the file, the layout and the first keys that did not fit. No
pickled code runs: torch files load with `weights_only=True`; metadata classes (mmengine's
history buffers, ...) become inert placeholders and are dropped; a .pkl goes through a
restricted unpickler that builds only numpy arrays and plain containers.

`net.backbone` has exactly torchvision's ResNet-50 key names (without `fc`), so a torchvision
state_dict loads into it without renaming. `net.input_normalization` holds the mean/std (RGB
in [0, 1]) that the loaded weights expect; feed the network `(x - mean) / std`.

This file imports nothing else from the repository: copy it alone into your own code.
"""
import codecs
import collections
import hashlib
import math
import os
import pickle
import re
import urllib.parse
import warnings
import zipfile

import numpy as np
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
        self.init_report = random_report()

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
                align_corners=True, encoder="default", pkl_torchvision_style=False,
                verbose=True):
    """Build the network and load `init` into its backbone.

    init: "random", "imagenet" or a checkpoint path (see `load_init`; a file of either name
    is "./random", "./imagenet").
    encoder: "default" or "momentum" (which copy to take from a two-encoder checkpoint).
    pkl_torchvision_style: accept a detectron2 .pkl without MoCo's converter marks (see
    `load_init`).
    Prints a one-line load report when `verbose`; the report is also `net.init_report`.
    """
    net = SegmentationNet(num_classes, conv5_dilation, align_corners)
    if init != "random":
        report = load_init(net, init, encoder=encoder,
                           pkl_torchvision_style=pkl_torchvision_style)
        if verbose:
            print(format_report(report), flush=True)
    return net

# ----------------------------------------------------------------------------------------
# Loading pretrained weights
#
# The rule: detect the file's layout, map every backbone tensor from it exactly once, with
# the right shape, and fail loudly otherwise. A run that silently starts from random
# weights because a prefix did not match gives a plausible, wrong number.

# Published checksums of public ResNet-50 releases, so that run.json can say which release a
# number came from. MoCo: the "md5" column of the Models table in the README of
# github.com/facebookresearch/moco (first 8 hex digits of each file's md5). torchvision: the
# sha256 prefix that torch.hub puts in the file name of ResNet50_Weights.IMAGENET1K_V1
# (resnet50-0676ba61.pth) and checks on download.
KNOWN_RELEASES = [
    # name, hash, published hex prefix
    ("MoCo v1 200ep (moco_v1_200ep_pretrain.pth.tar)", "md5", "b251726a"),
    ("MoCo v2 200ep (moco_v2_200ep_pretrain.pth.tar)", "md5", "59fd9945"),
    ("MoCo v2 800ep (moco_v2_800ep_pretrain.pth.tar)", "md5", "a04e12f8"),
    ("torchvision IMAGENET1K_V1", "sha256", "0676ba61"),
]
IMAGENET_RELEASE = "torchvision IMAGENET1K_V1"

# A layout: where the state_dict sits in the file ("containers", as prefixes of the flattened
# key: {"state_dict": {"conv1.weight": t}} holds "state_dict.conv1.weight"), the key prefix
# of the default encoder and of its momentum/teacher/EMA copies within, the names of the two
# for the report, an extra test the file must pass (`marks`), and the renaming from
# torchvision's names to the file's. Layouts are tried in order; the first whose default
# encoder holds the whole trunk (and whose marks hold) wins.
Layout = collections.namedtuple("Layout", "name containers default momentum encoders marks "
                                          "rename", defaults=(None, None))
STATE = ("state_dict.", "model.", "")  # where codebases put the model's state_dict


def _has_own_head(obj, tensors, c):
    # train.py's checkpoints and bare SegmentationNet state_dicts; mmseg files also use
    # backbone. but name their head decode_head.
    return c + "classifier.weight" in tensors and c + "head.0.weight" in tensors


def _has_swav_heads(obj, tensors, c):
    return any(k.startswith((c + "module.prototypes", c + "module.projection_head"))
               for k in tensors)


def _from_convert_simclr(obj, tensors, c):
    record = obj.get("conversion") if isinstance(obj, dict) else None
    return isinstance(record, dict) and record.get("converter") == "convert_simclr.py"


def _detectron2_name(key):
    """torchvision ResNet name -> detectron2's, as MoCo's convert-pretrain-to-detectron2.py
    renames them: conv1/bn1 -> stem.conv1[.norm], layerN -> res(N+1), bnK -> convK.norm,
    downsample.0/1 -> shortcut[.norm]."""
    key = re.sub(r"^(conv1|bn1)\.", r"stem.\1.", key)
    key = re.sub(r"^layer(\d)", lambda m: f"res{int(m[1]) + 1}", key)
    key = re.sub(r"\bbn(\d)\.", r"conv\1.norm.", key)
    return key.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")


LAYOUTS = [
    Layout("this_repo", ("model.", ""), "backbone.", (), ("backbone", None), _has_own_head),
    Layout("moco_v1_v2", STATE, "module.encoder_q.", ("module.encoder_k.",),
           ("query encoder", "key (momentum) encoder")),
    Layout("moco_v1_v2", STATE, "encoder_q.", ("encoder_k.",),
           ("query encoder", "key (momentum) encoder")),
    Layout("moco_v3", STATE, "module.base_encoder.", ("module.momentum_encoder.",),
           ("base encoder", "momentum encoder")),
    Layout("moco_v3", STATE, "base_encoder.", ("momentum_encoder.",),
           ("base encoder", "momentum encoder")),
    # mmselfsup 1.x keeps the momentum copy in an mmengine EMA wrapper (.module) around
    # Sequential(backbone, neck); 0.x in the Sequentials encoder_k (MoCo) or target_net (BYOL).
    Layout("mmselfsup_mmseg", STATE, "backbone.",
           ("momentum_encoder.module.0.", "target_net.module.0.", "encoder_k.0.",
            "target_net.0."), ("backbone (online/query network)", "momentum/target network")),
    # VISSL's MoCo keeps its key encoder in the loss's state.
    Layout("vissl", ("classy_state_dict.",), "base_model.model.trunk._feature_blocks.",
           ("loss.moco_encoder.trunk._feature_blocks.",), ("trunk", "MoCo key encoder")),
    Layout("simclr_converted", ("state_dict.",), "", (), ("network as converted", None),
           _from_convert_simclr),
    Layout("swav", STATE, "module.", (), ("network", None), _has_swav_heads),
    Layout("torchvision_ddp", STATE, "module.", (), ("network", None)),
    Layout("torchvision", STATE, "", (), ("network", None)),
    # Only for plain pickles, after _check_pickle has ruled out Caffe2 files.
    Layout("detectron2_pkl", ("model.",), "", (), ("network as converted", None), None,
           _detectron2_name),
]

# Tensors a pretrained file holds besides the trunk, grouped for the report by the parts of
# their flattened key; the first rule that matches wins (see _drop_group).
OPTIMIZER_KEYS = {"optimizer", "optimizer_state", "optim", "scaler", "amp", "lr_scheduler",
                  "scheduler", "param_schedulers"}
METADATA_KEYS = {"meta", "message_hub", "rng", "args", "run", "conversion", "config"}
MOMENTUM_NAMES = {"encoder_k", "momentum_encoder", "target_net", "target_encoder",
                  "moco_encoder", "teacher", "ema", "model_ema", "ema_state_dict"}
HEAD_NAMES = {"fc", "head", "heads", "classifier", "projector", "predictor", "neck",
              "projection_head", "prototypes", "decode_head", "auxiliary_head"}


def _drop_group(key, skipped_encoder=None):
    """The report's group of an unused tensor; `skipped_encoder` is the default encoder's
    prefix when the momentum copy was taken instead."""
    parts = key.split(".")
    if skipped_encoder and key.startswith(skipped_encoder):
        return "default encoder"
    if parts[0] in OPTIMIZER_KEYS:
        return "optimizer state"
    if parts[0] in METADATA_KEYS:
        return "metadata"
    if any(p.startswith("queue") for p in parts):
        return "queue"
    if not skipped_encoder and MOMENTUM_NAMES.intersection(parts):
        return "momentum encoder"  # all of it, its own head included
    if HEAD_NAMES.intersection(parts):
        return "heads"
    if MOMENTUM_NAMES.intersection(parts):
        return "momentum encoder"
    return "other"


# ----------------------------------------------------------------------------------------
# Reading files without running pickled code

# Modules whose functions run code or touch the system. A checkpoint that names one is
# hostile or broken and is refused. Any other class it names (mmengine's HistoryBuffer,
# argparse.Namespace, ...) is metadata: it becomes an inert placeholder, never imported.
CODE_MODULES = frozenset({
    "builtins", "__builtin__", "os", "posix", "nt", "posixpath", "ntpath", "sys", "subprocess",
    "shutil", "socket", "importlib", "runpy", "pickle", "_pickle", "marshal", "types", "code",
    "codeop", "ctypes", "pty", "webbrowser", "platform", "signal", "multiprocessing",
    "threading", "_thread", "asyncio", "functools", "_functools", "operator", "_operator",
    "io", "_io", "pathlib", "tempfile", "glob", "shelve", "dill", "cloudpickle", "timeit",
    "pdb", "bdb", "trace", "inspect", "gc", "urllib", "http", "requests", "yaml", "zipimport",
    "pkgutil", "site", "sysconfig", "distutils", "setuptools", "pip", "commands", "popen2"})
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a pre-1.6 torch.save file


class _Refused(pickle.UnpicklingError):
    def __init__(self, name):
        super().__init__(name)
        self.name = name


class _Ignored:
    """Stands in for a class a checkpoint names but loading does not need; keeps nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass

    def __setitem__(self, key, value):
        pass


_DATA_GLOBALS = {}


def _data_globals():
    """The globals that plain data needs, as the real objects: numpy arrays, scalars and
    dtypes (under numpy 1.x and 2.x module names), bytes under pickle protocol 2, and a few
    containers. None of them runs code."""
    if _DATA_GLOBALS:
        return _DATA_GLOBALS
    array = np.zeros(1)
    reconstruct, frombuffer = array.__reduce__()[0], array.__reduce_ex__(5)[0]
    scalar = np.float64(0).__reduce__()[0]
    names = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype,
             "_codecs.encode": codecs.encode, "collections.OrderedDict": collections.OrderedDict}
    for core in ("numpy.core", "numpy._core"):
        names.update({f"{core}.multiarray._reconstruct": reconstruct,
                      f"{core}.multiarray.scalar": scalar,
                      f"{core}.numeric._frombuffer": frombuffer})
    for b in ("builtins", "__builtin__"):
        names.update({f"{b}.set": set, f"{b}.frozenset": frozenset,
                      f"{b}.bytearray": bytearray, f"{b}.complex": complex,
                      f"{b}.slice": slice})
    _DATA_GLOBALS.update(names)
    return _DATA_GLOBALS


def _admit(module, name, ignored):
    """What a pickle's reference to module.name resolves to: real data globals, a refusal
    for code, an inert placeholder (recorded in `ignored`) for anything else."""
    full = f"{module}.{name}"
    real = _data_globals().get(full)
    if real is not None:
        return real
    if module.split(".")[0] in CODE_MODULES:
        raise _Refused(full)
    ignored.add(full)
    return type(name.rsplit(".", 1)[-1], (_Ignored,), {"checkpoint_name": full})


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f, ignored):
        super().__init__(f, encoding="latin1")  # Python 2 pickles (the Caffe2 era) hold str
        self.ignored = ignored

    def find_class(self, module, name):
        return _admit(module, name, self.ignored)


def _numpy_dtype_classes():
    # numpy 2 dtypes are instances of per-type classes; torch's weights-only unpickler only
    # sets state on instances of admitted classes.
    classes = {type(np.dtype(c)) for c in np.typecodes["All"]}
    return [(c, f"{c.__module__}.{c.__qualname__}") for c in classes]


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_torch(path, mmap, ignored):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        refusal = e
    # weights_only refused a global. List the file's globals without running anything, then
    # admit numpy data, refuse code, and stand in for metadata classes.
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        raise CheckpointError(f"{path}: refused to load, the pickle needs more than tensors "
                              f"({_first_line(refusal)})") from None
    admitted = [(_admit(*full.rpartition(".")[::2], ignored), full) for full in names]
    with torch.serialization.safe_globals(admitted + _numpy_dtype_classes()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path}: refused to load, the pickle needs more than "
                                  f"tensors and plain data ({_first_line(e)})") from None


def _read(path, mmap=False):
    """(top-level object, reader, names of ignored metadata classes); runs no pickled code."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    ignored = set()
    try:
        if zipfile.is_zipfile(path):
            return _read_torch(path, mmap, ignored), "torch", sorted(ignored)
        with open(path, "rb") as f:
            first = _RestrictedUnpickler(f, ignored).load()
        if isinstance(first, int) and first == _TORCH_LEGACY_MAGIC:
            return _read_torch(path, False, ignored), "torch (legacy format)", sorted(ignored)
        return first, "pickle", sorted(ignored)
    except _Refused as e:
        raise CheckpointError(f"{path}: refused to load: the file asks to call {e.name}, "
                              "which would run code; a checkpoint needs only tensors and "
                              "plain data") from None
    except CheckpointError:
        raise
    except Exception as e:  # zip/pickle format errors carry no file name of their own
        raise CheckpointError(f"{path}: not a PyTorch checkpoint or pickle "
                              f"({type(e).__name__}: {_first_line(e)})") from None


def read_checkpoint(path):
    """Read a checkpoint file without running pickled code; returns its top-level object.

    torch files load with torch.load(weights_only=True); classes beyond tensors and plain
    containers become inert placeholders, or the file is refused when they would run code.
    Other files are read as plain pickles that may hold numpy arrays (detectron2 .pkl).
    """
    return _read(path)[0]


def file_digests(path, chunk=1 << 20):
    """{"sha256": hex, "md5": hex} of a file's bytes, in one read."""
    # md5 only because MoCo publishes it; usedforsecurity=False keeps FIPS systems working.
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
            md5.update(block)
    return {"sha256": sha.hexdigest(), "md5": md5.hexdigest()}


def known_release(digests):
    """The name of the public release whose published checksum the file has, or None."""
    for name, algorithm, prefix in KNOWN_RELEASES:
        if digests[algorithm].startswith(prefix):
            return name
    return None


def imagenet_file():
    """torchvision's ResNet50_Weights.IMAGENET1K_V1 file in the torch.hub cache
    ($TORCH_HOME/hub/checkpoints), downloaded there if missing; returns its path."""
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    name = os.path.basename(urllib.parse.urlparse(weights.url).path)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    if os.path.isfile(path):
        return path
    prefix = re.search(r"-([a-f0-9]+)\.", name)  # torch.hub's convention: sha256 prefix
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(weights.url, path, prefix[1] if prefix else None,
                                       progress=True)
    except Exception as e:  # no network, proxy, disk, hash: all end the same way
        raise CheckpointError(f"imagenet: cannot download {weights.url} ({type(e).__name__}: "
                              f"{_first_line(e)}); on a machine without internet, copy that "
                              f"file to {path}") from None
    return path


def _flatten(obj, prefix="", out=None, depth=0):
    """Every tensor (and numeric numpy array) in a checkpoint by dotted path:
    {"state_dict": {"conv1.weight": t}} -> {"state_dict.conv1.weight": t}."""
    out = {} if out is None else out
    if torch.is_tensor(obj):
        out[prefix[:-1]] = obj
    elif isinstance(obj, np.ndarray) and obj.dtype.kind in "biuf":
        out[prefix[:-1]] = torch.from_numpy(np.array(obj))  # a copy: unpickled may be r/o
    elif depth < 32 and isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", out, depth + 1)
    elif depth < 32 and isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}{i}.", out, depth + 1)
    return out


# ----------------------------------------------------------------------------------------
# Detecting the layout and assigning the trunk

# Caffe2 blob names (detectron2's ImageNetPretrained/MSRA files and the like).
_CAFFE2_BLOB = re.compile(r"^(res\d+_\d+_branch\w+|res_conv1_bn_[sb]|conv1_[wb]|fc1000_[wb])$")


def _check_pickle(obj, tensors, path, torchvision_style):
    """Plain pickles: refuse Caffe2 files; take detectron2 names only with a converter's marks
    or the explicit flag. Returns a note for the report."""
    if not isinstance(obj, dict):
        return None
    names = [k for part in (obj, obj.get("blobs"), obj.get("model")) if isinstance(part, dict)
             for k in part]
    caffe2 = [k for k in names if isinstance(k, str) and _CAFFE2_BLOB.match(k)]
    if caffe2:
        raise CheckpointError(
            f"{path}: a Caffe2-style ResNet (blobs like {caffe2[0]!r}): stride in the 1x1 "
            "conv and BGR 0-255 input, a different network from torchvision's ResNet-50; "
            "use a torchvision-style release of these weights instead")
    if "model.stem.conv1.weight" not in tensors:
        return None  # not detectron2 names: layout detection reports what it is
    author = str(obj.get("__author__", ""))
    # MoCo's convert-pretrain-to-detectron2.py writes "MOCO", detectron2's
    # convert-torchvision-to-d2.py "torchvision": both rename a torchvision-style ResNet.
    if obj.get("matching_heuristics") is True and author.lower() in ("moco", "torchvision"):
        return f"detectron2 names from a torchvision-style converter (__author__ {author!r})"
    if torchvision_style:
        return "detectron2 names without converter marks, taken as torchvision-style by flag"
    raise CheckpointError(
        f"{path}: a detectron2 .pkl without the marks of MoCo's converter (__author__, "
        "matching_heuristics); names and shapes cannot tell a torchvision-style ResNet-50 "
        "(stride in the 3x3 conv, RGB input) from detectron2's MSRA style (stride in the 1x1, "
        "BGR); if it is torchvision-style, pass pkl_torchvision_style=True")


def _source(layout, key):
    return layout.rename(key) if layout.rename else key


def _find_layout(obj, tensors, reader, required):
    """(layout, container, number of required keys found) of the best-fitting layout."""
    best = None
    for layout in LAYOUTS:
        if (layout.name == "detectron2_pkl") != (reader == "pickle"):
            continue
        for c in layout.containers:
            found = sum(c + layout.default + _source(layout, k) in tensors for k in required)
            marked = layout.marks is None or layout.marks(obj, tensors, c)
            if found == len(required) and marked:
                return layout, c, found
            if found and (best is None or (found, marked) > best[2:]):
                best = (layout, c, found, marked)
    return best[:3] if best else (None, None, 0)


def _momentum_prefix(layout, container, tensors, required, path):
    if not layout.momentum:
        hint = (" (convert_simclr.py --ema converts SimCLR's EMA weights)"
                if layout.name == "simclr_converted" else "")
        raise CheckpointError(f"{path}: layout {layout.name!r} has no momentum/teacher copy; "
                              f"take the default encoder{hint}")
    found = [(sum(container + m + _source(layout, k) in tensors for k in required),
              container + m) for m in layout.momentum]
    best = max(found, key=lambda f: f[0])  # max keeps the first of equals: table order
    if best[0] == 0:
        raise CheckpointError(f"{path}: layout {layout.name!r} has no momentum/teacher copy "
                              f"(looked for {[p for _, p in found]})")
    return best[1]  # _assign names what is missing when it is incomplete


def _assign(backbone, tensors, prefix, layout, path):
    """Load the trunk from `tensors` at `prefix`, strictly; returns the source keys used."""
    target = backbone.state_dict()
    src = {k: prefix + _source(layout, k) for k in target}
    if len(set(src.values())) != len(src):  # a renaming that merges keys is a bug here
        raise CheckpointError(f"{path}: layout {layout.name!r} maps two tensors to one key")
    missing, wrong = [], []
    for k, t in target.items():
        s = src[k]
        if s not in tensors:
            if not k.endswith("num_batches_tracked"):  # detectron2, VISSL, converters: absent
                missing.append(s)
        elif tensors[s].shape != t.shape:
            wrong.append(f"{s} {tuple(tensors[s].shape)} != {tuple(t.shape)}")
        elif tensors[s].is_floating_point() != t.is_floating_point():
            wrong.append(f"{s} {tensors[s].dtype} != {t.dtype}")
    # Trunk-like tensors the trunk has no place for: a ResNet-101/152 holds every ResNet-50
    # key with the right shape, plus more blocks.
    roots = {s[len(prefix):].split(".")[0] for s in src.values()}
    used = set(src.values())
    extra = [k for k in tensors if k.startswith(prefix) and k not in used
             and k[len(prefix):].split(".")[0] in roots
             and not HEAD_NAMES.intersection(k[len(prefix):].split("."))]
    if missing or wrong or extra:
        problems = [f"{len(missing)} missing (first: {missing[:3]})" if missing else "",
                    f"{len(wrong)} wrong shape (first: {wrong[:3]})" if wrong else "",
                    f"{len(extra)} not in a ResNet-50 (first: {extra[:3]}; a deeper ResNet?)"
                    if extra else ""]
        if prefix + "stem.0.weight" in tensors:
            problems.append("a deep stem (mmseg ResNetV1c/V1d), not torchvision's ResNet-50")
        raise CheckpointError(f"{path}: layout {layout.name!r} (prefix {prefix!r}) does not fit "
                              f"a ResNet-50 trunk: {'; '.join(p for p in problems if p)}")
    backbone.load_state_dict({k: tensors[s].to(target[k].dtype) if s in tensors
                              else torch.zeros_like(target[k])  # an absent counter: 0
                              for k, s in src.items()}, strict=True)
    return {s for s in src.values() if s in tensors}


def _load_own_head(net, tensors, container):
    """A checkpoint of this model: its head too when it fits. Returns (loaded, note, used)."""
    own = {k: v for k, v in net.state_dict().items() if k.startswith(("head.", "classifier."))}
    theirs = {k: tensors.get(container + k) for k in own}
    classes = tensors[container + "classifier.weight"].shape[0]
    if any(v is None or v.shape != own[k].shape for k, v in theirs.items()):
        return False, (f"not loaded: the checkpoint's head has {classes} classes, this model "
                       f"{net.num_classes}" if classes != net.num_classes else
                       "not loaded: it does not match this model's head"), set()
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in theirs.items()}, strict=False)
    return True, f"loaded ({classes} classes)", {container + k for k in own}


def _input_normalization(obj, path):
    """The input normalization a checkpoint declares (top level, or train.py's config), else
    ImageNet's. Only RGB in [0, 1] exists in the data pipeline."""
    norm = None
    if isinstance(obj, dict):
        norm = obj.get("input_normalization")
        if norm is None and isinstance(obj.get("config"), dict):
            norm = obj["config"].get("input_normalization")
    if norm is None:
        return dict(IMAGENET_NORMALIZATION)
    try:
        mean, std = [float(v) for v in norm["mean"]], [float(v) for v in norm["std"]]
        value_range = norm.get("range", "rgb_0_1")
    except (TypeError, KeyError, ValueError, AttributeError):
        mean = std = value_range = None
    if (mean is None or len(mean) != 3 or len(std) != 3
            or not all(math.isfinite(v) for v in mean + std) or min(std) <= 0):
        raise CheckpointError(f"{path}: input_normalization {norm!r} is not "
                              "{'mean': [3 numbers], 'std': [3 positive numbers]}")
    if value_range != "rgb_0_1":
        raise CheckpointError(f"{path}: input range {value_range!r} is not supported; the data "
                              "pipeline feeds RGB in [0, 1] ('rgb_0_1')")
    return {"mean": mean, "std": std, "range": "rgb_0_1"}


def random_report():
    """The load report of a randomly initialised backbone."""
    return {"init": "random", "layout": "random", "loaded": 0, "sha256": None,
            "known_release": None, "input_normalization": dict(IMAGENET_NORMALIZATION)}


def load_init(net, init, encoder="default", pkl_torchvision_style=False):
    """Load a pretrained ResNet-50 trunk into `net.backbone`, strictly, from `init`: a file
    in one of LAYOUTS, "imagenet" (torchvision's IMAGENET1K_V1) or "random".

    Every backbone weight, bias and BN running statistic is assigned exactly once with the
    right shape (`num_batches_tracked` may be absent). encoder="momentum" takes the layout's
    momentum/teacher/EMA copy instead of its default encoder. A checkpoint of this model also
    sets the head when its class count matches. A detectron2 .pkl needs the marks of MoCo's
    converter, or pkl_torchvision_style=True from a user who knows it is torchvision-style.
    Sets `net.input_normalization` to what the checkpoint declares (ImageNet's otherwise).

    Returns the report (also `net.init_report`): file, sha256, md5, known_release, layout,
    encoder, tensors loaded, tensors dropped by group, input normalization. Raises
    CheckpointError naming the file, the layout and the first keys that did not fit.
    """
    if encoder not in ("default", "momentum"):
        raise ValueError(f"encoder must be 'default' or 'momentum', got {encoder!r}")
    if init == "random":
        net.input_normalization = dict(IMAGENET_NORMALIZATION)
        net.init_report = random_report()
        return net.init_report
    path = imagenet_file() if init == "imagenet" else os.fspath(init)
    obj, reader, ignored = _read(path, mmap=True)  # mmap: dropped tensors are never read
    tensors = _flatten(obj)
    target = net.backbone.state_dict()
    required = [k for k in target if not k.endswith("num_batches_tracked")]
    norm = _input_normalization(obj, path)

    note = _check_pickle(obj, tensors, path, pkl_torchvision_style) if reader == "pickle" \
        else None
    layout, container, found = _find_layout(obj, tensors, reader, required)
    if found < len(required) // 2:
        first = list(tensors)[:6] or (list(obj)[:6] if isinstance(obj, dict)
                                      else type(obj).__name__)
        closest = (f"; closest: layout {layout.name!r} with {found} of {len(required)} trunk "
                   "tensors" if layout else "")
        raise CheckpointError(f"{path}: not a recognised ResNet-50 checkpoint (first keys: "
                              f"{first}){closest}")
    default_prefix = container + layout.default
    prefix = default_prefix
    if encoder == "momentum":
        prefix = _momentum_prefix(layout, container, tensors, required, path)
    used = _assign(net.backbone, tensors, prefix, layout, path)
    loaded = len(used)

    head_loaded, head_note = False, None
    if layout.name == "this_repo":
        head_loaded, head_note, head_used = _load_own_head(net, tensors, container)
        used |= head_used
    skipped = default_prefix if encoder == "momentum" else None
    dropped = collections.Counter(_drop_group(k, skipped) for k in tensors if k not in used)

    net.input_normalization = norm
    digests = file_digests(path)
    release = known_release(digests)
    if init == "imagenet" and release != IMAGENET_RELEASE:
        warnings.warn(f"{path} does not have the published checksum of torchvision's "
                      "IMAGENET1K_V1 weights; this run does not start from that release",
                      stacklevel=2)
    encoder_name = layout.encoders[encoder == "momentum"]
    if layout.name == "simclr_converted" and obj["conversion"].get("ema"):
        encoder_name = "EMA copy, chosen at conversion (convert_simclr.py --ema)"
    report = {"init": str(init), "file": os.path.abspath(path), **digests,
              "known_release": release, "reader": reader, "layout": layout.name,
              "encoder": encoder, "encoder_name": encoder_name,
              "prefix": prefix, "loaded": loaded, "head_loaded": head_loaded,
              "head": head_note, "dropped": dict(sorted(dropped.items())),
              "ignored_metadata": ignored, "note": note,
              "input_normalization": net.input_normalization}
    net.init_report = report
    return report


def format_report(report):
    """One line a person reads: what was loaded from where and what was dropped."""
    norm = report.get("input_normalization") or IMAGENET_NORMALIZATION
    norm_text = f"input mean={norm['mean']} std={norm['std']}"
    if report["layout"] == "random":
        return f"init: random (no pretrained weights); {norm_text}"
    dropped = ", ".join(f"{n} {g}" for g, n in sorted(report["dropped"].items())) or "nothing"
    head = " + head" if report["head_loaded"] else ""
    if report.get("head") and not report["head_loaded"]:
        head = f" (head {report['head']})"
    release = report["known_release"] or f"not a known release, sha256 {report['sha256'][:12]}"
    ignored = (f"; ignored metadata classes {', '.join(report['ignored_metadata'])}"
               if report.get("ignored_metadata") else "")
    ignored += f"; {report['note']}" if report.get("note") else ""
    return (f"init: {report['file']} layout={report['layout']} encoder={report['encoder']} "
            f"({report['encoder_name']}) loaded {report['loaded']} backbone tensors{head}; "
            f"dropped {dropped}{ignored}; {release}; {norm_text}")
