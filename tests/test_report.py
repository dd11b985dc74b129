"""report.py: the results table, the loss/lr figure, bad run folders, the grid launcher.

The table is checked on run folders written here in train.py's format, with mIoU values
chosen so that every mean and sample std is worked out by hand below. Two real runs (2
iterations each, on the shared VOC files, launched by `report.py grid` itself) feed the
figure and the grid's skip logic.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

import report

VOC = "VOCdevkit/VOC2012"

# args.json as train.py writes it at the protocol (keys and defaults of train.py's parser).
PROTOCOL_ARGS = {
    "data_root": "/data/voc", "train_split": "train_aug", "val_split": "val",
    "crop_size": 513, "workers": 4, "init": "random", "init_encoder": "default",
    "conv5_dilation": "all", "align_corners": True, "iters": 30000, "batch_size": 16,
    "lr": 0.003, "lr_schedule": "step", "warmup_iters": 0, "poly_power": None,
    "exp_final_ratio": None, "linear_end_ratio": None, "cosine_floor_ratio": None,
    "match_footprint": None, "weight_decay": 0.0001, "wd_norm_bias": True, "momentum": 0.9,
    "output_dir": None, "resume": None, "overwrite": False, "save_every": 1000,
    "eval_every": 0, "log_every": 20, "seed": 0, "device": "auto", "amp": False,
    "channels_last": True, "compile": False, "deterministic": False, "schedule_options": {},
}
MOCO = {"file": "/ckpt/moco_v1_200ep_pretrain.pth.tar", "sha256": "a" * 64,
        "layout": "moco_v1_v2", "known_release": "MoCo v1 200ep (moco_v1_200ep_pretrain.pth.tar)"}
SUP = {"file": "/ckpt/sup.pth", "sha256": "b" * 64, "layout": "torchvision",
       "known_release": "torchvision IMAGENET1K_V1"}
RANDOM = {"layout": "random", "loaded": 0}


def make_run(root, name, miou=None, seed=0, init=RANDOM, deviations=(), manifest=None,
             log=None, **args):
    """A run folder in train.py's format; miou (a fraction) None leaves it unfinished."""
    folder = root / name
    folder.mkdir(parents=True)
    a = {**PROTOCOL_ARGS, "seed": seed, "output_dir": str(folder),
         "init": init.get("file", "random"), **args}
    run = {"args": a, "init": init, "deviations_from_protocol": list(deviations),
           "world_size": 8, "bn": "SyncBatchNorm", "amp_dtype": None, "seed": seed,
           **(manifest or {})}
    (folder / "args.json").write_text(json.dumps(a))
    (folder / "run.json").write_text(json.dumps(run))
    if log is None:
        log = [{"iter": i, "lr": 0.003, "loss": 1.0 / i} for i in (20, 40, 60)]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    if miou is not None:
        (folder / "eval.json").write_text(json.dumps(
            {"miou": miou, "iteration": a["iters"], "run": run, "warnings": [],
             "split": a["val_split"]}))
    return folder


