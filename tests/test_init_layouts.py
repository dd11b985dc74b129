"""Every checkpoint layout loads the ResNet-50 trunk exactly, or fails loudly (issue 3).

Reference tensors come from torchvision's own ResNet-50 (BN statistics and affine terms
randomised so that no tensor equals a default); each layout's file is written here in that
codebase's key layout with distractors that hold other values: a momentum encoder, a queue,
heads, optimizer state, metadata. Before each load the network's backbone is filled with
NaN, so a tensor that is not assigned can never pass for one that is.
"""
import collections
import os
import pickle
import re
import shutil
import sys
import types
import urllib.error

import numpy as np
import pytest
import torch
import torchvision

import model as segmodel

MARK = "IMPORTED-OR-EXECUTED"  # a file that only hostile or imported code would create


# ----------------------------------------------------------------------------------------
# Reference tensors and files


@pytest.fixture(scope="module")
def ref():
    """torchvision's ResNet-50 state_dict (with fc), every BN tensor made distinctive."""
    torch.manual_seed(0)
    sd = torchvision.models.resnet50().state_dict()
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(1000 + len(k))
        elif v.ndim == 1:  # BN weights, biases, running statistics; fc.bias
            sd[k] = torch.rand_like(v) + 0.5
    # Every float tensor becomes a view of one storage with a spare element at its end, so
    # that other_values() can take a momentum copy as the same storage shifted by one
    # element: a file with two encoders then costs the disk (and the test's time) one.
    floats = [k for k, v in sd.items() if v.is_floating_point()]
    flat = torch.cat([sd[k].reshape(-1) for k in floats] + [torch.rand(1)])
    offset = 0
    for k in floats:
        n = sd[k].numel()
        sd[k] = flat[offset:offset + n].view(sd[k].shape)
        offset += n
    return sd


def trunk(sd):
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def other_values(sd):
    """A momentum copy: same keys and shapes, other values (see ref)."""
    out = {}
    for k, v in sd.items():
        room = v.untyped_storage().nbytes() // v.element_size() - v.storage_offset()
        if v.is_floating_point() and room > v.numel():
            out[k] = torch.as_strided(v, v.shape, v.stride(), v.storage_offset() + 1)
        else:
            out[k] = v + 1 if v.is_floating_point() else v + 5
    return out


def prefixed(prefix, sd):
    return {prefix + k: v for k, v in sd.items()}


