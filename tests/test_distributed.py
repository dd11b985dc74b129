"""Exact under torchrun (issue 5), checked on the CPU with two gloo processes on 127.0.0.1."""
import json
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import model as segmodel
import train


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(repo, script, *argv, nproc=2, env=None, check=True):
    """Launch through the c10d rendezvous on 127.0.0.1, the path a multi-node job takes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
           f"--nproc_per_node={nproc}", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", script, *argv]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def tiny_train_args(voc, out, *extra):
    return ["--init", "random", "--data-root", str(voc), "--train-split", "tiny_train",
            "--val-split", "tiny_val",
            "--iters", "2", "--batch-size", "2", "--crop-size", "65", "--workers", "0",
            "--log-every", "1", "--device", "cpu", "--output-dir", str(out), *extra]


def test_two_cpu_processes_train_and_save_a_plain_checkpoint(repo, tiny_voc, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(repo, "train.py", *tiny_train_args(tiny_voc, out))
    assert "world size 2, 1 images per process (2 per iteration)" in proc.stdout
    assert "BatchNorm2d per process (CPU: no SyncBatchNorm)" in proc.stdout
    assert proc.stdout.count("run folder") == 1  # rank 0 alone prints the setup
    log = (out / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["iter"] for x in log if "loss" in x] == [1, 2]  # written once
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["world_size"] == 2 and manifest["batch_per_process"] == 1
    assert "bn=per-process" in manifest["deviations_from_protocol"]
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    segmodel.SegmentationNet().load_state_dict(ckpt["model"], strict=True)


def test_batch_that_does_not_divide_is_refused(repo, tiny_voc, tmp_path):
    proc = torchrun(repo, "train.py", *tiny_train_args(tiny_voc, tmp_path / "run",
                                                       "--batch-size", "3"), check=False)
    assert proc.returncode != 0
    assert "error (rank 0): --batch-size 3 does not divide evenly across 2 processes" in \
        proc.stderr


def test_an_exception_on_one_rank_is_shown_and_fails_the_job(repo, tiny_voc, tmp_path):
    proc = torchrun(repo, "train.py", *tiny_train_args(tiny_voc, tmp_path / "run"),
                    env={"TRAIN_FAULT": "raise-rank1=1"}, check=False)
    assert proc.returncode != 0
    assert "[rank 1] Traceback" in proc.stderr
    assert "RuntimeError: TRAIN_FAULT raise-rank1 at iteration 1" in proc.stderr


def test_eval_under_torchrun_scores_every_image_once(repo, voc_root, tmp_path):
    torch.manual_seed(0)
    torch.save(segmodel.build_model().state_dict(), tmp_path / "net.pth")
    common = [str(tmp_path / "net.pth"), "--data-root", str(voc_root), "--split",
              "available_segclass_val", "--workers", "0", "--device", "cpu"]
    one = subprocess.run([sys.executable, "eval.py", *common, "--json",
                          str(tmp_path / "one.json")], cwd=repo, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun(repo, "eval.py", *common, "--json", str(tmp_path / "two.json"))
    a = json.loads((tmp_path / "one.json").read_text())
    b = json.loads((tmp_path / "two.json").read_text())
    assert a["images"] == b["images"] == 9  # an odd count: no padding, no duplicate
    assert a["confusion_matrix"] == b["confusion_matrix"]  # bit for bit (integer counts)
    assert a["labelled_pixels"] == b["labelled_pixels"] > 0


# ----------------------------------------------------------------------------------------
# The loss normalisation: 2 processes x 2 images give the gradient of 1 process x 4 images.


def _step(rank, world, port, images, labels, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 21, 3, padding=1)  # no BN: per-process BN differs by design
    forward = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    share = len(images) // world
    mine = slice(rank * share, (rank + 1) * share)
    loss, pixels = train.train_step(forward, images[mine], labels[mine], opt, None, None,
                                    world, torch.device("cpu"), it=0)
    if rank == 0:
        torch.save({"weight": net.weight.detach(), "loss": loss, "pixels": pixels}, out)
    if world > 1:
        dist.destroy_process_group()


def test_loss_is_normalised_by_the_global_count_of_labelled_pixels(tmp_path):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 8, 8, generator=g)
    labels = torch.randint(0, 21, (4, 8, 8), generator=g)
    labels[:2, :6] = 255  # the first process's images hold far fewer labelled pixels
    _step(0, 1, 0, images, labels, tmp_path / "one.pt")
    mp.spawn(_step, args=(2, free_port(), images, labels, tmp_path / "two.pt"), nprocs=2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["pixels"] == two["pixels"] == 4 * 64 - 2 * 6 * 8
    assert abs(one["loss"] - two["loss"]) <= 1e-6 * abs(one["loss"])  # float32 sums
    torch.testing.assert_close(two["weight"], one["weight"], rtol=0, atol=1e-6)
    # A per-process mean would differ: check that the test can tell the two apart.
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(3, 21, 3, padding=1)
    per_process = sum(torch.nn.functional.cross_entropy(ref(images[s]), labels[s],
                                                        ignore_index=255) / 2
                      for s in (slice(0, 2), slice(2, 4)))
    per_process.backward()
    assert (ref.weight.detach() - ref.weight.grad - one["weight"]).abs().max() > 1e-4
