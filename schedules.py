"""Learning-rate schedules as pure functions of the iteration, their footprints, and plots.

Offers the five schedules the VOC fine-tuning study compares (`step`, the MoCo protocol's
x0.1 at 70% and 90%; `linear`; `poly`; `exp`; `cosine`), each with an optional linear
warmup; `footprint`, the area under the lr curve over a run; and `match_footprint`, which
picks a schedule's free option so that its footprint equals the step schedule's. No state,
no torch, nothing else from this repository: copy the file alone into your own loop:

    from schedules import lr_at
    for g in optimizer.param_groups: g["lr"] = lr_at("linear", it, 30000, 0.003)

Conventions. lr values are in the optimizer's units. Iterations are 0-based: the lr used at
iteration `it`, for `it` in [0, total_iters), is `lr_at(name, it, total_iters, base_lr)`.
The decay variable is t = it / total_iters, so a schedule's end value is reached at
t = 1 (it == total_iters, just after the last update) and the last iteration uses
t = 1 - 1/total_iters; step milestones are fractions of total_iters on the same t.

Command line (figure, table, JSON):

    python schedules.py --plot schedules.png [--iters 30000 --lr 0.003] [--match-footprint step]
    python schedules.py --table [--json table.json]
"""
import argparse
import json
import math
import os
import pathlib
import sys

import numpy as np

SCHEDULES = ("step", "linear", "poly", "exp", "cosine")

# Every option of every schedule with its default; train.py builds its flags from these.
DEFAULT_OPTIONS = {
    "step": {"milestones": (0.7, 0.9), "gamma": 0.1, "warmup_iters": 0},
    "linear": {"end_ratio": 0.0, "warmup_iters": 0},
    "poly": {"power": 0.9, "warmup_iters": 0},
    "exp": {"final_ratio": 1e-2, "warmup_iters": 0},
    "cosine": {"floor_ratio": 0.0, "warmup_iters": 0},
}

# The command-line flag of an option, named in error messages so a user finds what to fix.
OPTION_FLAGS = {
    "warmup_iters": "--warmup-iters",
    "power": "--poly-power",
    "final_ratio": "--exp-final-ratio",
    "end_ratio": "--linear-end-ratio",
    "floor_ratio": "--cosine-floor-ratio",
}

# The option `match_footprint` solves for; `step` has none (its milestones are discrete).
MATCHED_OPTION = {"linear": "end_ratio", "poly": "power", "exp": "final_ratio",
                  "cosine": "floor_ratio"}

MAX_ITERS = 10_000_000
_PROTOCOL_ITERS = 30000
_PROTOCOL_LR = 0.003


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------

def _label(name, option):
    flag = OPTION_FLAGS.get(option)
    return f"{name} option {option}" + (f" ({flag})" if flag else "")


def _number(name, option, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{_label(name, option)} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{_label(name, option)} must be finite, got {value}")
    return value


def _integer(what, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return int(value)


def _check_schedule(name):
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def _check_run(total_iters, base_lr):
    total_iters = _integer("total_iters", total_iters)
    if total_iters <= 0:
        raise ValueError(f"total_iters must be > 0, got {total_iters}")
    if total_iters > MAX_ITERS:  # footprints hold the whole curve: 8 bytes per iteration
        raise ValueError(f"total_iters {total_iters} is more than {MAX_ITERS:,}; footprints "
                         "would not fit in memory")
    if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float, np.number)):
        raise ValueError(f"base_lr must be a number, got {base_lr!r}")
    base_lr = float(base_lr)
    if not (math.isfinite(base_lr) and base_lr > 0):
        raise ValueError(f"base_lr must be a finite number > 0, got {base_lr}")
    return total_iters, base_lr