def no_counters(sd):
    return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def optimizer_state():
    return {"state": {i: {"momentum_buffer": torch.randn(3)} for i in range(4)},
            "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0, 1, 2, 3]}]}


def small(*names):
    return {n: torch.randn(4, 8) for n in names}


def detectron2_names(sd):
    """What MoCo's convert-pretrain-to-detectron2.py writes for torchvision names."""
    out = {}
    for k, v in sd.items():
        if not k.startswith("layer"):
            k = "stem." + k
        for t in range(1, 5):
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in range(1, 4):
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        out[k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")] = \
            v.numpy()
    return out


# Each layout: (build(ref) -> (object, writer), expected report fields for the default
# encoder, the same for the momentum copy or None, whether the file has counters).
def moco_v1_v2(ref):
    q = dict(trunk(ref), **small("fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"))
    sd = dict(prefixed("module.encoder_q.", q),
              **prefixed("module.encoder_k.", other_values(q)),
              **{"module.queue": torch.randn(128, 16), "module.queue_ptr": torch.zeros(1)})
    return {"arch": "resnet50", "epoch": 800, "state_dict": sd, "optimizer": optimizer_state()}


def moco_bare(ref):  # MoCo v1 saved without DDP's module.
    q = dict(trunk(ref), **small("fc.weight", "fc.bias"))
    return {"state_dict": dict(prefixed("encoder_q.", q),
                               **prefixed("encoder_k.", other_values(q)),
                               queue=torch.randn(128, 16), queue_ptr=torch.zeros(1))}


def moco_v3(ref):
    base = dict(trunk(ref), **small("fc.0.weight", "fc.1.weight", "fc.1.bias"))
    sd = dict(prefixed("module.base_encoder.", base),
              **prefixed("module.momentum_encoder.", other_values(base)),
              **small("module.predictor.0.weight", "module.predictor.1.weight"))
    return {"arch": "resnet50", "state_dict": sd, "optimizer": optimizer_state(),
            "scaler": {"scale": 65536.0, "_growth_tracker": 3}}


def swav(ref):
    return dict(prefixed("module.", trunk(ref)),
                **small("module.projection_head.0.weight", "module.projection_head.1.weight",
                        "module.prototypes.weight"))


def torchvision_ddp(ref):
    return prefixed("module.", ref)


def byol_converted(ref):
    return {"state_dict": dict(ref)}


def mmselfsup(ref):  # mmselfsup 1.x MoCo v2: numpy metadata needs the restricted path
    sd = dict(prefixed("backbone.", trunk(ref)),
              **small("neck.mlp.0.weight", "neck.mlp.2.weight"),
              **prefixed("momentum_encoder.module.0.", other_values(trunk(ref))),
              **small("momentum_encoder.module.1.mlp.0.weight",
                      "momentum_encoder.module.1.mlp.2.weight"),
              **{"momentum_encoder.steps": torch.tensor(100), "queue": torch.randn(128, 16),
                 "queue_ptr": torch.zeros(1, dtype=torch.long)})
    return {"meta": {"epoch": 200, "seed": np.int64(0), "loss_history": np.arange(5.0)},
            "state_dict": sd, "optimizer": optimizer_state()}


def mmseg(ref):
    sd = dict(prefixed("backbone.", trunk(ref)),
              **small("decode_head.conv_seg.weight", "decode_head.conv_seg.bias",
                      "auxiliary_head.conv_seg.weight"))
    return {"meta": {"CLASSES": ["background", "aeroplane"]}, "state_dict": sd}


def mmseg_bare(ref):  # a bare state_dict with backbone. keys is not this repository's
    return mmseg(ref)["state_dict"]


def vissl(ref):
    t = no_counters(trunk(ref))
    model = {"trunk": prefixed("_feature_blocks.", t),
             "heads": small("0.clf.0.weight", "0.clf.0.bias")}
    moco = dict(prefixed("trunk._feature_blocks.", other_values(t)),
                **small("heads.0.clf.0.weight"))
    return {"classy_state_dict": {"base_model": {"model": model, "meta": {}},
                                  "loss": {"queue": torch.randn(128, 16),
                                           "queue_ptr": torch.zeros(1), "moco_encoder": moco}},
            "phase_idx": 199, "iteration": 1000, "type": "checkpoint"}


def detectron2_pkl(ref):
    q = dict(trunk(ref), **small("fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"))
    return {"model": detectron2_names(q), "__author__": "MOCO", "matching_heuristics": True}


SIMCLR_NORM = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "range": "rgb_0_1"}


def simclr_converted(ref):
    return {"state_dict": dict(ref), "input_normalization": SIMCLR_NORM,
            "conversion": {"converter": "convert_simclr.py", "ema": True,
                           "global_step": 1000, "warnings": []}}


def this_repo(ref, num_classes=21):
    torch.manual_seed(num_classes)
    net = segmodel.SegmentationNet(num_classes)
    net.backbone.load_state_dict(trunk(ref))
    return {"model": net.state_dict(), "optimizer": optimizer_state(), "iteration": 3,
            "config": net.config(), "rng": {"torch": torch.get_rng_state(), "cuda": []},
            "args": {"lr": 0.003}}


D = collections.namedtuple("D", "build layout loaded dropped momentum_dropped")
ENCODER_NAMES = {  # (default, momentum) as the report names them, where it matters
    "moco_v1_v2": ("query encoder", "key (momentum) encoder"),
    "moco_v3": ("base encoder", "momentum encoder"),
    "vissl": ("trunk", "MoCo key encoder"),
    "simclr_converted": ("EMA copy, chosen at conversion (convert_simclr.py --ema)", None)}
LAYOUTS = {
    "moco_v1_v2": D(moco_v1_v2, "moco_v1_v2", 318,
                    {"heads": 4, "momentum encoder": 322, "optimizer state": 4, "queue": 2},
                    {"default encoder": 322, "heads": 4, "optimizer state": 4, "queue": 2}),
    "moco_bare": D(moco_bare, "moco_v1_v2", 318,
                   {"heads": 2, "momentum encoder": 320, "queue": 2},
                   {"default encoder": 320, "heads": 2, "queue": 2}),
    "moco_v3": D(moco_v3, "moco_v3", 318,
                 {"heads": 5, "momentum encoder": 321, "optimizer state": 4},
                 {"default encoder": 321, "heads": 5, "optimizer state": 4}),
    "swav": D(swav, "swav", 318, {"heads": 3}, None),
    "torchvision_ddp": D(torchvision_ddp, "torchvision_ddp", 318, {"heads": 2}, None),
    "byol_converted": D(byol_converted, "torchvision", 318, {"heads": 2}, None),
    "mmselfsup": D(mmselfsup, "mmselfsup_mmseg", 318,
                   {"heads": 2, "metadata": 1, "momentum encoder": 321, "optimizer state": 4,
                    "queue": 2},
                   {"default encoder": 318, "heads": 2, "metadata": 1,
                    "momentum encoder": 3, "optimizer state": 4, "queue": 2}),
    "mmseg": D(mmseg, "mmselfsup_mmseg", 318, {"heads": 3}, None),
    "mmseg_bare": D(mmseg_bare, "mmselfsup_mmseg", 318, {"heads": 3}, None),
    "vissl": D(vissl, "vissl", 265, {"heads": 2, "momentum encoder": 266, "queue": 2},
               {"default encoder": 265, "heads": 3, "queue": 2}),
    "detectron2_pkl": D(detectron2_pkl, "detectron2_pkl", 318, {"heads": 4}, None),
    "simclr_converted": D(simclr_converted, "simclr_converted", 318, {"heads": 2}, None),
    "this_repo": D(this_repo, "this_repo", 318, {"metadata": 1, "optimizer state": 4}, None),
}


def write(obj, path):
    if str(path).endswith(".pkl"):
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    else:
        torch.save(obj, path)
    return str(path)


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    """Each layout's file, written once for the module and removed after it."""
    folder = tmp_path_factory.mktemp("layouts")
    cache = {}

    def get(name):
        if name not in cache:
            suffix = ".pkl" if name == "detectron2_pkl" else ".pth"
            cache[name] = write(LAYOUTS[name].build(ref), folder / f"{name}{suffix}")
        return cache[name]
    yield get
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def remove_written_files(tmp_path):
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)  # ~100 MB a file; pytest keeps 3 runs' temp


