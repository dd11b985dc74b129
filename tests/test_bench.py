"""bench.py runs and writes its table (no timing is asserted: speed lives in bench.py)."""
import json
import os
import subprocess
import sys


def test_bench_writes_every_row_side_by_side(repo, voc_root, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "bench.py", "--data-root", str(voc_root), "--crop-size", "33",
         "--batch-size", "2", "--iters", "1", "--data-samples", "4", "--eval-images", "1",
         "--json", str(out)], cwd=repo, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["measure"]: r for r in json.loads(out.read_text())["rows"]}
    for name in ("data: samples/s per worker", "train: images/s"):
        assert rows[name]["ours"] > 0 and rows[name]["baseline"] > 0  # both sides measured
    assert rows["eval: images/s (original size)"]["ours"] > 0
    assert rows["protocol wall time, hours"]["ours"] > 0
    assert "data: samples/s per worker" in proc.stdout