def _resolve(name, total_iters, options):
    """The schedule's full, validated option dict: defaults overridden by `options`."""
    _check_schedule(name)
    known = DEFAULT_OPTIONS[name]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for schedule {name!r} "
                         f"(its options: {', '.join(known)})")
    opts = {**known, **options}

    warmup = _integer(_label(name, "warmup_iters"), opts["warmup_iters"])
    if not 0 <= warmup <= total_iters:
        raise ValueError(f"{_label(name, 'warmup_iters')} must be in [0, total_iters="
                         f"{total_iters}], got {warmup}")
    opts["warmup_iters"] = warmup

    if name == "step":
        milestones = opts["milestones"]
        if isinstance(milestones, (str, bytes)) or not hasattr(milestones, "__iter__"):
            raise ValueError(f"step option milestones must be a sequence of fractions of "
                             f"total_iters, got {milestones!r}")
        milestones = tuple(_number(name, "milestones", m) for m in milestones)
        for m in milestones:
            if not 0 < m < 1:
                hint = " (iteration counts? give fractions, e.g. 0.7)" if m >= 1 else ""
                raise ValueError(f"step option milestones must be fractions of total_iters "
                                 f"in (0, 1), got {m:g}{hint}")
        if any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise ValueError(f"step option milestones must be strictly increasing, got "
                             f"{', '.join(f'{m:g}' for m in milestones)}")
        opts["milestones"] = milestones
        gamma = _number(name, "gamma", opts["gamma"])
        if not 0 < gamma <= 1:
            raise ValueError(f"step option gamma must be in (0, 1], got {gamma:g}")
        opts["gamma"] = gamma
    elif name == "poly":
        power = _number(name, "power", opts["power"])
        if power < 0:
            raise ValueError(f"{_label(name, 'power')} must be >= 0, got {power:g}")
        opts["power"] = power
    elif name == "exp":
        ratio = _number(name, "final_ratio", opts["final_ratio"])
        if not 0 < ratio <= 1:
            raise ValueError(f"{_label(name, 'final_ratio')} must be in (0, 1] (an exponential "
                             f"never reaches 0), got {ratio:g}")
        opts["final_ratio"] = ratio
    else:
        option = MATCHED_OPTION[name]
        ratio = _number(name, option, opts[option])
        if not 0 <= ratio <= 1:
            raise ValueError(f"{_label(name, option)} must be in [0, 1], got {ratio:g}")
        opts[option] = ratio
    return opts


def milestone_iter(fraction, total_iters):
    """The first 0-based iteration at or after `fraction` of `total_iters` (an int).

    That is ceil(fraction * total_iters), where a product within 1e-9 of an integer counts as
    that integer: 0.9 * 90 is 81.00000000000001 in floating point and must give 81, not 82.
    With the defaults, 0.7 and 0.9 of 30000 are iterations 21000 and 27000.
    """
    x = fraction * total_iters
    nearest = round(x)
    if abs(x - nearest) <= 1e-9 * max(1.0, abs(x)):
        return int(nearest)
    return math.ceil(x)


# ----------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------

def _curve(name, its, total_iters, base_lr, opts):
    """lr at the int64 iterations `its` (any shape); options already resolved."""
    t = its / total_iters
    if name == "step":
        passed = np.zeros(its.shape, dtype=np.int64)
        for m in opts["milestones"]:
            passed += its >= milestone_iter(m, total_iters)
        mult = opts["gamma"] ** passed
    elif name == "linear":
        mult = 1.0 - (1.0 - opts["end_ratio"]) * t
    elif name == "poly":
        mult = (1.0 - t) ** opts["power"]
    elif name == "exp":
        # exp(t ln r) rather than r**t so that a tiny r from footprint matching stays exact.
        mult = np.exp(t * math.log(opts["final_ratio"]))
    else:
        floor = opts["floor_ratio"]
        mult = floor + (1.0 - floor) * 0.5 * (1.0 + np.cos(math.pi * t))
    warmup = opts["warmup_iters"]
    if warmup > 0:
        # (it + 1) / warmup, so the first iteration already moves and iteration warmup - 1
        # reaches the schedule's own value.
        mult = mult * np.minimum(1.0, (its + 1) / warmup)
    return base_lr * mult