def run_report(repo, *argv):
    return subprocess.run([sys.executable, "report.py", *map(str, argv)], cwd=repo,
                          capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------------------
# The table, on synthetic run folders


MATCHED = {"match_footprint": "step", "lr_schedule": "linear",
           "schedule_options": {"end_ratio": 0.4423}}


@pytest.fixture(scope="module")
def grid_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for seed, m in enumerate([0.720, 0.725, 0.730, 0.715, 0.720]):
        make_run(root, f"moco-step-seed{seed}", m, seed, MOCO)
    for seed, m in enumerate([0.726, 0.729, 0.723]):
        make_run(root, f"moco-linear-seed{seed}", m, seed, MOCO, lr_schedule="linear",
                 deviations=["lr_schedule='linear'"])
    for seed, m in enumerate([0.724, 0.728]):
        make_run(root, f"moco-linear-matchstep-seed{seed}", m, seed, MOCO, **MATCHED,
                 deviations=["lr_schedule='linear'", "schedule_options={...}"])
    for seed, m in enumerate([0.740, 0.730]):
        make_run(root, f"sup-step-seed{seed}", m, seed, SUP, amp=True,
                 deviations=["amp=True"], manifest={"amp_dtype": "torch.bfloat16"})
    make_run(root, "moco-step-wd5e-4-seed0", 0.700, 0, MOCO, weight_decay=0.0005,
             deviations=["weight_decay=0.0005"])
    # An explicit default option and another schedule's flag change nothing: pooled.
    make_run(root, "random-linear-seed0", 0.100, 0, lr_schedule="linear")
    make_run(root, "random-linear-seed1", 0.120, 1, lr_schedule="linear",
             linear_end_ratio=0.0, poly_power=2.0, schedule_options={"end_ratio": 0.0},
             workers=0, log_every=1, eval_every=100, save_every=10)
    # Not pooled: no eval.json yet; an eval.json left by an earlier run in the folder.
    make_run(root, "moco-step-seed5", None, 5, MOCO)
    stale = make_run(root, "moco-step-seed6", 0.990, 6, MOCO)
    run = json.loads((stale / "run.json").read_text())
    run["git_commit"] = "another"
    (stale / "run.json").write_text(json.dumps(run))
    return root


@pytest.fixture(scope="module")
def table(repo, grid_folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("table")
    folders = sorted(grid_folders.iterdir())
    proc = run_report(repo, *folders, "--table", out / "t.md", "--json", out / "t.json")
    assert proc.returncode == 0, proc.stderr
    markdown = (out / "t.md").read_text(encoding="utf-8")
    assert markdown == proc.stdout.split("wrote ")[0]  # the file is what was printed
    return markdown, json.loads((out / "t.json").read_text())


def by_hand(values):
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)), n


def cell(table_json, row_start, column):
    row = next(r for r in table_json["rows"] if r["label"].startswith(row_start))
    return row, row["cells"][column]


# (row label start, column, mIoU % by hand, mean, sample std (n-1), n)
CELLS = [
    ("moco_v1_200ep_pretrain.pth.tar (moco_v1_v2, aaaaaaaa, MoCo v1 200ep) [weight_decay="
     "0.0001]", "step", [72.0, 72.5, 73.0, 71.5, 72.0], 72.2, math.sqrt(1.30 / 4), 5),
    ("moco_v1_200ep_pretrain.pth.tar (moco_v1_v2, aaaaaaaa, MoCo v1 200ep) [weight_decay="
     "0.0001]", "linear", [72.6, 72.9, 72.3], 72.6, 0.3, 3),
    ("moco_v1_200ep_pretrain.pth.tar (moco_v1_v2, aaaaaaaa, MoCo v1 200ep) [weight_decay="
     "0.0001]", "linear matched to step footprint (end_ratio=0.4423)", [72.4, 72.8], 72.6,
     math.sqrt(0.08), 2),
    ("sup.pth", "step", [74.0, 73.0], 73.5, math.sqrt(0.5), 2),
    ("random", "linear", [10.0, 12.0], 11.0, math.sqrt(2), 2),
]


@pytest.mark.parametrize("row_start, column, values, mean, std, n", CELLS)
def test_table_mean_and_std_match_hand_values(table, grid_folders, row_start, column, values,
                                              mean, std, n):
    _, data = table
    _, c = cell(data, row_start, column)
    # The same numbers read straight from the pooled folders' eval.json files:
    from_folders = [100 * json.loads((grid_folders / os.path.basename(r["folder"]) /
                                      "eval.json").read_text())["miou"] for r in c["runs"]]
    assert from_folders == pytest.approx(values)
    assert by_hand(from_folders) == pytest.approx((mean, std, n))
    assert (c["mean"], c["std"], c["n"]) == pytest.approx((mean, std, n))
    assert [r["seed"] for r in c["runs"]] == list(range(n))
    assert ("n<5" in c["flags"]) == (n < 5)


