"""schedules.py: values against closed forms, footprints, footprint matching, the command line.

Every expected number here is written out by hand from the schedule's definition (the MoCo
protocol: 30000 iterations, lr 0.003, x0.1 at 21000 and 27000), never read back from the code.
"""
import ast
import json
import math
import subprocess
import sys

import numpy as np
import pytest

import schedules
from schedules import footprint, lr_at, lr_curve, match_footprint

N = 30000
BASE = 0.003
# The protocol's step footprint, summed by hand: 21000 at base, 6000 at base/10, 3000 at
# base/100.
STEP_AREA = BASE * (21000 + 0.1 * 6000 + 0.01 * 3000)
STEP_FRACTION = 0.721


def cos_half(t):
    return (1 + math.cos(math.pi * t)) / 2


# (schedule, options, iteration, expected lr) at 30000 iterations, base 0.003.
VALUES = [
    ("step", {}, 0, BASE),
    ("step", {}, 15000, BASE),
    ("step", {}, 20999, BASE),
    ("step", {}, 21000, 0.1 * BASE),
    ("step", {}, 26999, 0.1 * BASE),
    ("step", {}, 27000, 0.01 * BASE),
    ("step", {}, 29999, 0.01 * BASE),
    ("step", {"milestones": (0.5,), "gamma": 0.5}, 14999, BASE),
    ("step", {"milestones": (0.5,), "gamma": 0.5}, 15000, 0.5 * BASE),
    ("linear", {}, 0, BASE),
    ("linear", {}, 7500, 0.75 * BASE),
    ("linear", {}, 15000, 0.5 * BASE),
    ("linear", {}, 21000, 0.3 * BASE),
    ("linear", {}, 29999, BASE / 30000),
    ("linear", {"end_ratio": 0.2}, 15000, 0.6 * BASE),
    ("linear", {"end_ratio": 0.2}, 29999, BASE * (1 - 0.8 * 29999 / 30000)),
    ("poly", {}, 0, BASE),
    ("poly", {}, 15000, BASE * 0.5 ** 0.9),
    ("poly", {}, 21000, BASE * 0.3 ** 0.9),
    ("poly", {}, 29999, BASE * (1 / 30000) ** 0.9),
    ("poly", {"power": 2}, 15000, 0.25 * BASE),
    ("poly", {"power": 1}, 7500, 0.75 * BASE),
    ("exp", {}, 0, BASE),
    ("exp", {}, 15000, 0.1 * BASE),  # 0.01 ** 0.5
    ("exp", {}, 7500, BASE * 0.01 ** 0.25),
    ("exp", {}, 29999, BASE * 0.01 ** (29999 / 30000)),
    ("exp", {"final_ratio": 0.25}, 15000, 0.5 * BASE),
    ("cosine", {}, 0, BASE),
    ("cosine", {}, 7500, BASE * (1 + math.sqrt(0.5)) / 2),
    ("cosine", {}, 15000, 0.5 * BASE),
    ("cosine", {}, 22500, BASE * (1 - math.sqrt(0.5)) / 2),
    ("cosine", {}, 29999, BASE * cos_half(29999 / 30000)),
    ("cosine", {"floor_ratio": 0.1}, 15000, BASE * (0.1 + 0.9 * 0.5)),
]


@pytest.mark.parametrize("name, options, it, expected", VALUES)
def test_values_against_closed_form(name, options, it, expected):
    assert lr_at(name, it, N, BASE, **options) == pytest.approx(expected, rel=1e-12, abs=0)


def test_protocol_step_exact_iterations():
    # Guards "steps in the wrong unit": 21000 is the first iteration at 0.0003.
    assert lr_at("step", 20999, N, BASE) == BASE
    assert lr_at("step", 21000, N, BASE) == pytest.approx(0.0003, rel=1e-12)
    assert lr_at("step", 27000, N, BASE) == pytest.approx(0.00003, rel=1e-12)