@pytest.fixture(scope="module")
def net():
    return segmodel.SegmentationNet()


def load(net, path, **kwargs):
    """load_init into a backbone whose every tensor was first poisoned."""
    with torch.no_grad():
        for t in net.backbone.state_dict().values():
            t.fill_(float("nan") if t.is_floating_point() else -1)
    return segmodel.load_init(net, path, **kwargs)


def assert_trunk(net, expected):
    for k, v in net.backbone.state_dict().items():
        # A file without counters leaves num_batches_tracked at a fresh 0.
        want = expected.get(k, torch.zeros_like(v))
        assert torch.equal(v, want), k


def expected_trunk(ref, name, momentum=False):
    t = trunk(other_values(ref) if momentum else ref)
    return no_counters(t) if name == "vissl" else t


# ----------------------------------------------------------------------------------------
# Every layout


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_loads_the_default_encoder_exactly(name, ref, files, net):
    d = LAYOUTS[name]
    report = load(net, files(name))
    assert_trunk(net, expected_trunk(ref, name))
    assert report["layout"] == d.layout and report["encoder"] == "default"
    assert report["encoder_name"] == ENCODER_NAMES.get(name, (report["encoder_name"],))[0]
    assert report["loaded"] == d.loaded and report["dropped"] == d.dropped
    assert report["file"] == os.path.abspath(files(name)) and len(report["sha256"]) == 64
    assert report["known_release"] is None and report["ignored_metadata"] == []
    expected_norm = SIMCLR_NORM if name == "simclr_converted" else \
        segmodel.IMAGENET_NORMALIZATION
    assert report["input_normalization"] == net.input_normalization == expected_norm
    assert net.init_report is report
    line = segmodel.format_report(report)
    assert f"layout={d.layout} encoder=default" in line and f"loaded {d.loaded}" in line
    assert f"mean={expected_norm['mean']}" in line


@pytest.mark.parametrize("name", [n for n, d in LAYOUTS.items() if d.momentum_dropped])
def test_momentum_flag_takes_the_momentum_copy(name, ref, files, net):
    d = LAYOUTS[name]
    report = load(net, files(name), encoder="momentum")
    assert_trunk(net, expected_trunk(ref, name, momentum=True))
    assert report["encoder"] == "momentum" and report["layout"] == d.layout
    assert report["encoder_name"] == ENCODER_NAMES.get(name, (0, report["encoder_name"]))[1]
    assert report["loaded"] == d.loaded and report["dropped"] == d.momentum_dropped
    assert "encoder=momentum" in segmodel.format_report(report)


@pytest.mark.parametrize("name", ["swav", "mmseg", "detectron2_pkl", "simclr_converted",
                                  "this_repo"])
