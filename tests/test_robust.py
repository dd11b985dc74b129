"""Nothing lost, nothing silently wrong (issue 8): exact resume after SIGKILL, atomic
checkpoints, and one clear line for every kind of bad input, through the real commands."""
import hashlib
import os
import pickle
import re
import signal
import subprocess
import sys

import pytest
import torch
import torchvision

SEG = ("VOCdevkit", "VOC2012")


def train_argv(voc, out, *extra):
    """train.py's flags for the tiny splits: 4 iterations, batch 2, 65 px crops, CPU."""
    return ["--init", "random", "--data-root", str(voc), "--train-split", "tiny_train",
            "--val-split", "tiny_val", "--iters", "4", "--batch-size", "2", "--crop-size",
            "65", "--workers", "0", "--save-every", "1", "--log-every", "1", "--device", "cpu",
            "--output-dir", str(out), *extra]


def train(repo, voc, out, *extra, fault=None, check=True):
    """Run the train.py command line in its own process."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("TRAIN_FAULT", None)
    if fault:
        env["TRAIN_FAULT"] = fault
    argv = [sys.executable, "train.py", *train_argv(voc, out, *extra)]
    proc = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def final_state(out):
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    return ckpt["iteration"], ckpt["model"], ckpt["optimizer"]["state"]


def assert_same_state(a, b):
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k
    for k in a[2]:  # SGD momentum buffers
        assert torch.equal(a[2][k]["momentum_buffer"], b[2][k]["momentum_buffer"]), k


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_after_sigkill_reaches_the_same_weights(repo, tiny_voc, tmp_path):
    ref = tmp_path / "ref"
    train(repo, tiny_voc, ref)
    expected = final_state(ref)

    # Killed after iteration 2's step, before its checkpoint: the run resumes from
    # checkpoint 1 and redoes iteration 2, with more data workers than before.
    run = tmp_path / "killed"
    proc = train(repo, tiny_voc, run, fault="kill-after-iter=2", check=False)
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(run / "checkpoint.pth", weights_only=True)["iteration"] == 1
    train(repo, tiny_voc, run, "--resume", "--workers", "2")
    assert_same_state(final_state(run), expected)

    # Killed in the middle of writing checkpoint 3: checkpoint 2 survives intact.
    run = tmp_path / "mid-save"
    proc = train(repo, tiny_voc, run, fault="kill-mid-save=3", check=False)
    assert proc.returncode == -signal.SIGKILL
    assert (run / "checkpoint.pth.tmp").exists()  # the interrupted write
    assert torch.load(run / "checkpoint.pth", weights_only=True)["iteration"] == 2
    proc = train(repo, tiny_voc, run, "--resume")
    assert "at iteration 2" in proc.stdout
    assert_same_state(final_state(run), expected)
    assert not (run / "checkpoint.pth.tmp").exists()


def test_resume_without_checkpoint_starts_fresh_and_refuses_to_clobber(repo, tiny_voc,
                                                                       tmp_path):
    run = tmp_path / "run"
    proc = train(repo, tiny_voc, run, "--resume", "--iters", "1")  # as torchrun's 1st start
    assert "resume       " not in proc.stdout  # no checkpoint yet: a fresh start
    assert torch.load(run / "checkpoint.pth", weights_only=True)["iteration"] == 1
    before = sha(run / "checkpoint.pth")
    proc = train(repo, tiny_voc, run, "--iters", "1", check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --output-dir")
    assert "--resume" in proc.stderr and "--overwrite" in proc.stderr
    assert sha(run / "checkpoint.pth") == before


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(repo, tiny_voc, tmp_path):
    run = tmp_path / "run"
    proc = train(repo, tiny_voc, run, fault="nan-loss=2", check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "non-finite loss at iteration 2" in last and "checkpoint.pth" in last
    ckpt = torch.load(run / "checkpoint.pth", weights_only=True)
    assert ckpt["iteration"] == 2  # iterations 0 and 1 done; the NaN step never applied
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values()
               if v.is_floating_point())


def test_no_space_left_keeps_the_previous_checkpoint(repo, tiny_voc, tmp_path):
    run = tmp_path / "run"
    proc = train(repo, tiny_voc, run, fault="enospc-save=2", check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "No space left" in last and "iteration 2" in last and "previous checkpoint" in last
    assert torch.load(run / "checkpoint.pth", weights_only=True)["iteration"] == 1
    assert not (run / "checkpoint.pth.tmp").exists()


# ----------------------------------------------------------------------------------------
# Bad input: one line naming the file, id or flag; non-zero exit; the checkpoint survives.


def seg(voc, *parts):
    return voc.joinpath(*SEG, *parts)


def replace(link, data):
    """Replace a symlinked file of the tiny VOC root with our own bytes."""
    link.unlink()
    link.write_bytes(data)


def corrupt_jpeg(voc):
    path = seg(voc, "JPEGImages", "2007_000129.jpg")
    replace(path, path.resolve().read_bytes()[:2000])  # truncated in the entropy data


def corrupt_png(voc):
    path = seg(voc, "SegmentationClass", "2007_000129.png")
    replace(path, path.resolve().read_bytes()[:300])


def wrong_size_label(voc):
    from PIL import Image
    path = seg(voc, "SegmentationClass", "2007_000129.png")
    with Image.open(path.resolve()) as im:
        small = im.resize((100, 100), Image.NEAREST)
    path.unlink()
    small.save(path)


def bad_label_values(voc):
    from PIL import Image
    import numpy as np
    path = seg(voc, "SegmentationClass", "2007_000129.png")
    with Image.open(path.resolve()) as im:
        values = np.array(im)
    values[0, 0] = 42
    path.unlink()
    Image.fromarray(values, mode="L").save(path)


def write_split(name, text):
    return lambda voc: seg(voc, "ImageSets", "Segmentation", f"{name}.txt").write_text(text)


class Exploit:
    """A pickle that would create a file if it were ever executed."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def exploit_checkpoint(tmp):
    path = tmp / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Exploit(str(tmp / "pwned"))}, f)
    return path