def test_milestones_with_float_rounding():
    # 0.9 * 90 is 81.00000000000001 in floats; the drop must still be at iteration 81.
    assert lr_at("step", 80, 90, 1.0, milestones=(0.9,)) == 1.0
    assert lr_at("step", 81, 90, 1.0, milestones=(0.9,)) == pytest.approx(0.1)
    # Not an integer: the first iteration at or after 0.7 * 15 = 10.5 is 11.
    assert lr_at("step", 10, 15, 1.0) == 1.0
    assert lr_at("step", 11, 15, 1.0) == pytest.approx(0.1)


@pytest.mark.parametrize("name", schedules.SCHEDULES)
def test_curve_equals_lr_at(name):
    total = 1000
    curve = lr_curve(name, total, BASE, warmup_iters=50)
    assert curve.shape == (total,) and curve.dtype == np.float64
    expected = [lr_at(name, it, total, BASE, warmup_iters=50) for it in range(total)]
    np.testing.assert_array_equal(curve, expected)


@pytest.mark.parametrize("name", schedules.SCHEDULES)
def test_decreases_and_is_not_constant(name):
    curve = lr_curve(name, N, BASE)
    assert curve[0] == pytest.approx(BASE, rel=1e-12)
    assert np.all(np.diff(curve) <= 0), "an lr schedule must never rise after warmup"
    assert curve[-1] < 0.05 * BASE, "default schedules end far below the base lr"
    # Not a handful of flat segments in the wrong unit: step has 3 levels, the others many.
    levels = len(np.unique(curve))
    assert levels == 3 if name == "step" else levels > N // 2


# Closed forms of the footprint, sum over it = 0..N-1, derived by hand:
#   linear: sum(1 - (1 - e) i / N)             = N - (1 - e) (N - 1) / 2
#   cosine: sum(f + (1 - f)(1 + cos(pi i/N))/2) = N - (1 - f) (N - 1) / 2,
#           using sum_{i<N} cos(pi i / N) = 1
#   exp:    sum(r ** (i / N))                   = (1 - r) / (1 - r ** (1 / N))
#   poly:   sum((1 - i / N) ** p)               = sum_{k=1..N} (k / N) ** p
def linear_area(e, n=N, base=BASE):
    return base * (n - (1 - e) * (n - 1) / 2)


def exp_area(r, n=N, base=BASE):
    return base * (1 - r) / (1 - r ** (1 / n))


def poly_area(p, n=N, base=BASE):
    return base * math.fsum((k / n) ** p for k in range(1, n + 1))


@pytest.mark.parametrize("name, options, expected", [
    ("step", {}, STEP_AREA),
    ("step", {"milestones": (0.5,), "gamma": 0.5}, BASE * (15000 + 0.5 * 15000)),
    ("linear", {}, linear_area(0.0)),
    ("linear", {"end_ratio": 0.3}, linear_area(0.3)),
    ("cosine", {}, linear_area(0.0)),
    ("cosine", {"floor_ratio": 0.3}, linear_area(0.3)),
    ("exp", {}, exp_area(0.01)),
    ("exp", {"final_ratio": 0.5}, exp_area(0.5)),
    ("poly", {}, poly_area(0.9)),
    ("poly", {"power": 1}, BASE * (N + 1) / 2),
    ("poly", {"power": 0}, BASE * N),
])
def test_footprint_against_closed_form(name, options, expected):
    assert footprint(name, N, BASE, **options) == pytest.approx(expected, rel=1e-12)


def test_step_footprint_fraction():
    assert STEP_AREA == pytest.approx(64.89, rel=1e-12)
    assert footprint("step", N, BASE) / (BASE * N) == pytest.approx(STEP_FRACTION, rel=1e-12)