def lr_at(name, it, total_iters, base_lr, **options):
    """The learning rate to use at 0-based iteration `it` of a run of `total_iters` iterations.

    Returns a float in the units of `base_lr` (the optimizer's). With t = it / total_iters,
    the lr is base_lr * w(it) * m(t), where the warmup factor
    w(it) = min(1, (it + 1) / warmup_iters) (1 when warmup_iters = 0) multiplies the
    schedule's own value, and m(t) is, per schedule (options and defaults in DEFAULT_OPTIONS):

    - step:   gamma ** k, k = number of milestones (fractions of total_iters, default
              (0.7, 0.9)) with it >= milestone_iter(milestone); gamma default 0.1. The MoCo
              protocol: 30000 iterations, 0.003, then 0.0003 from 21000, 0.00003 from 27000.
    - linear: 1 - (1 - end_ratio) * t; end_ratio default 0 (to 0 at the end, t = 1).
    - poly:   (1 - t) ** power; power default 0.9; no minimum lr.
    - exp:    final_ratio ** t; final_ratio default 1e-2, reached at the end.
    - cosine: floor_ratio + (1 - floor_ratio) * (1 + cos(pi * t)) / 2; floor_ratio default 0.

    Raises ValueError, naming the option, for an unknown schedule or option, an invalid value,
    `it` outside [0, total_iters), total_iters <= 0 or base_lr <= 0.
    """
    _check_schedule(name)
    total_iters, base_lr = _check_run(total_iters, base_lr)
    it = _integer("it", it)
    if not 0 <= it < total_iters:
        raise ValueError(f"it must be a 0-based iteration in [0, total_iters={total_iters}), "
                         f"got {it}")
    opts = _resolve(name, total_iters, options)
    return float(_curve(name, np.array([it], dtype=np.int64), total_iters, base_lr, opts)[0])


def lr_curve(name, total_iters, base_lr, **options):
    """lr_at over a whole run: a float64 array of shape (total_iters,), entry i = lr at it = i.

    Same options and errors as `lr_at`; one vectorised call instead of total_iters calls.
    """
    _check_schedule(name)
    total_iters, base_lr = _check_run(total_iters, base_lr)
    opts = _resolve(name, total_iters, options)
    return _curve(name, np.arange(total_iters, dtype=np.int64), total_iters, base_lr, opts)


def footprint(name, total_iters, base_lr, **options):
    """The area under the lr curve: the sum of lr_at over it = 0 .. total_iters - 1.

    Warmup included. A float in lr x iterations (for step at the protocol,
    0.003 * (21000 + 0.1 * 6000 + 0.01 * 3000) = 64.89, i.e. 0.721 of base_lr * total_iters).
    """
    return math.fsum(lr_curve(name, total_iters, base_lr, **options))


def match_footprint(name, total_iters, base_lr, target="step", target_options=None,
                    **fixed_options):
    """Options for `name` whose footprint equals that of `target` at the same lr and length.

    Solves by bisection for the schedule's free option (MATCHED_OPTION: linear end_ratio,
    poly power, exp final_ratio, cosine floor_ratio) to 1e-12 relative; the other options are
    `fixed_options`. Warmup is a setting of the run, so `fixed_options["warmup_iters"]`
    applies to the target as well; `target_options` (a dict) sets the target's options and
    takes precedence, warmup included.
    Returns the dict to pass to lr_at: `fixed_options` plus the matched option (a float).
    `step` has no free option: it returns `fixed_options` when the footprints already agree
    ({} for step against step) and raises otherwise.

    Raises ValueError when the schedule cannot reach the target's footprint for any value of
    its option (say so with the reachable range), or when the free option is passed fixed.
    """
    _check_schedule(name)
    _check_schedule(target)
    total_iters, base_lr = _check_run(total_iters, base_lr)
    _resolve(name, total_iters, fixed_options)
    shared = {k: v for k, v in fixed_options.items() if k == "warmup_iters"}
    goal = footprint(target, total_iters, base_lr, **{**shared, **(target_options or {})})
    scale = base_lr * total_iters

    if name == "step":
        own = footprint(name, total_iters, base_lr, **fixed_options)
        if math.isclose(own, goal, rel_tol=1e-12):
            return dict(fixed_options)
        raise ValueError(f"step has no continuous option to match the footprint of {target} "
                         f"({goal / scale:.6f} of base_lr*total_iters); its own is "
                         f"{own / scale:.6f}")

    option = MATCHED_OPTION[name]
    if option in fixed_options:
        raise ValueError(f"{_label(name, option)} is what match_footprint solves for; "
                         f"do not fix it")

    # Search in a variable in which the footprint is monotone and the range is finite.
    # exp: the log of final_ratio, down to the smallest normal float (ratio 2.2e-308).
    lo, hi, to_value = 0.0, 1.0, float
    if name == "exp":
        lo, hi, to_value = math.log(sys.float_info.min), 0.0, math.exp

    def area(x):
        return footprint(name, total_iters, base_lr, **fixed_options, **{option: to_value(x)})

    if name == "poly":
        # A larger power only lowers the curve; grow the bracket until it passes the goal.
        while area(hi) > goal and hi < 2.0 ** 40:
            hi *= 2.0
    a_lo, a_hi = area(lo), area(hi)
    low, high = min(a_lo, a_hi), max(a_lo, a_hi)
    if not low * (1 - 1e-12) <= goal <= high * (1 + 1e-12):
        raise ValueError(f"{name} cannot reach the footprint of {target} "
                         f"({goal / scale:.6f} of base_lr*total_iters): {option} in its valid "
                         f"range gives {low / scale:.6f} to {high / scale:.6f}")
    increasing = a_hi > a_lo
    best, best_err = min((abs(a_lo - goal), lo), (abs(a_hi - goal), hi))[::-1]
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        a_mid = area(mid)
        if abs(a_mid - goal) < best_err:
            best, best_err = mid, abs(a_mid - goal)
        if best_err <= 1e-13 * goal:
            break
        if (a_mid < goal) == increasing:
            lo = mid
        else:
            hi = mid
    return {**fixed_options, option: to_value(best)}