def test_table_markdown_rows_columns_flags_and_paper(table):
    markdown, data = table
    lines = markdown.splitlines()
    header = next(line for line in lines if line.startswith("| init |"))
    assert header == ("| init | step | linear | linear matched to step footprint "
                      "(end_ratio=0.4423) | MoCo paper (step, mean of 5) |")
    moco = next(line for line in lines if line.startswith("| moco_v1_200ep_pretrain.pth.tar "
                                                          "(moco_v1_v2, aaaaaaaa, MoCo v1 "
                                                          "200ep) [weight_decay=0.0001] |"))
    assert "| 72.20 ± 0.57 (n=5; s0 72.00, s1 72.50, s2 73.00, s3 71.50, s4 72.00) |" in moco
    assert "| 72.60 ± 0.30 (n=3; s0 72.60, s1 72.90, s2 72.30) **n<5** |" in moco
    assert moco.endswith("| 72.5 (MoCo v1 IN-1M 200 epochs) |")
    sup = next(line for line in lines if line.startswith("| sup.pth "))
    note = data["rows"][[r["label"] for r in data["rows"]].index(sup.split(" | ")[0][2:])]
    mark = note["cells"]["step"]["note"]
    assert f"73.50 ± 0.71 (n=2; s0 74.00, s1 73.00) **n<5** [{mark}]" in sup
    assert sup.endswith("| 74.4 (supervised IN-1M) |")
    assert f"- [{mark}] deviates from the protocol: amp=True; amp_dtype=torch.bfloat16" in lines
    # Another weight decay is another experiment: its own row, named by the setting.
    wd = next(line for line in lines if "[weight_decay=0.0005]" in line)
    assert "70.00 ± n/a (n=1; s0 70.00) **n<5** [" in wd
    random_row = next(line for line in lines if line.startswith("| random |"))
    assert random_row.endswith("|  |")  # no paper number for an init it did not report
    # The schedule is the column, not a deviation; protocol runs carry no note.
    assert not any("lr_schedule" in d for ds in data["notes"].values() for d in ds)
    assert "[" not in moco.split(" | ")[1]


def test_table_lists_unfinished_runs_and_pools_none_of_them(table):
    markdown, data = table
    unfinished = {os.path.basename(u["folder"]): u for u in data["unfinished"]}
    assert set(unfinished) == {"moco-step-seed5", "moco-step-seed6"}
    assert unfinished["moco-step-seed5"]["why"] == "no eval.json"
    assert unfinished["moco-step-seed5"]["iter"] == 60
    assert "earlier run" in unfinished["moco-step-seed6"]["why"]
    pooled = [os.path.basename(r["folder"]) for row in data["rows"]
              for c in row["cells"].values() for r in c["runs"]]
    assert len(pooled) == 15 and not set(unfinished) & set(pooled)
    assert "moco-step-seed5: no eval.json (logged to iteration 60 of 30000)" in markdown


def test_paper_number_only_for_the_query_encoder(repo, tmp_path):
    a = make_run(tmp_path, "q", 0.7, 0, MOCO)
    b = make_run(tmp_path, "k", 0.6, 0, MOCO, init_encoder="momentum")
    proc = run_report(repo, a, b)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| moco_v1")]
    assert len(rows) == 2
    assert any("[init_encoder='default']" in r and r.endswith("| 72.5 (MoCo v1 IN-1M 200 "
                                                               "epochs) |") for r in rows)
    assert any("[init_encoder='momentum']" in r and r.endswith("|  |") for r in rows)


def test_repeated_seed_is_flagged(repo, tmp_path):
    a = make_run(tmp_path, "a", 0.5, 0)
    b = make_run(tmp_path, "b", 0.6, 0)
    proc = run_report(repo, a, b, a)  # a folder given twice counts once
    assert proc.returncode == 0, proc.stderr
    assert "55.00 ± 7.07 (n=2; s0 50.00, s0 60.00) **n<5** **repeated seed 0**" in proc.stdout


# ----------------------------------------------------------------------------------------
# Bad input: one line naming the file, non-zero exit


def broken_log(folder):
    (folder / "log.jsonl").write_text('{"iter": 1, "loss": 2.0}\n\n{"iter": 2, "loss": 1.9}\n'
                                      '{"iter": 3, "lo\n')


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "args.json").unlink(), "not a run folder (no args.json)"),
    (lambda f: (f / "run.json").unlink(), "not a run folder (args.json without run.json)"),
    (lambda f: (f / "args.json").write_text("{"), "args.json line 1: not valid JSON"),
    (broken_log, "log.jsonl line 4: not valid JSON"),
    (lambda f: (f / "log.jsonl").write_text('{"loss": 1}\n'), "log.jsonl line 1: not a log"),
    (lambda f: (f / "eval.json").write_text('{"miou": 72.5}'), "miou 72.5 is not a fraction"),
])
def test_bad_run_folder_one_line(repo, tmp_path, damage, message):
    folder = make_run(tmp_path, "run", 0.5)
    damage(folder)
    out = tmp_path / "t.md"
    proc = run_report(repo, folder, "--table", out)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"report.py: error: {folder}")
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()