def test_footprint_with_warmup():
    w = 1000
    # Iterations 0..w-1 carry (i + 1) / w of base: sum = (w + 1) / 2 base instead of w base.
    expected = STEP_AREA - BASE * w + BASE * (w + 1) / 2
    assert footprint("step", N, BASE, warmup_iters=w) == pytest.approx(expected, rel=1e-12)
    # linear: sum over i < w of (i + 1) / w * (1 - i / N), written out.
    warm = sum((i + 1) / w * (1 - i / N) for i in range(w))
    rest = sum(1 - i / N for i in range(w, N))
    assert footprint("linear", N, BASE, warmup_iters=w) == pytest.approx(BASE * (warm + rest),
                                                                         rel=1e-12)


def test_warmup_values():
    w = 1000
    assert lr_at("step", 0, N, BASE, warmup_iters=w) == pytest.approx(BASE / 1000, rel=1e-12)
    assert lr_at("step", 499, N, BASE, warmup_iters=w) == pytest.approx(BASE / 2, rel=1e-12)
    assert lr_at("step", 999, N, BASE, warmup_iters=w) == BASE
    assert lr_at("step", 1000, N, BASE, warmup_iters=w) == BASE
    assert lr_at("step", 21000, N, BASE, warmup_iters=w) == pytest.approx(0.1 * BASE)
    # The warmup multiplies the schedule's own value, which keeps decaying underneath.
    assert lr_at("linear", 499, N, BASE, warmup_iters=w) == pytest.approx(
        BASE * 0.5 * (1 - 499 / N), rel=1e-12)
    assert lr_at("cosine", 999, N, BASE, warmup_iters=w) == pytest.approx(
        BASE * cos_half(999 / N), rel=1e-12)
    curve = lr_curve("poly", N, BASE, warmup_iters=w)
    assert np.all(np.diff(curve[:w]) > 0) and np.all(np.diff(curve[w - 1:]) <= 0)


# Matched to step's 0.721: linear and cosine share the closed form above, so both end at
# e = 1 - 2 N (1 - 0.721) / (N - 1), about 0.442.
MATCHED_END = 1 - 2 * N * (1 - STEP_FRACTION) / (N - 1)


def test_matched_end_ratio_from_closed_form():
    assert MATCHED_END == pytest.approx(0.44198, abs=1e-5)
    assert match_footprint("linear", N, BASE)["end_ratio"] == pytest.approx(MATCHED_END,
                                                                            rel=1e-9)
    assert match_footprint("cosine", N, BASE)["floor_ratio"] == pytest.approx(MATCHED_END,
                                                                              rel=1e-9)


@pytest.mark.parametrize("name, option, low, high, area", [
    ("linear", "end_ratio", 0.43, 0.45, linear_area),
    ("cosine", "floor_ratio", 0.43, 0.45, linear_area),
    # Continuous estimates: 1 / (p + 1) = 0.721 gives p = 0.387; (1 - r) / -ln r = 0.721
    # gives r = 0.50.
    ("poly", "power", 0.37, 0.40, poly_area),
    ("exp", "final_ratio", 0.48, 0.52, exp_area),
])
def test_match_step_footprint(name, option, low, high, area):
    opts = match_footprint(name, N, BASE, target="step")
    assert set(opts) == {option}
    assert low < opts[option] < high
    assert footprint(name, N, BASE, **opts) == pytest.approx(STEP_AREA, rel=1e-9)
    # Checked through the hand-derived closed form too, not only through the code.
    assert area(opts[option]) == pytest.approx(STEP_AREA, rel=1e-6)


@pytest.mark.parametrize("name", ["linear", "poly", "exp", "cosine"])
def test_match_with_warmup_hits_target_with_the_same_warmup(name):
    opts = match_footprint(name, 3000, BASE, warmup_iters=300)
    assert opts["warmup_iters"] == 300
    target = footprint("step", 3000, BASE, warmup_iters=300)
    assert footprint(name, 3000, BASE, **opts) == pytest.approx(target, rel=1e-9)