# ----------------------------------------------------------------------------------------
# Table and figure
# ----------------------------------------------------------------------------------------

def table_iterations(total_iters):
    """The iterations the table shows: 0, 25%, 50%, 70% - 1, 70%, 90%, last (deduplicated)."""
    marks = [0, total_iters // 4, total_iters // 2, milestone_iter(0.7, total_iters) - 1,
             milestone_iter(0.7, total_iters), milestone_iter(0.9, total_iters), total_iters - 1]
    return sorted({m for m in marks if 0 <= m < total_iters})


def schedule_table(total_iters, base_lr, options_by_name):
    """Per schedule: its options, lr at `table_iterations`, footprint and footprint fraction.

    `options_by_name` maps each schedule to draw to its lr_at options. Returns plain data
    (JSON-ready): {"iterations": [...], "schedules": {name: {...}}}.
    """
    iters = table_iterations(total_iters)
    rows = {}
    for name, opts in options_by_name.items():
        curve = lr_curve(name, total_iters, base_lr, **opts)
        area = math.fsum(curve)
        rows[name] = {"options": _as_plain(opts),
                      "lr": {str(i): float(curve[i]) for i in iters},
                      "footprint": area,
                      "footprint_fraction": area / (base_lr * total_iters)}
    return {"iterations": iters, "schedules": rows}


def _temp_name(path):
    # Beside the target so os.replace is atomic; opened normally (not mkstemp's 0600) so the
    # result gets the user's usual permissions.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")


def _as_plain(opts):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}


def _short(opts):
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in opts.items())