def test_plot_without_matplotlib_one_line(repo, tmp_path):
    folder = make_run(tmp_path, "run", 0.5)
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; "
            f"sys.argv = ['report.py', {str(folder)!r}, '--plot', {str(tmp_path / 'x.png')!r}]"
            "; runpy.run_path('report.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("report.py: error: --plot needs matplotlib: "
                                   "pip install matplotlib")
    assert not (tmp_path / "x.png").exists()


def test_help_and_no_torch_for_the_table(repo):
    for argv in (["--help"], ["grid", "--help"]):
        proc = run_report(repo, *argv)
        assert proc.returncode == 0 and "usage: report.py" in proc.stdout
    assert "--inits" in proc.stdout and "-- train.py flags" in proc.stdout
    # The table and figure need neither torch nor matplotlib at import.
    code = "import sys, report; assert not {'torch', 'matplotlib'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=repo, check=True, timeout=60)


# ----------------------------------------------------------------------------------------
# Reading logs


def test_resumed_log_keeps_the_last_attempt():
    records = [{"iter": i, "loss": float(i)} for i in (20, 40, 60, 80)]
    records.insert(2, {"iter": 40, "eval": {"miou": 0.1}})
    # Resumed from the checkpoint at 40 after a crash at 80: 60 and 80 are logged again.
    records += [{"iter": 60, "loss": 6.5}, {"iter": 80, "loss": 8.5},
                {"iter": 100, "loss": 10.0}, {"iter": 100, "eval": {"miou": 0.2}, "final": True}]
    kept = report.last_attempt(records)
    assert [(r["iter"], r.get("loss")) for r in kept] == [
        (20, 20.0), (40, 40.0), (40, None), (60, 6.5), (80, 8.5), (100, 10.0), (100, None)]


def test_ema_is_bias_corrected():
    assert report.ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    # s1 = 0.5 * 4 = 2 -> 2 / 0.5 = 4; s2 = 0.5 * 2 + 0.5 * 0 = 1 -> 1 / 0.75
    assert report.ema([4.0, 0.0], 0.5) == pytest.approx([4.0, 1 / 0.75])
    assert report.ema([3.0, 1.0], 0.0) == [3.0, 1.0]


# ----------------------------------------------------------------------------------------
# Real runs: the grid launcher, then the figure


TINY = ["--train-split", "available_aug_train_aug", "--val-split", "tiny_val", "--iters", "2",
        "--batch-size", "2", "--crop-size", "33", "--workers", "0", "--log-every", "1"]


@pytest.fixture(scope="session")
def grid_voc(voc_root, tmp_path_factory):
    """The shared VOC files with a one-image val split, so each final evaluation is short."""
    root = tmp_path_factory.mktemp("voc")
    sets = root / VOC / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug"):
        os.symlink(voc_root / VOC / d, root / VOC / d)
    shutil.copy(voc_root / VOC / "ImageSets" / "Segmentation" / "available_aug_train_aug.txt",
                sets)
    (sets / "tiny_val.txt").write_text("2007_005114\n")  # an official val id, 500x322
    return root


@pytest.fixture(scope="session")
def real_runs(repo, grid_voc, tmp_path_factory):
    """Two real runs (random init, step and linear, seed 0) launched by `report.py grid`."""
    runs = tmp_path_factory.mktemp("grid")
    proc = subprocess.run(
        [sys.executable, "report.py", "grid", "--inits", "random", "--schedules", "step",
         "linear", "--seeds", "0", "--nproc", "1", "--runs-dir", str(runs), "--",
         "--data-root", str(grid_voc), *TINY],
        cwd=repo, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 finished, 0 to resume, 2 to start" in proc.stdout
    for name in ("random-step-seed0", "random-linear-seed0"):
        assert (runs / name / "eval.json").is_file()
        (runs / name / "checkpoint.pth").unlink()  # 230 MB each; nothing below needs them
    return runs


def test_figure_and_table_from_real_runs(repo, real_runs, tmp_path):
    out = tmp_path / "curves.png"
    proc = run_report(repo, real_runs / "random-step-seed0", real_runs / "random-linear-seed0",
                      "--plot", out, "--table", tmp_path / "t.md")
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 20_000
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] >= 1000 and image.size[1] >= 700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "t.md"]  # no temp
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| random |"))
    for name in ("random-step-seed0", "random-linear-seed0"):
        miou = 100 * json.loads((real_runs / name / "eval.json").read_text())["miou"]
        assert f"{miou:.2f} ± n/a (n=1; s0 {miou:.2f}) **n<5** [A]" in row
    assert "crop_size=33; iters=2" in proc.stdout and "val_split='tiny_val'" in proc.stdout


