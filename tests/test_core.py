"""The end-to-end path and the faults common in public segmentation code (issue 2).

Expected values come from torchvision, numpy/PIL reads of the label files, or hand
computations written here; never from the code under test.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import data
import eval as evaluation
import model as segmodel

VOC = "VOCdevkit/VOC2012"


def voc_path(voc_root, *parts):
    return os.path.join(voc_root, VOC, *parts)


def split_ids(voc_root, split):
    with open(voc_path(voc_root, "ImageSets", "Segmentation", f"{split}.txt")) as f:
        return f.read().split()


# ----------------------------------------------------------------------------------------
# The network


def test_backbone_has_torchvision_keys_and_loads_a_torchvision_state_dict():
    tv = torchvision.models.resnet50().state_dict()
    net = segmodel.build_model()
    assert set(net.backbone.state_dict()) == set(tv) - {"fc.weight", "fc.bias"}
    sd = {k: v for k, v in tv.items() if not k.startswith("fc.")}
    net.backbone.load_state_dict(sd, strict=True)


def test_every_conv5_block_is_dilated_with_stride_one():
    net = segmodel.build_model()
    for block in net.backbone.layer4:
        assert block.conv2.dilation == (2, 2) and block.conv2.stride == (1, 1)
        assert block.conv2.padding == (2, 2)
    assert net.backbone.layer4[0].downsample[0].stride == (1, 1)
    tv_variant = segmodel.build_model(conv5_dilation="torchvision")
    assert tv_variant.backbone.layer4[0].conv2.dilation == (1, 1)
    assert tv_variant.backbone.layer4[1].conv2.dilation == (2, 2)


@torch.no_grad()
def test_backbone_forward_matches_torchvision_with_the_first_block_dilated():
    torch.manual_seed(0)
    ref = torchvision.models.resnet50(replace_stride_with_dilation=[False, False, True]).eval()
    net = segmodel.build_model(conv5_dilation="torchvision").eval()
    net.backbone.load_state_dict({k: v for k, v in ref.state_dict().items()
                                  if not k.startswith("fc.")})
    x = torch.randn(1, 3, 97, 130)
    trunk = torch.nn.Sequential(*list(ref.children())[:-2])
    torch.testing.assert_close(net.backbone(x), trunk(x))
    # The protocol variant: torchvision's model with the first conv5 3x3 conv dilated too.
    ref.layer4[0].conv2.dilation, ref.layer4[0].conv2.padding = (2, 2), (2, 2)
    net_all = segmodel.build_model().eval()
    net_all.backbone.load_state_dict(net.backbone.state_dict())
    torch.testing.assert_close(net_all.backbone(x), trunk(x))
    assert net_all.backbone(x).shape[-2:] == (7, 9)  # ceil(97/16), ceil(130/16)


def test_head_biases_and_no_extras():
    net = segmodel.build_model()
    convs = [m for m in net.head if isinstance(m, torch.nn.Conv2d)]
    assert [c.dilation for c in convs] == [(6, 6), (6, 6)]
    assert all(c.bias is None for c in convs) and net.classifier.bias is not None
    assert net.classifier.kernel_size == (1, 1) and net.classifier.out_channels == 21
    assert not any(isinstance(m, torch.nn.Dropout) for m in net.modules())
    assert not hasattr(net, "aux_classifier")


@torch.no_grad()
@pytest.mark.parametrize("align_corners", [True, False])
def test_logits_are_bilinear_at_the_input_size(align_corners):
    net = segmodel.build_model(align_corners=align_corners).eval()
    x = torch.randn(1, 3, 375, 500)
    out = net(x)
    assert out.shape == (1, 21, 375, 500)
    low = net.classifier(net.head(net.backbone(x)))
    expected = F.interpolate(low, size=(375, 500), mode="bilinear", align_corners=align_corners)
    torch.testing.assert_close(out, expected)
    if align_corners:  # corner logits are exactly the low-resolution corners
        torch.testing.assert_close(out[..., 0, 0], low[..., 0, 0])
        torch.testing.assert_close(out[..., -1, -1], low[..., -1, -1])


# ----------------------------------------------------------------------------------------
# Loading a MoCo checkpoint


def moco_checkpoint(path):
    """A MoCo v1/v2 file: random weights in MoCo's key layout, with distractors."""
    torch.manual_seed(1)
    query = torchvision.models.resnet50().state_dict()
    sd = {f"module.encoder_q.{k}": v for k, v in query.items()}
    sd.update({f"module.encoder_k.{k}": (v + 1 if v.is_floating_point() else v)
               for k, v in query.items()})
    sd["module.queue"] = torch.randn(128, 64)
    sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    torch.save({"arch": "resnet50", "epoch": 200, "state_dict": sd,
                "optimizer": {"state": {}, "param_groups": []}}, path)
    return query