def vit_checkpoint(tmp):
    path = tmp / "vit.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 8), "blocks.0.attn.qkv.weight":
                torch.zeros(24, 8)}, path)
    return path


def junk_checkpoint(tmp):
    path = tmp / "junk.pth"
    path.write_bytes(b"\x00not a checkpoint at all")
    return path


BAD_INPUTS = [
    # name, change to the tiny root, extra flags, pattern of the last stderr line
    ("missing data root", None, ["--data-root", "/nonexistent/voc"], r"--data-root"),
    ("missing split", None, ["--train-split", "nope"], r"split 'nope'.*no list file"),
    ("empty split", write_split("tiny_train", "\n"), [], r"split 'tiny_train'.*empty"),
    ("id without image", write_split("tiny_train", "2099_000001\n"), [],
     r"id 2099_000001 has no image"),
    ("id without label", lambda voc: seg(voc, "SegmentationClass", "2007_000129.png").unlink(),
     [], r"id 2007_000129 has no label"),
    ("corrupt jpeg", corrupt_jpeg, [], r"2007_000129.jpg: cannot decode image"),
    ("corrupt png", corrupt_png, [], r"2007_000129.png: cannot decode label"),
    ("label size", wrong_size_label, [], r"id 2007_000129: label .* is 100x100, image"),
    ("label values", bad_label_values, [], r"2007_000129.png: label values \[42\]"),
    ("unknown schedule", None, ["--lr-schedule", "cosine_restarts"],
     r"--lr-schedule 'cosine_restarts' is unknown"),
    ("crop size", None, ["--crop-size", "0"], r"--crop-size must be positive"),
    ("train/val overlap", write_split("tiny_val", "2007_000129\n"), [],
     r"--train-split tiny_train and --val-split tiny_val share 1 ids \(e.g. 2007_000129\)"),
    ("two ids on a line", write_split("tiny_train", "2007_000032 2007_000129\n"), [],
     r"tiny_train.txt line 1 holds 2 fields"),
    ("option of another schedule", None, ["--lr-schedule", "linear", "--poly-power", "2"],
     r"--poly-power applies to --lr-schedule poly, not linear"),
    ("resume and overwrite", None, ["--resume"], r"--resume and --overwrite contradict"),
    ("negative momentum", None, ["--momentum", "-1"], r"--momentum must be >= 0"),
    ("unknown device", None, ["--device", "tpu9"], r"--device tpu9: not a device"),
    ("not resnet-50", vit_checkpoint, [], r"vit.pth: not a recognised ResNet-50"),
    ("not a checkpoint", junk_checkpoint, [], r"junk.pth: not a PyTorch checkpoint"),
    ("pickle with code", exploit_checkpoint, [], r"evil.pth: refused to load"),
]
CHECKPOINTS = (exploit_checkpoint, vit_checkpoint, junk_checkpoint)


@pytest.mark.parametrize("name,change,flags,pattern", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_one_clear_line(repo, tiny_voc, tmp_path, capsys, monkeypatch, name,
                                       change, flags, pattern):
    """train.py's main() with the command line's arguments, in this process: the same code
    path as the command (parsing included) without paying an interpreter start per case."""
    import train as train_script
    monkeypatch.delenv("TRAIN_FAULT", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"sentinel": torch.arange(3)}, run / "checkpoint.pth")  # an earlier run's
    before = sha(run / "checkpoint.pth")
    extra = list(flags)
    if change is not None:
        if change in CHECKPOINTS:
            extra += ["--init", str(change(tmp_path))]
        else:
            change(tiny_voc)
    code = train_script.main(train_argv(tiny_voc, run, "--overwrite", *extra))
    stderr = capsys.readouterr().err
    assert code != 0
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), stderr[-2000:]
    assert re.search(pattern, lines[-1]), lines[-1]
    assert "Traceback" not in stderr
    assert sha(run / "checkpoint.pth") == before
    assert not (tmp_path / "pwned").exists()


