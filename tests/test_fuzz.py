"""Fuzzing the readers (issue 8): mutated TensorFlow index files and mutated JPEG/PNG files
end in a clear error or a correct read, never a hang or a crash of the interpreter.

Cases run in a separate worker process, one at a time, each under a timeout: a hang or an
interpreter crash (segfault, abort) kills only the worker, which is recorded as a failure
and restarted. One worker serves many cases because starting an interpreter that imports
torch costs about 2.5 s here; that is the price of keeping the case count useful on CI.
Hypothesis is derandomized with a fixed example count, so CI sees the same cases each run.
"""
import json
import os
import selectors
import shutil
import subprocess
import sys

from hypothesis import HealthCheck, given, settings, strategies as st

WORKER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import convert_simclr, data
print("ready", flush=True)
for line in sys.stdin:
    case = json.loads(line)
    try:
        if case["kind"] == "index":
            convert_simclr.read_index(case["path"])
        elif case["kind"] == "image":
            data.read_image(case["path"])
        else:
            data.read_label(case["path"])
        out = {"ok": True}
    except (convert_simclr.CheckpointError, data.DataError) as e:
        out = {"ok": False, "clear": "\n" not in str(e).strip() and case["name"] in str(e),
               "msg": str(e)}
    except Exception as e:  # an error the reader did not turn into a clear message
        out = {"ok": False, "clear": False, "msg": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)
"""

TIMEOUT_S = 20


class Worker:
    """A long-lived reader process; restarted after a hang or a crash."""

    def __init__(self, repo):
        self.repo, self.proc = repo, None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(self.repo)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        # The per-case timeout starts after the imports, which take seconds on a busy machine.
        if not self._answered(120) or self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the fuzz worker did not start")

    def _answered(self, timeout):
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        return bool(sel.select(timeout=timeout))

    def run(self, kind, path):
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps({"kind": kind, "path": str(path),
                                          "name": os.path.basename(path)}) + "\n")
        self.proc.stdin.flush()
        if not self._answered(TIMEOUT_S):
            self.proc.kill()
            self.proc.wait()
            return {"ok": False, "clear": False, "msg": f"hang: no answer in {TIMEOUT_S} s"}
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            return {"ok": False, "clear": False, "msg": f"interpreter crashed ({code})"}
        return json.loads(line)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def mutate(raw, flips, cut):
    """Flip (position, xor) bytes, then optionally truncate to a fraction of the length."""
    buf = bytearray(raw)
    for pos, xor in flips:
        buf[pos % len(buf)] ^= xor or 1
    if cut is not None:
        buf = buf[:int(len(buf) * cut)]
    return bytes(buf)


MUTATIONS = st.tuples(
    st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=0, max_size=4),
    st.one_of(st.none(), st.floats(0.0, 0.999)))
FUZZ = settings(max_examples=25, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


def check(result, where):
    assert result["ok"] or result["clear"], f"{where}: {result['msg']}"


def test_mutated_tensorflow_index(repo, simclr_dir, tmp_path):
    """The real index, mutated; a data shard beside it so only the index is at fault."""
    worker = Worker(repo)
    index = (simclr_dir / "r50_1x" / "model.ckpt-8790.index").read_bytes()
    n = [0]

    @FUZZ
    @given(MUTATIONS)
    def case(mutation):
        n[0] += 1
        prefix = tmp_path / f"case{n[0]}" / "model.ckpt-8790"
        prefix.parent.mkdir()
        path = prefix.parent / "model.ckpt-8790.index"
        path.write_bytes(mutate(index, *mutation))
        check(worker.run("index", path), f"index mutation {mutation}")
        shutil.rmtree(prefix.parent)

    try:
        case()
    finally:
        worker.close()
    assert n[0] == 25


def test_mutated_jpeg_and_png(repo, voc_root, tmp_path):
    worker = Worker(repo)
    base = voc_root / "VOCdevkit" / "VOC2012"
    jpeg = (base / "JPEGImages" / "2007_000033.jpg").read_bytes()
    png = (base / "SegmentationClass" / "2007_000033.png").read_bytes()
    n = [0]

    @FUZZ
    @given(st.sampled_from(["image", "label"]), MUTATIONS)
    def case(kind, mutation):
        n[0] += 1
        path = tmp_path / f"case{n[0]}.{'jpg' if kind == 'image' else 'png'}"
        path.write_bytes(mutate(jpeg if kind == "image" else png, *mutation))
        check(worker.run(kind, path), f"{kind} mutation {mutation}")
        path.unlink()

    try:
        case()
    finally:
        worker.close()
    assert n[0] == 25