def test_moco_checkpoint_loads_the_query_encoder_exactly(tmp_path):
    query = moco_checkpoint(tmp_path / "moco.pth")
    net = segmodel.build_model(init=str(tmp_path / "moco.pth"), verbose=False)
    for k, v in net.backbone.state_dict().items():
        assert torch.equal(v, query[k]), k
    report = net.init_report
    assert report["layout"] == "moco_v1_v2" and report["encoder"] == "default"
    assert report["loaded"] == 318  # 53 convs + 53 BN x 5 (with num_batches_tracked)
    assert report["dropped"]["momentum encoder"] == len(query)
    assert report["dropped"]["heads"] == 2 and report["dropped"]["queue"] == 2


def test_near_miss_checkpoint_fails_naming_the_key(tmp_path):
    query = torchvision.models.resnet50().state_dict()
    missing = dict(query)
    del missing["layer3.2.bn2.running_var"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(segmodel.CheckpointError, match="layer3.2.bn2.running_var"):
        segmodel.build_model(init=str(tmp_path / "missing.pth"), verbose=False)
    shaped = dict(query)
    shaped["layer1.0.conv1.weight"] = torch.zeros(64, 64, 3, 3)
    torch.save(shaped, tmp_path / "shape.pth")
    with pytest.raises(segmodel.CheckpointError, match="layer1.0.conv1.weight"):
        segmodel.build_model(init=str(tmp_path / "shape.pth"), verbose=False)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(segmodel.CheckpointError, match="junk.pth"):
        segmodel.build_model(init=str(tmp_path / "junk.pth"), verbose=False)


# ----------------------------------------------------------------------------------------
# Labels and augmentation


def test_palette_and_grayscale_labels_hold_class_indices(voc_root, tmp_path):
    p = voc_path(voc_root, "SegmentationClass", "2007_000032.png")
    with Image.open(p) as im:
        assert im.mode == "P"
        indices = np.array(im)
    assert np.array_equal(data.read_label(p).numpy(), indices)
    assert set(np.unique(indices)) == {0, 1, 15, 255}
    gray = voc_path(voc_root, "SegmentationClassAug", "2008_000008.png")
    with Image.open(gray) as im:
        assert im.mode == "L"
        assert np.array_equal(data.read_label(gray).numpy(), np.array(im))
    # The common fault: the label converted to RGB holds colours, not classes.
    with Image.open(p) as im:
        im.convert("RGB").save(tmp_path / "rgb.png")
    with pytest.raises(data.DataError, match="rgb.png.*mode RGB"):
        data.read_label(str(tmp_path / "rgb.png"))


def test_crop_pads_label_with_255_and_image_with_the_mean(voc_root):
    image = data.read_image(voc_path(voc_root, "JPEGImages", "2007_000032.jpg"))
    label = data.read_label(voc_path(voc_root, "SegmentationClass", "2007_000032.png"))
    h, w = label.shape  # 281 x 500
    aug = data.TrainAugment(crop_size=512, scale_range=(1.0, 1.0), flip=False)
    out_image, out_label = aug(image, label, torch.Generator().manual_seed(0))
    assert out_image.dtype == torch.uint8 and out_image.shape == (3, 512, 512)
    # Scale 1 and a crop larger than the image both ways: the image sits at the top left,
    # untouched, and everything right of and below it is padding.
    assert torch.equal(out_label[:h, :w], label) and torch.equal(out_image[:, :h, :w], image)
    pad = torch.ones(512, 512, dtype=torch.bool)
    pad[:h, :w] = False
    assert torch.all(out_label[pad] == 255)
    assert torch.all(out_image[:, pad] == torch.tensor(data.MEAN_PIXEL)[:, None])


def test_label_is_scaled_with_nearest_and_values_stay_valid(voc_root):
    image = data.read_image(voc_path(voc_root, "JPEGImages", "2007_000129.jpg"))
    label = data.read_label(voc_path(voc_root, "SegmentationClass", "2007_000129.png"))
    original = set(label.unique().tolist())
    aug = data.TrainAugment(crop_size=321)
    for seed in range(6):
        _, out = aug(image, label, torch.Generator().manual_seed(seed))
        # Bilinear scaling of a label would invent in-between class values.
        assert set(out.unique().tolist()) <= original | {255}
    # Nearest at ratio 2 repeats each label pixel as a 2x2 block (crop larger than the
    # scaled label, so it sits at the top left).
    h, w = label.shape
    aug2 = data.TrainAugment(crop_size=2 * max(h, w), scale_range=(2.0, 2.0), flip=False)
    _, out = aug2(image, label, torch.Generator().manual_seed(3))
    blocks = np.repeat(np.repeat(label.numpy(), 2, axis=0), 2, axis=1)
    assert np.array_equal(out[:2 * h, :2 * w].numpy(), blocks)


def test_augmentation_is_a_function_of_the_seed(voc_root):
    ds = data.VOCSegmentation(str(voc_root), "available_aug_train_aug",
                              augment=data.TrainAugment(97))
    a1, l1 = ds[(3, 12345)]
    a2, l2 = ds[(3, 12345)]
    assert torch.equal(a1, a2) and torch.equal(l1, l2)
    b, _ = ds[(3, 12346)]
    assert not torch.equal(a1, b)


def test_eval_dataset_keeps_original_size_and_counts_label_sources(voc_root):
    ds = data.VOCSegmentation(str(voc_root), "available_aug_train_aug")
    official = [i for i in split_ids(voc_root, "available_aug_train_aug")
                if os.path.isfile(voc_path(voc_root, "SegmentationClass", f"{i}.png"))]
    assert ds.label_sources == {"SegmentationClass": len(official),
                                "SegmentationClassAug": 24 - len(official)}
    assert 0 < len(official) < 24  # both folders are exercised
    for i in range(3):
        image, label, image_id = ds[i]
        with Image.open(voc_path(voc_root, "JPEGImages", f"{image_id}.jpg")) as im:
            assert image.shape == (3, im.height, im.width) and label.shape == (im.height,
                                                                               im.width)


def test_sampler_shards_are_disjoint_reshuffled_and_resumable():
    n, batch = 10, 4
    one = data.TrainSampler(n, batch, 0, 1, seed=7, total_iters=10)
    stream = list(one)
    ranks = [list(data.TrainSampler(n, batch, r, 2, seed=7, total_iters=10)) for r in (0, 1)]
    for it in range(10):  # rank 0 takes the first half of each global batch, rank 1 the rest
        assert ranks[0][2 * it:2 * it + 2] + ranks[1][2 * it:2 * it + 2] == \
            stream[4 * it:4 * it + 4]
    indices = [i for i, _ in stream]
    passes = [indices[p * n:(p + 1) * n] for p in range(4)]
    assert all(sorted(p) == list(range(n)) for p in passes)  # each pass sees every sample
    assert passes[0] != passes[1]  # and is reshuffled
    resumed = list(data.TrainSampler(n, batch, 0, 1, seed=7, start_iter=6, total_iters=10))
    assert resumed == stream[6 * batch:]
    assert stream != list(data.TrainSampler(n, batch, 0, 1, seed=8, total_iters=10))
    with pytest.raises(ValueError, match="--batch-size 4 does not divide"):
        data.TrainSampler(n, 4, 0, 3)


# ----------------------------------------------------------------------------------------
# The metric


def test_confusion_matrix_matches_a_hand_count_and_ignores_255():
    target = torch.tensor([[0, 0, 1], [2, 255, 20]], dtype=torch.uint8)
    pred = torch.tensor([[0, 1, 1], [20, 3, 20]], dtype=torch.uint8)
    cm = evaluation.confusion_matrix(pred, target)
    assert cm.dtype == torch.int64 and cm.shape == (21, 21)
    expected = np.zeros((21, 21), dtype=np.int64)
    for t, p in [(0, 0), (0, 1), (1, 1), (2, 20), (20, 20)]:  # the 255 pixel is skipped
        expected[t, p] += 1
    # 20 * 21 + 20 = 440 would overflow a uint8 index; the result must still be right.
    assert np.array_equal(cm.numpy(), expected)


def test_mean_iou_hand_computed_and_absent_class_left_out():
    cm = torch.zeros(21, 21, dtype=torch.int64)
    cm[0, 0], cm[0, 1], cm[1, 1], cm[1, 0], cm[2, 2] = 6, 2, 3, 1, 4
    iou, miou = evaluation.mean_iou(cm)
    # IoU0 = 6/(6+2+1), IoU1 = 3/(3+1+2), IoU2 = 1; classes 3..20 absent from both.
    assert iou[0].item() == pytest.approx(6 / 9) and iou[1].item() == pytest.approx(3 / 6)
    assert iou[2].item() == 1.0 and torch.isnan(iou[3:]).all()
    assert miou == pytest.approx((6 / 9 + 0.5 + 1) / 3)
    cm[5, 0] = 1  # labelled but never predicted: IoU 0, counted in the mean
    iou, miou = evaluation.mean_iou(cm)
    assert iou[5].item() == 0.0 and miou == pytest.approx((6 / 10 + 0.5 + 1 + 0) / 4)


def test_one_confusion_matrix_not_a_mean_over_images():
    # Image A: 1 pixel of class 1, predicted right; image B: 99 pixels of class 1, all
    # predicted 0. Whole-split IoU of class 1 is 1/100; a per-image mean would give 0.5.
    a = evaluation.confusion_matrix(torch.tensor([1]), torch.tensor([1]))
    b = evaluation.confusion_matrix(torch.zeros(99, dtype=torch.long),
                                    torch.ones(99, dtype=torch.long))
    iou, _ = evaluation.mean_iou(a + b)
    assert iou[1].item() == pytest.approx(1 / 100)


class Constant(torch.nn.Module):
    """Predicts class `k` everywhere; has a BN layer to observe the evaluation mode."""

    def __init__(self, k=0):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(3)
        self.k, self.num_classes = k, 21
        self.input_normalization = dict(segmodel.IMAGENET_NORMALIZATION)

    def forward(self, x):
        self.seen_training = self.bn.training
        self.bn(x)
        out = torch.zeros(x.shape[0], 21, *x.shape[-2:])
        out[:, self.k] = 1
        return out


def test_evaluation_scores_original_labels_in_eval_mode(voc_root):
    net = Constant(0).train()
    stats = net.bn.running_mean.clone()
    result = evaluation.evaluate_split(net, str(voc_root), "available_segclass_val",
                                       torch.device("cpu"), workers=0, progress=False)
    assert net.seen_training is False and net.training is True
    assert torch.equal(net.bn.running_mean, stats)
    # Predicting background everywhere: its IoU is background pixels / labelled pixels,
    # counted here straight from the label PNGs at their original size.
    labels = [np.array(Image.open(voc_path(voc_root, "SegmentationClass", f"{i}.png")))
              for i in split_ids(voc_root, "available_segclass_val")]
    labelled = sum(int((lb != 255).sum()) for lb in labels)
    background = sum(int((lb == 0).sum()) for lb in labels)
    assert result["labelled_pixels"] == labelled and result["images"] == 9
    assert result["per_class_iou"]["background"] == pytest.approx(background / labelled)
    present = set().union(*(set(np.unique(lb).tolist()) for lb in labels)) - {255}
    for c, name in enumerate(evaluation.VOC_CLASSES):
        assert (result["per_class_iou"][name] is None) == (c not in present)
    assert result["miou"] == pytest.approx(background / labelled / len(present))


# ----------------------------------------------------------------------------------------
# The real command lines


def run(repo, *argv, env=None, check=True):
    proc = subprocess.run([sys.executable, *argv], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})},
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def test_train_then_eval_end_to_end(repo, voc_root, tmp_path):
    query = moco_checkpoint(tmp_path / "moco.pth")
    out = tmp_path / "run"
    proc = run(repo, "train.py", "--data-root", str(voc_root), "--init",
               str(tmp_path / "moco.pth"), "--train-split", "available_aug_train_aug",
               "--val-split", "available_segclass_val", "--iters", "3", "--batch-size", "2",
               "--lr-schedule", "linear",
               "--crop-size", "97", "--workers", "1", "--log-every", "1",
               "--output-dir", str(out))
    assert "layout=moco_v1_v2" in proc.stdout and "BN           BatchNorm2d" in proc.stdout
    for name in ("args.json", "run.json", "log.jsonl", "checkpoint.pth", "eval.json"):
        assert (out / name).is_file(), name
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in steps)
    # linear to 0 over 3 iterations: lr = 0.003 * (1 - it / 3) at 0-based iteration it.
    assert [r["lr"] for r in steps] == pytest.approx([0.003, 0.002, 0.001])
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["init"]["layout"] == "moco_v1_v2" and manifest["world_size"] == 1
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["iteration"] == 3 and ckpt["config"]["align_corners"] is True
    # The loaded backbone moved away from the query encoder by SGD but started there:
    moved = ckpt["model"]["backbone.layer4.2.conv3.weight"] - query["layer4.2.conv3.weight"]
    assert 0 < moved.abs().max() < 0.1

    proc = run(repo, "eval.py", str(out / "checkpoint.pth"), "--data-root", str(voc_root),
               "--split", "available_segclass_val", "--workers", "0", "--json",
               str(tmp_path / "e.json"), "--save-pred", str(tmp_path / "pred"))
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["images"] == 9 and 0 <= result["miou"] <= 1
    assert result["label_sources"] == {"SegmentationClass": 9, "SegmentationClassAug": 0}
    assert result["warnings"] == []
    assert np.array(result["confusion_matrix"]).shape == (21, 21)
    assert "mIoU" in proc.stdout
    train_eval = json.loads((out / "eval.json").read_text())
    assert train_eval["confusion_matrix"] == result["confusion_matrix"]  # the same code
    ids = split_ids(voc_root, "available_segclass_val")
    assert sorted(os.listdir(tmp_path / "pred")) == sorted(f"{i}.png" for i in ids)
    with Image.open(tmp_path / "pred" / f"{ids[0]}.png") as im:
        assert im.mode == "P" and im.getpalette()[3:6] == [128, 0, 0]  # VOC class 1 colour
        with Image.open(voc_path(voc_root, "JPEGImages", f"{ids[0]}.jpg")) as img:
            assert im.size == img.size