def test_eval_refuses_bad_checkpoints(repo, tiny_voc, tmp_path):
    for path in (junk_checkpoint(tmp_path), exploit_checkpoint(tmp_path),
                 vit_checkpoint(tmp_path)):
        proc = subprocess.run([sys.executable, "eval.py", str(path), "--data-root",
                               str(tiny_voc), "--split", "tiny_val", "--workers", "0"],
                              cwd=repo, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and path.name in last
    assert not (tmp_path / "pwned").exists()
    tv = torchvision.models.resnet50().state_dict()  # a backbone, not a segmentation model
    torch.save(tv, tmp_path / "tv.pth")
    proc = subprocess.run([sys.executable, "eval.py", str(tmp_path / "tv.pth"), "--data-root",
                           str(tiny_voc), "--split", "tiny_val"], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "tv.pth" in proc.stderr.strip().splitlines()[-1]


def test_init_must_be_named(repo, tiny_voc, tmp_path):
    """No run starts from random weights because a flag was forgotten."""
    proc = subprocess.run([sys.executable, "train.py", "--data-root", str(tiny_voc),
                           "--output-dir", str(tmp_path / "run")], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--init" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_resume_into_another_runs_folder_is_refused(repo, tiny_voc, tmp_path):
    train(repo, tiny_voc, tmp_path / "a", "--iters", "1")
    train(repo, tiny_voc, tmp_path / "b", "--iters", "1", "--seed", "1")
    before = {p.name: sha(p) for p in (tmp_path / "b").iterdir()}
    proc = train(repo, tiny_voc, tmp_path / "b", "--iters", "1", "--resume",
                 str(tmp_path / "a" / "checkpoint.pth"), check=False)
    assert proc.returncode == 2
    assert "holds another run's checkpoint" in proc.stderr.strip().splitlines()[-1]
    assert {p.name: sha(p) for p in (tmp_path / "b").iterdir()} == before


def evaluate_cli(repo, *argv):
    return subprocess.run([sys.executable, "eval.py", *map(str, argv)], cwd=repo,
                          capture_output=True, text=True, timeout=300)


def test_eval_protects_its_inputs_and_speaks_in_one_line(repo, tiny_voc, tmp_path):
    import model as segmodel
    net = tmp_path / "net.pth"
    torch.save(segmodel.build_model().state_dict(), net)
    common = ["--data-root", tiny_voc, "--split", "tiny_val"]
    before = sha(net)
    cases = [
        (["--json", net], "is the checkpoint being evaluated"),
        (["--json", tmp_path], "is a folder"),
        (["--save-pred", seg(tiny_voc, "SegmentationClass")], "inside the data root"),
        (["--workers", "-1"], "--workers must be >= 0"),
    ]
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "2007_000033.png").write_bytes(b"earlier prediction")
    cases.append((["--save-pred", pred], "already holds 1 of the split's PNGs"))
    for extra, message in cases:
        proc = evaluate_cli(repo, net, *common, *extra)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert sha(net) == before and (pred / "2007_000033.png").read_bytes() == b"earlier " \
        b"prediction"

    # A broken label read in a DataLoader worker: still one line, naming the file.
    corrupt_png_val = seg(tiny_voc, "SegmentationClass", "2007_000033.png")
    replace(corrupt_png_val, corrupt_png_val.resolve().read_bytes()[:300])
    proc = evaluate_cli(repo, net, *common, "--workers", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "2007_000033.png: cannot decode label" in proc.stderr

    # Nothing to score: every label pixel is 255.
    from PIL import Image
    import numpy as np
    corrupt_png_val.unlink()
    Image.fromarray(np.full((366, 500), 255, np.uint8), mode="L").save(corrupt_png_val)
    proc = evaluate_cli(repo, net, *common, "--workers", "0")
    assert proc.returncode == 2 and "no labelled pixels" in proc.stderr

    # A head for another task: refused, not scored on 21 names.
    other = segmodel.build_model(num_classes=5).state_dict()
    torch.save(other, tmp_path / "five.pth")
    proc = evaluate_cli(repo, tmp_path / "five.pth", *common)
    assert proc.returncode == 2 and "5 classes; VOC segmentation has 21" in proc.stderr