def grid(capsys, runs_dir, *extra, schedules=("step", "linear"), seeds=("0", "1"),
         nproc="2", grid_voc=None):
    argv = ["grid", "--inits", "random", "--schedules", *schedules, "--seeds", *seeds,
            "--nproc", nproc, "--runs-dir", str(runs_dir), "--dry-run", "--",
            "--data-root", str(grid_voc), *TINY, *extra]
    rc = report.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_grid_dry_run_skips_resumes_and_starts(real_runs, grid_voc, tmp_path, capsys):
    shutil.copytree(real_runs / "random-step-seed0", tmp_path / "random-step-seed0")
    resume = tmp_path / "random-linear-seed0"
    shutil.copytree(real_runs / "random-linear-seed0", resume)
    (resume / "eval.json").unlink()
    (resume / "checkpoint.pth").write_bytes(b"")  # only its presence is looked at
    rc, out, err = grid(capsys, tmp_path, grid_voc=grid_voc)
    assert rc == 0, err
    lines = out.splitlines()
    assert "4 runs in" in lines[0] and "1 finished, 1 to resume, 2 to start" in lines[0]
    assert lines[1] == f"[1/4] skip {tmp_path / 'random-step-seed0'} (finished)"
    assert lines[2].startswith(f"[2/4] resume {resume}: ")
    assert lines[2].endswith("--resume") and " --seed 0 " in lines[2]
    # Seeds outermost; two processes per run go through torchrun.
    assert lines[3].startswith(f"[3/4] start {tmp_path / 'random-step-seed1'}: ")
    assert "-m torch.distributed.run --standalone --nproc_per_node=2 " in lines[3]
    assert f"--output-dir {tmp_path / 'random-linear-seed1'} " in lines[4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["random-linear-seed0",
                                                          "random-step-seed0"]

    # The matched variant gets its own folders, so a finished plain run is not skipped.
    rc, out, err = grid(capsys, tmp_path, "--match-footprint", "step", schedules=("linear",),
                        seeds=("0",), grid_voc=grid_voc)
    assert rc == 0, err
    assert f"start {tmp_path / 'random-linear-matchstep-seed0'}: " in out
    assert out.rstrip().endswith("--match-footprint step")


def test_grid_real_rerun_skips_finished(real_runs, grid_voc, capsys):
    argv = ["grid", "--inits", "random", "--schedules", "step", "linear", "--seeds", "0",
            "--nproc", "1", "--runs-dir", str(real_runs), "--", "--data-root", str(grid_voc),
            *TINY, "--workers", "2"]  # workers is not part of the fingerprint
    assert report.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 finished, 0 to resume, 0 to start" in out and out.count("] skip ") == 2
    assert "0 run(s) started" in out


@pytest.mark.parametrize("extra, message", [
    (["--weight-decay", "0.0005"], "holds a run with other settings (weight_decay=0.0001 "
                                   "there, 0.0005 planned)"),
    (["--seed", "3"], "--seed after '--' is set by the grid --seeds"),
    (["--output", "x"], "--output-dir after '--' is set by the grid --runs-dir"),
    (["--no-such-flag"], "train.py flags after '--': unrecognized arguments: --no-such-flag"),
    (["--batch-size", "3"], "train.py: --batch-size 3 does not divide evenly across 2"),
])
def test_grid_bad_input_one_line(real_runs, grid_voc, capsys, extra, message):
    rc, out, err = grid(capsys, real_runs, *extra, seeds=("0",), grid_voc=grid_voc)
    assert rc == 2 and out == ""
    assert err.startswith("report.py grid: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