def test_val_split_warns_when_not_official(repo, voc_root, tmp_path):
    # A copy of the folder layout whose 'val' is the 3 ids labelled only by SBD's folder.
    root = tmp_path / "voc"
    (root / VOC / "ImageSets" / "Segmentation").mkdir(parents=True)
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug"):
        os.symlink(voc_path(voc_root, d), root / VOC / d)
    (root / VOC / "ImageSets" / "Segmentation" / "val.txt").write_text(
        "\n".join(split_ids(voc_root, "available_aug_val")) + "\n")
    torch.save(segmodel.build_model().state_dict(), tmp_path / "bare.pth")
    proc = run(repo, "eval.py", str(tmp_path / "bare.pth"), "--data-root", str(root),
               "--workers", "0", "--json", str(tmp_path / "e.json"))
    assert "split 'val' has 3 ids, not the official 1449" in proc.stderr
    assert "3 of 3 labels came from SegmentationClassAug" in proc.stderr
    assert len(json.loads((tmp_path / "e.json").read_text())["warnings"]) == 2


def test_check_flags_a_label_whose_palette_was_renumbered(tiny_voc):
    path = tiny_voc / VOC / "SegmentationClass" / "2007_000033.png"
    with Image.open(path.resolve()) as im:
        values = np.array(im)
        palette = im.getpalette()
    # An editor's re-save: same colours, other indices (classes 1 and 15 swap numbers).
    swapped = values.copy()
    swapped[values == 1], swapped[values == 15] = 15, 1
    remapped = list(palette)
    remapped[3:6], remapped[45:48] = palette[45:48], palette[3:6]
    out = Image.fromarray(swapped, mode="P")
    out.putpalette(remapped)
    path.unlink()
    out.save(path)
    (tiny_voc / VOC / "ImageSets" / "Segmentation" / "one.txt").write_text("2007_000033\n")
    result = data.check_split(str(tiny_voc), "one")
    assert result["counts"] == {"labels with a non-VOC palette": 1}
    assert "2007_000033.png: palette differs from VOC's" in result["problems"][0]