def test_match_step_to_itself_and_impossible_matches():
    assert match_footprint("step", N, BASE) == {}
    with pytest.raises(ValueError, match="step has no continuous option"):
        match_footprint("step", N, BASE, target="linear")
    # A step that drops at 10% and 20% has 0.1108 of the area; linear cannot go below ~0.5.
    with pytest.raises(ValueError, match="linear cannot reach the footprint"):
        match_footprint("linear", N, BASE, target_options={"milestones": (0.1, 0.2)})
    with pytest.raises(ValueError, match="poly option power .*solves for"):
        match_footprint("poly", N, BASE, power=0.9)


@pytest.mark.parametrize("call, message", [
    (lambda: lr_at("steps", 0, N, BASE), "unknown schedule 'steps'"),
    (lambda: lr_at("poly", 0, N, BASE, powr=1), "unknown option 'powr'"),
    (lambda: lr_at("linear", 0, N, BASE, power=1), "unknown option 'power'"),
    (lambda: lr_at("poly", 0, N, BASE, power=-1), r"power \(--poly-power\) must be >= 0"),
    (lambda: lr_at("exp", 0, N, BASE, final_ratio=0), r"final_ratio \(--exp-final-ratio\)"),
    (lambda: lr_at("exp", 0, N, BASE, final_ratio=-0.1), "final_ratio"),
    (lambda: lr_at("linear", 0, N, BASE, end_ratio=1.5), r"end_ratio \(--linear-end-ratio\)"),
    (lambda: lr_at("cosine", 0, N, BASE, floor_ratio=-1), "floor_ratio"),
    (lambda: lr_at("step", 0, N, BASE, milestones=(0.9, 0.7)), "strictly increasing"),
    (lambda: lr_at("step", 0, N, BASE, milestones=(21000, 27000)), "iteration counts"),
    (lambda: lr_at("step", 0, N, BASE, gamma=0), "gamma"),
    (lambda: lr_at("step", 0, N, BASE, warmup_iters=-1), r"warmup_iters \(--warmup-iters\)"),
    (lambda: lr_at("step", 0, N, BASE, warmup_iters=N + 1), "warmup_iters"),
    (lambda: lr_at("step", N, N, BASE), r"it must be .*\[0, total_iters=30000\)"),
    (lambda: lr_at("step", -1, N, BASE), "it must be"),
    (lambda: lr_at("step", 1.5, N, BASE), "it must be an integer"),
    (lambda: lr_at("step", 0, 0, BASE), "total_iters must be > 0"),
    (lambda: lr_at("step", 0, N, 0.0), "base_lr must be"),
    (lambda: lr_at("step", 0, N, -0.003), "base_lr must be"),
    (lambda: footprint("poly", N, BASE, power=float("nan")), "power .* must be finite"),
    (lambda: match_footprint("linear", N, BASE, target="nope"), "unknown schedule 'nope'"),
])
def test_bad_input_raises_naming_the_option(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_defaults_and_flags_exposed():
    assert schedules.SCHEDULES == ("step", "linear", "poly", "exp", "cosine")
    assert set(schedules.DEFAULT_OPTIONS) == set(schedules.SCHEDULES)
    assert schedules.DEFAULT_OPTIONS["poly"]["power"] == 0.9
    assert schedules.DEFAULT_OPTIONS["exp"]["final_ratio"] == 0.01
    assert schedules.DEFAULT_OPTIONS["step"]["milestones"] == (0.7, 0.9)
    for name, opts in schedules.DEFAULT_OPTIONS.items():
        assert opts["warmup_iters"] == 0
        assert footprint(name, 100, 1.0, **opts) == footprint(name, 100, 1.0)
    assert set(schedules.OPTION_FLAGS.values()) == {
        "--warmup-iters", "--poly-power", "--exp-final-ratio", "--linear-end-ratio",
        "--cosine-floor-ratio"}


def test_imports_only_stdlib_and_numpy(repo):
    tree = ast.parse((repo / "schedules.py").read_text())
    top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import)
           for alias in node.names}
    top |= {node.module.split(".")[0] for node in tree.body
            if isinstance(node, ast.ImportFrom)}
    assert top <= set(sys.stdlib_module_names) | {"numpy"}, top
    code = "import sys, schedules; assert 'torch' not in sys.modules and 'matplotlib' " \
           "not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=repo, check=True)