def test_momentum_flag_without_a_momentum_copy_is_an_error(name, files, net):
    with pytest.raises(segmodel.CheckpointError,
                       match=f"{name}.*layout '{LAYOUTS[name].layout}' has no momentum"):
        load(net, files(name), encoder="momentum")


def test_legacy_torch_format_loads(ref, net, tmp_path):
    # torch < 1.6 wrote this format (as MoCo's 2020 releases may be); the loader tells it from
    # a plain pickle by its leading magic number.
    path = tmp_path / "legacy.pth.tar"
    torch.save(moco_v1_v2(ref), path, _use_new_zipfile_serialization=False)
    report = load(net, str(path))
    assert_trunk(net, trunk(ref))
    assert report["reader"] == "torch (legacy format)" and report["layout"] == "moco_v1_v2"
    assert report["dropped"] == LAYOUTS["moco_v1_v2"].dropped


def test_own_checkpoint_takes_the_head_only_when_the_classes_match(ref, files, net, tmp_path):
    saved = torch.load(files("this_repo"), weights_only=True)["model"]
    report = load(net, files("this_repo"))
    assert report["head_loaded"] and report["head"] == "loaded (21 classes)"
    for k, v in net.state_dict().items():
        if not k.startswith("backbone."):
            assert torch.equal(v, saved[k]), k
    path = write({"model": this_repo(ref, num_classes=2)["model"]}, tmp_path / "two.pth")
    report = load(net, path)
    assert_trunk(net, trunk(ref))
    assert not report["head_loaded"]
    assert report["head"] == "not loaded: the checkpoint's head has 2 classes, this model 21"
    head_tensors = sum(1 for k in saved if k.startswith(("head.", "classifier.")))
    assert report["dropped"] == {"heads": head_tensors}
    assert "head not loaded" in segmodel.format_report(report)


# ----------------------------------------------------------------------------------------
# Near misses, unrecognised files, refusals


def test_near_miss_names_the_file_the_layout_and_the_key(ref, net, tmp_path):
    vissl_sd = vissl(ref)
    del vissl_sd["classy_state_dict"]["base_model"]["model"]["trunk"][
        "_feature_blocks.layer4.2.bn3.running_var"]
    path = write(vissl_sd, tmp_path / "vissl_missing.pth")
    with pytest.raises(segmodel.CheckpointError,
                       match=r"vissl_missing.pth: layout 'vissl' .*1 missing .*"
                             r"trunk._feature_blocks.layer4.2.bn3.running_var"):
        load(net, path)

    d2 = detectron2_pkl(ref)
    d2["model"]["res3.1.conv2.weight"] = np.zeros((128, 128, 1, 1), np.float32)
    path = write(d2, tmp_path / "d2_shape.pkl")
    with pytest.raises(segmodel.CheckpointError,
                       match=r"d2_shape.pkl: layout 'detectron2_pkl' .*1 wrong shape .*"
                             r"res3.1.conv2.weight \(128, 128, 1, 1\) != \(128, 128, 3, 3\)"):
        load(net, path)


def test_deep_stem_is_named(ref, net, tmp_path):
    obj = mmseg(ref)
    for k in ("conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"):
        del obj["state_dict"]["backbone." + k]
    obj["state_dict"].update(small("backbone.stem.0.weight", "backbone.stem.1.weight"))
    path = write(obj, tmp_path / "v1c.pth")
    with pytest.raises(segmodel.CheckpointError,
                       match=r"v1c.pth: layout 'mmselfsup_mmseg' .*5 missing .*"
                             r"backbone.conv1.weight.*deep stem"):
        load(net, path)


def test_incomplete_momentum_copy_fails_only_when_taken(ref, net, tmp_path):
    obj = moco_v1_v2(ref)
    del obj["state_dict"]["module.encoder_k.layer2.1.bn3.running_mean"]
    path = write(obj, tmp_path / "moco_k_missing.pth")
    load(net, path)  # the query encoder is whole
    assert_trunk(net, trunk(ref))
    with pytest.raises(segmodel.CheckpointError,
                       match=r"moco_k_missing.pth: layout 'moco_v1_v2' .*"
                             r"module.encoder_k.layer2.1.bn3.running_mean"):
        load(net, path, encoder="momentum")