def format_table(table):
    """The table as markdown lines (lr with 6 significant digits)."""
    iters = table["iterations"]
    head = ["schedule", "options"] + [f"lr@{i}" for i in iters] + ["footprint", "fraction"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in table["schedules"].items():
        cells = [name, _short(row["options"]) or "-"]
        cells += [f"{row['lr'][str(i)]:.6g}" for i in iters]
        cells += [f"{row['footprint']:.6g}", f"{row['footprint_fraction']:.6f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_schedules(path, total_iters, base_lr, options_by_name, title):
    """Draw every schedule's lr against the iteration into `path` (format from its suffix).

    The legend gives each schedule's options and footprint. Needs matplotlib (drawn by the
    Agg canvas without pyplot, so no display and no change to the caller's backend); raises
    ImportError with a one-line message when it is missing. The file is
    written to a temporary name and moved into place, so a failure leaves `path` untouched.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from None

    path = pathlib.Path(path)
    its = np.arange(total_iters)
    scale = base_lr * total_iters
    fig = Figure(figsize=(10, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, opts in options_by_name.items():
        curve = lr_curve(name, total_iters, base_lr, **opts)
        area = math.fsum(curve)
        label = f"{name} ({_short(opts) or 'defaults'}): footprint {area:.4g} = " \
                f"{area / scale:.3f} x lr x iters"
        ax.plot(its, curve, label=label, linewidth=1.6)
    ax.set_xlabel("iteration (0-based)")
    ax.set_ylabel("learning rate")
    ax.set_xlim(0, total_iters)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = _temp_name(path)
    try:
        # The format from the user's suffix (png without one), not from the temporary name.
        fig.savefig(tmp, format=path.suffix[1:].lower() or "png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, no usage block: the convention for bad input in this repository.
        self.exit(2, f"{self.prog}: error: {message}\n")


def get_args_parser():
    parser = _Parser(
        prog="schedules.py",
        description="Draw or tabulate the learning-rate schedules and their footprints "
                    "(area under the lr curve). Defaults are the MoCo VOC protocol.")
    out = parser.add_argument_group("output (with none given, the table is printed)")
    out.add_argument("--plot", metavar="FILE", type=pathlib.Path,
                     help="write a figure of every schedule (lr vs iteration) to FILE, e.g. "
                          "schedules.png; needs matplotlib")
    out.add_argument("--table", action=argparse.BooleanOptionalAction, default=None,
                     help="print lr at chosen iterations and each footprint as a table")
    out.add_argument("--json", metavar="FILE", type=pathlib.Path,
                     help="also write the table to FILE as JSON")
    run = parser.add_argument_group("run")
    run.add_argument("--iters", type=int, default=_PROTOCOL_ITERS,
                     help=f"total iterations (default: {_PROTOCOL_ITERS})")
    run.add_argument("--lr", type=float, default=_PROTOCOL_LR,
                     help=f"base learning rate (default: {_PROTOCOL_LR})")
    run.add_argument("--warmup-iters", type=int, default=0,
                     help="linear warmup iterations, applied to every schedule (default: 0)")
    run.add_argument("--match-footprint", metavar="TARGET", choices=SCHEDULES,
                     help="set each schedule's free option so its footprint equals TARGET's, "
                          "e.g. step (default: off, every schedule at its defaults)")
    sched = parser.add_argument_group("schedule options (default: the library's)")
    for name, option in MATCHED_OPTION.items():
        sched.add_argument(OPTION_FLAGS[option], type=float, default=None,
                           help=f"{name} {option} (default: {DEFAULT_OPTIONS[name][option]:g})")
    return parser


def _options_by_name(args):
    """Each schedule's lr_at options for the chosen variant, and the variant's description."""
    given = {name: getattr(args, OPTION_FLAGS[opt].lstrip("-").replace("-", "_"))
             for name, opt in MATCHED_OPTION.items()}
    base = {name: {} for name in SCHEDULES}
    for name, value in given.items():
        if value is not None:
            base[name][MATCHED_OPTION[name]] = value
    if args.warmup_iters:
        for opts in base.values():
            opts["warmup_iters"] = args.warmup_iters
    target = args.match_footprint
    if target is None:
        return base, "default options (linear and cosine decay to zero)"
    out = {}
    for name in SCHEDULES:
        if name in (target, "step"):
            out[name] = base[name]
            continue
        if given[name] is not None:
            flag = OPTION_FLAGS[MATCHED_OPTION[name]]
            raise ValueError(f"{flag} conflicts with --match-footprint {target}: "
                             f"the match sets it")
        fixed = {"warmup_iters": args.warmup_iters} if args.warmup_iters else {}
        out[name] = match_footprint(name, args.iters, args.lr, target=target,
                                    target_options=base[target], **fixed)
    return out, f"footprint-matched to {target}" + (" (step keeps its milestones)"
                                                     if target != "step" else "")


def _write_json(path, data):
    tmp = _temp_name(path)
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        _check_run(args.iters, args.lr)
        for flag, path in (("--plot", args.plot), ("--json", args.json)):
            if path is not None and not path.resolve().parent.is_dir():
                raise ValueError(f"{flag} {path}: folder {path.resolve().parent} does not exist")
            if path is not None and path.is_dir():
                raise ValueError(f"{flag} {path} is a folder; give a file name")
        options, variant = _options_by_name(args)
        print(f"schedules.py: iters={args.iters} lr={args.lr:g} "
              f"warmup_iters={args.warmup_iters} variant: {variant}")
        table = schedule_table(args.iters, args.lr, options)
        if args.table or (args.table is None and args.plot is None and args.json is None):
            print("\n".join(format_table(table)))
        if args.json is not None:
            _write_json(args.json, {"iters": args.iters, "lr": args.lr,
                                    "warmup_iters": args.warmup_iters, "variant": variant,
                                    **table})
            print(f"wrote {args.json}")
        if args.plot is not None:
            title = (f"lr schedules, {args.iters} iterations, base lr {args.lr:g}, "
                     f"warmup {args.warmup_iters}: {variant}")
            plot_schedules(args.plot, args.iters, args.lr, options, title)
            print(f"wrote {args.plot}")
    except (ValueError, ImportError, OSError) as e:
        print(f"schedules.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