# ---- command line -------------------------------------------------------------------------

def run_cli(repo, *args):
    return subprocess.run([sys.executable, "schedules.py", *args], cwd=repo,
                          capture_output=True, text=True, timeout=120)


def test_cli_help(repo):
    result = run_cli(repo, "--help")
    assert result.returncode == 0
    assert "--match-footprint" in result.stdout and "--warmup-iters" in result.stdout


def test_cli_table_shows_footprints(repo, tmp_path):
    out = tmp_path / "table.json"
    result = run_cli(repo, "--table", "--json", str(out))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    step_row = next(line for line in lines if line.startswith("| step |"))
    assert "| 64.89 | 0.721000 |" in step_row
    for it in ("0", "7500", "15000", "20999", "21000", "27000", "29999"):
        assert f"lr@{it}" in lines[1]
    linear_row = next(line for line in lines if line.startswith("| linear |"))
    assert "| 0.500017 |" in linear_row  # (N + 1) / (2 N)
    table = json.loads(out.read_text())
    assert table["schedules"]["step"]["footprint"] == pytest.approx(STEP_AREA, rel=1e-12)
    assert table["schedules"]["step"]["lr"]["21000"] == pytest.approx(0.0003, rel=1e-12)
    assert table["iterations"] == [0, 7500, 15000, 20999, 21000, 27000, 29999]


def test_cli_table_matched(repo):
    result = run_cli(repo, "--table", "--match-footprint", "step")
    assert result.returncode == 0, result.stderr
    assert "footprint-matched to step" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 5 and all(line.endswith("| 64.89 | 0.721000 |") for line in rows)
    assert "end_ratio=0.442" in result.stdout


@pytest.mark.parametrize("extra", [[], ["--match-footprint", "step", "--warmup-iters", "500"]])
def test_cli_plot_writes_png(repo, tmp_path, extra):
    from PIL import Image

    out = tmp_path / "schedules.png"
    result = run_cli(repo, "--plot", str(out), *extra)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 10_000
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size[0] >= 800 and image.size[1] >= 400
    assert [p.name for p in tmp_path.iterdir()] == ["schedules.png"]  # no temp file left


@pytest.mark.parametrize("args, message", [
    (["--no-such-flag"], "unrecognized arguments"),
    (["--iters", "0"], "total_iters must be > 0"),
    (["--lr", "-1"], "base_lr must be"),
    (["--poly-power", "-2"], "--poly-power"),
    (["--match-footprint", "step", "--poly-power", "2"], "conflicts with --match-footprint"),
    (["--warmup-iters", "40000"], "--warmup-iters"),
    (["--match-footprint", "sgd"], "invalid choice"),
    (["--plot", "/nonexistent-folder/x.png"], "does not exist"),
    (["--json", "tests"], "is a folder"),
])
def test_cli_bad_input_one_line(repo, args, message):
    result = run_cli(repo, *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_cli_plot_without_matplotlib(repo, tmp_path):
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; "
            f"sys.argv = ['schedules.py', '--plot', {str(tmp_path / 'x.png')!r}]; "
            "runpy.run_path('schedules.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip() == ("schedules.py: error: plotting needs matplotlib: "
                                     "pip install matplotlib")
    assert not (tmp_path / "x.png").exists()


def test_run_length_too_long_for_memory_is_refused_not_oom_killed():
    with pytest.raises(ValueError, match="total_iters 1000000000 is more than 10,000,000"):
        schedules.footprint("linear", 1_000_000_000, 0.003)