def test_deeper_resnet_is_not_taken_for_a_resnet50(ref, net, tmp_path):
    sd = dict(ref, **{"layer3.6.conv1.weight": torch.zeros(256, 1024, 1, 1)})
    path = write(sd, tmp_path / "r101ish.pth")
    with pytest.raises(segmodel.CheckpointError,
                       match=r"r101ish.pth: layout 'torchvision' .*not in a ResNet-50 .*"
                             r"layer3.6.conv1.weight"):
        load(net, path)


@pytest.mark.parametrize("obj, first_key", [
    ({"cls_token": torch.zeros(1, 1, 8), "pos_embed": torch.zeros(1, 5, 8),
      "blocks.0.attn.qkv.weight": torch.zeros(24, 8)}, "cls_token"),
    ({"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(64, 3, 7, 7),
                "roi_heads.box_predictor.cls_score.weight": torch.zeros(81, 8)}},
     "model.backbone.bottom_up.stem.conv1.weight"),
    ({}, "[]"),
], ids=["vit", "detection", "empty"])
def test_unrecognised_file_lists_its_first_keys(obj, first_key, net, tmp_path):
    path = write(obj, tmp_path / "other.pth")
    with pytest.raises(segmodel.CheckpointError,
                       match=rf"other.pth: not a recognised ResNet-50 .*"
                             rf"{re.escape(first_key)}"):
        load(net, path)


class Hostile:
    """Pickles as a call of a code-running function that would create the marker file."""

    def __init__(self, func, *args):
        self.call = (func, args)

    def __reduce__(self):
        return self.call


@pytest.mark.parametrize("make", ["torch", "pkl2", "pkl5"])
@pytest.mark.parametrize("call", ["os.system", "subprocess.call", "builtins.exec"])
def test_pickled_code_is_refused_and_never_runs(make, call, net, tmp_path):
    marker = tmp_path / MARK
    func = {"os.system": (os.system, f"touch {marker}"),
            "subprocess.call": (__import__("subprocess").call, ["touch", str(marker)]),
            "builtins.exec": (exec, f"open({str(marker)!r}, 'w').close()")}[call]
    payload = {"state_dict": {"conv1.weight": torch.zeros(1)}, "meta": Hostile(*func)}
    if make == "torch":
        path = write(payload, tmp_path / "hostile.pth")
    else:
        payload["state_dict"] = {"conv1.weight": np.zeros(1)}
        path = tmp_path / "hostile.pkl"
        path.write_bytes(pickle.dumps(payload, protocol=int(make[-1])))
    with pytest.raises(segmodel.CheckpointError, match=r"hostile.p.*refused.*run code"):
        load(net, str(path))
    with pytest.raises(segmodel.CheckpointError, match="refused"):
        segmodel.read_checkpoint(str(path))
    assert not marker.exists()


def test_metadata_classes_become_placeholders_and_are_never_imported(ref, net, tmp_path,
                                                                     monkeypatch):
    # An mmengine-style checkpoint: the message hub holds HistoryBuffer objects.
    name = "mmengine_fake.logging.history_buffer"

    class HistoryBuffer:
        def __init__(self):
            self._log_history = np.arange(4.0)
            self._count_history = np.ones(4)
    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = name, "HistoryBuffer"
    for part in ["mmengine_fake", "mmengine_fake.logging", name]:
        monkeypatch.setitem(sys.modules, part, types.ModuleType(part))
    sys.modules[name].HistoryBuffer = HistoryBuffer
    obj = {"meta": {"seed": np.int64(7)}, "state_dict": prefixed("backbone.", trunk(ref)),
           "message_hub": {"log_scalars": {"train/loss": HistoryBuffer()}}}
    path = write(obj, tmp_path / "mmengine.pth")
    # Now the class is gone from memory and a module of that name would leave a mark if
    # anything imported it.
    for part in ["mmengine_fake", "mmengine_fake.logging", name]:
        monkeypatch.delitem(sys.modules, part)
    package = tmp_path / "site" / "mmengine_fake" / "logging"
    package.mkdir(parents=True)
    for folder in (package.parent, package):
        (folder / "__init__.py").write_text(f"open({str(tmp_path / MARK)!r}, 'w').close()\n")
    (package / "history_buffer.py").write_text("class HistoryBuffer:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # what the plain safe load says
    report = load(net, path)
    assert_trunk(net, trunk(ref))
    assert report["layout"] == "mmselfsup_mmseg"
    assert report["ignored_metadata"] == [f"{name}.HistoryBuffer"]
    assert "ignored metadata classes" in segmodel.format_report(report)
    assert not (tmp_path / MARK).exists() and "mmengine_fake" not in sys.modules


# ----------------------------------------------------------------------------------------
# detectron2 pickles


def test_caffe2_pickle_is_refused_with_the_reason(net, tmp_path):
    blobs = {"conv1_w": np.zeros((64, 3, 7, 7), np.float32),
             "res_conv1_bn_s": np.ones(64, np.float32),
             "res2_0_branch2a_w": np.zeros((64, 64, 1, 1), np.float32)}
    path = write({"blobs": blobs}, tmp_path / "R-50.pkl")
    with pytest.raises(segmodel.CheckpointError,
                       match=r"R-50.pkl: a Caffe2-style ResNet .*stride in the 1x1 conv and "
                             r"BGR 0-255 input"):
        load(net, path)


def test_unmarked_detectron2_pickle_needs_the_flag(ref, net, tmp_path):
    obj = detectron2_pkl(ref)
    del obj["__author__"], obj["matching_heuristics"]
    path = write(obj, tmp_path / "unmarked.pkl")
    with pytest.raises(segmodel.CheckpointError,
                       match=r"unmarked.pkl: a detectron2 .pkl without the marks.*"
                             r"pkl_torchvision_style=True"):
        load(net, path)
    report = load(net, path, pkl_torchvision_style=True)
    assert_trunk(net, trunk(ref))
    assert report["layout"] == "detectron2_pkl" and "by flag" in report["note"]
    assert "by flag" in segmodel.format_report(report)


# ----------------------------------------------------------------------------------------
# The imagenet shorthand, known releases, input normalization


def imagenet_cache_path(torch_home):
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    return torch_home / "hub" / "checkpoints" / os.path.basename(url)


def test_imagenet_reads_the_hub_cache_and_checks_the_checksum(ref, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = imagenet_cache_path(tmp_path / "torch")
    assert path.name == "resnet50-0676ba61.pth"
    path.parent.mkdir(parents=True)
    write(ref, path)

    def no_download(*args, **kwargs):
        raise AssertionError("a cached file must not be downloaded again")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    # The file here is synthetic: it cannot have the published sha256 prefix.
    with pytest.warns(UserWarning, match="published checksum of torchvision's IMAGENET1K_V1"):
        net = segmodel.build_model(init="imagenet", verbose=False)
    assert_trunk(net, trunk(ref))
    report = net.init_report
    assert report["init"] == "imagenet" and report["file"] == str(path)
    assert report["layout"] == "torchvision" and report["known_release"] is None
    assert report["dropped"] == {"heads": 2}


def test_imagenet_without_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    asked = []

    def offline(url, dst, *args, **kwargs):  # stands in for the network: no socket opened
        asked.append(url)
        raise urllib.error.URLError("no route to host")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    expected = imagenet_cache_path(tmp_path / "torch")
    with pytest.raises(segmodel.CheckpointError) as e:
        segmodel.build_model(init="imagenet", verbose=False)
    assert asked == [torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url]
    assert str(expected) in str(e.value) and "without internet" in str(e.value)
    assert "\n" not in str(e.value) and not expected.exists()


def test_known_release_is_recognised_by_its_published_checksum(files, net, monkeypatch):
    path = files("moco_v1_v2")
    report = load(net, path)
    assert report["known_release"] is None
    assert "not a known release" in segmodel.format_report(report)
    monkeypatch.setattr(segmodel, "KNOWN_RELEASES",
                        [("MoCo test release", "md5", report["md5"][:8])])
    report = load(net, path)
    assert report["known_release"] == "MoCo test release"
    assert "MoCo test release" in segmodel.format_report(report)


@pytest.mark.parametrize("norm, message", [
    ({"mean": [0, 0, 0], "std": [1, 1, 1], "range": "bgr_0_255"}, "input range 'bgr_0_255'"),
    ({"mean": [0, 0], "std": [1, 1, 1]}, "is not {'mean'"),
    ({"mean": [0, 0, 0], "std": [1, 0, 1]}, "is not {'mean'"),
])
def test_bad_input_normalization_is_an_error(norm, message, net, tmp_path):
    path = write({"state_dict": {}, "input_normalization": norm}, tmp_path / "n.pth")
    with pytest.raises(segmodel.CheckpointError, match=rf"n.pth: .*{message}"):
        load(net, path)


def test_random_init_reports_itself():
    net = segmodel.build_model(verbose=False)
    assert net.init_report["layout"] == "random" and net.init_report["loaded"] == 0
    assert segmodel.format_report(net.init_report).startswith("init: random")
