"""Figures and the results table over run folders, and a launcher for the whole grid.

    python report.py runs/*/ --table results.md --plot curves.png [--json results.json]
    python report.py grid --inits moco.pth sup.pth --schedules step linear --seeds 0 1 2 3 4 \\
        --nproc 8 -- --data-root /data/voc          # train.py flags after "--"

The table: rows = init, columns = schedule (and its variant), each cell the final-iteration
val mIoU (%) of every seed, their mean, sample std (n - 1) and n. Only runs with the same
fingerprint are pooled: every train.py argument except those in FINGERPRINT_EXCLUDES, plus
the init file's sha256, whether BN was per process and the AMP dtype. Cells with fewer than
the paper's 5 runs or with a deviation from the protocol are flagged; unfinished runs are
listed, never pooled. The figure: training loss (raw and smoothed) and lr against the
iteration for every run, with its val mIoU points.

A run folder is what train.py writes: args.json, run.json, log.jsonl and, once the run is
finished, eval.json (mIoU as a fraction; this file reports percent). Nothing else is read.
The grid subcommand runs train.py once per (init, schedule, seed), one run after another,
skipping finished folders and resuming those with a checkpoint. matplotlib is needed only
for --plot.
"""
import argparse
import hashlib
import json
import math
import os
import pathlib
import shlex
import statistics
import subprocess
import sys

import schedules

# train.py arguments left out of the fingerprint, and why: none changes the number.
FINGERPRINT_EXCLUDES = {
    "seed": "the one setting pooled runs vary on purpose",
    "output_dir": "where the run is written",
    "resume": "how a run was continued (train.py refuses a checkpoint with other settings)",
    "overwrite": "whether an older run in the folder could be replaced",
    "workers": "data-loading processes: the same images in the same order",
    "log_every": "how often the loss is written down",
    "save_every": "how often a checkpoint is written",
    "eval_every": "diagnostic evaluations in eval mode, which change no weight",
}

# Raw per-schedule flags: replaced in the fingerprint by the resolved `schedule_options`
# (defaults filled in), so `--linear-end-ratio 0` and no flag at all pool together and an
# option of another schedule, which train.py ignores, splits nothing.
SCHEDULE_FLAGS = ("warmup_iters", "poly_power", "exp_final_ratio", "linear_end_ratio",
                  "cosine_floor_ratio")

# Fingerprint keys that decide the column; every other key decides the row.
COLUMN_KEYS = ("lr_schedule", "match_footprint", "schedule_options")

# The MoCo paper's VOC numbers (appendix, average of 5 trials, step schedule, mIoU %), by
# run.json's init "known_release" without its parenthesised file name, compared with case,
# spaces and punctuation removed. The paper fine-tuned the query encoder, so a run from the
# momentum encoder gets no reference number.
PAPER_MIOU = {"mocov1200ep": ("MoCo v1 IN-1M 200 epochs", 72.5),
              "torchvisionimagenet1kv1": ("supervised IN-1M", 74.4)}

# Inits that train.py takes by name rather than as a file ("imagenet": torchvision's weights,
# fetched by model.py into the torch.hub cache).
INIT_NAMES = ("random", "imagenet")

PAPER_TRIALS = 5


class ReportError(ValueError):
    """A bad run folder, file or flag; the message names it in one line."""


# ----------------------------------------------------------------------------------------
# Reading run folders


def read_json(path):
    """One JSON file as Python data; raises ReportError naming the file and the line."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    except OSError as e:
        raise ReportError(f"{path}: cannot read ({e.strerror})") from None


def read_log(path):
    """The records of a log.jsonl, in file order, as a list of dicts.

    Every non-empty line must be a JSON object with an integer "iter"; raises ReportError
    naming the file and the 1-based line number otherwise. A missing file gives [].
    """
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ReportError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("iter"), int):
                raise ReportError(f"{path} line {n}: not a log record (a JSON object with "
                                  "an integer 'iter')")
            records.append(rec)
    return records


def last_attempt(records):
    """The records of the trajectory the run actually followed.

    A resumed run repeats the iterations between its checkpoint and the crash, and a run
    restarted in its folder starts again at the first log step; train.py appends either to
    the same log. Whenever a loss record's iteration is not past the previous one, the
    earlier records at or after that iteration are dropped: the later lines win.
    """
    kept, last = [], -1
    for rec in records:
        if "loss" in rec:
            if rec["iter"] <= last:
                kept = [r for r in kept if r["iter"] < rec["iter"]]
            last = rec["iter"]
        kept.append(rec)
    return kept


def _plain(value):
    """JSON-normalised copy: tuples become lists, so values compare as they are stored."""
    return json.loads(json.dumps(value))


def resolved_schedule_options(args):
    """The schedule's full options: schedules.DEFAULT_OPTIONS overridden by the run's own."""
    name = args.get("lr_schedule")
    defaults = schedules.DEFAULT_OPTIONS.get(name, {})
    return _plain({**defaults, **(args.get("schedule_options") or {})})


def fingerprint(args, init_sha256, manifest=None):
    """What decides the number: a dict of plain values; runs pool when theirs are equal.

    args: a run's args.json (train.py's resolved arguments). init_sha256: the init file's
    hash (None for a random init). manifest: run.json, for what the arguments alone do not
    fix (per-process BN on CPU, the AMP dtype chosen from the device); None leaves them out.
    """
    fp = {k: _plain(v) for k, v in args.items()
          if k not in FINGERPRINT_EXCLUDES and k not in SCHEDULE_FLAGS}
    fp["schedule_options"] = resolved_schedule_options(args)
    fp["init_sha256"] = init_sha256
    if manifest is not None:
        fp["bn_per_process"] = "per process" in str(manifest.get("bn", ""))
        fp["amp_dtype"] = manifest.get("amp_dtype")
    return fp


def _differences(a, b):
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


class Run:
    """One run folder as read from disk.

    folder: the path given. args, manifest: args.json, run.json. log: log.jsonl's records of
    the last attempt. miou: the final-iteration val mIoU as a fraction, or None while the
    run is unfinished (then `why` says what is missing). deviations: strings naming every
    way the run left the protocol other than its schedule (the table's columns name that).
    """

    def __init__(self, folder):
        self.folder = str(folder)
        self.name = os.path.basename(os.path.normpath(self.folder))
        if not os.path.isdir(self.folder):
            raise ReportError(f"{self.folder}: not a run folder (not a folder); pass run "
                              "folders, e.g. runs/*/")
        args_path = os.path.join(self.folder, "args.json")
        if not os.path.isfile(args_path):
            raise ReportError(f"{self.folder}: not a run folder (no args.json); pass run "
                              "folders, e.g. runs/*/")
        self.args = read_json(args_path)
        run_path = os.path.join(self.folder, "run.json")
        if not os.path.isfile(run_path):
            raise ReportError(f"{self.folder}: not a run folder (args.json without run.json)")
        self.manifest = read_json(run_path)
        for path, obj in ((args_path, self.args), (run_path, self.manifest)):
            if not isinstance(obj, dict):
                raise ReportError(f"{path}: not a JSON object")
        for key in ("lr_schedule", "iters", "init", "seed"):
            if key not in self.args:
                raise ReportError(f"{args_path}: no {key!r}; not written by train.py")
        self.log = last_attempt(read_log(os.path.join(self.folder, "log.jsonl")))
        init = self.manifest.get("init") or {}
        self.init_sha256 = init.get("sha256")
        release = init.get("known_release")
        if isinstance(release, dict):
            release = release.get("name")
        # "MoCo v1 200ep (moco_v1_200ep_pretrain.pth.tar)": the name without the file's
        self.known_release = str(release).split("(")[0].strip() if release else None
        self.fingerprint = fingerprint(self.args, self.init_sha256, self.manifest)
        self.deviations = self._deviations()
        self.miou, self.why, self.eval_warnings = None, None, []
        self._read_eval()

    def _deviations(self):
        out = [d for d in self.manifest.get("deviations_from_protocol", [])
               if not d.startswith(("lr_schedule=", "schedule_options="))]
        if self.manifest.get("amp_dtype"):
            out.append(f"amp_dtype={self.manifest['amp_dtype']}")
        if "per process" in str(self.manifest.get("bn", "")) and "bn=per-process" not in out:
            out.append("bn=per-process")
        # args.json is rewritten at every start, run.json keeps the first start's settings:
        # a resume with other flags (e.g. --amp added) shows up as a difference here.
        first = self.manifest.get("args")
        if isinstance(first, dict):
            changed = _differences(fingerprint(first, None), fingerprint(self.args, None))
            if changed:
                out.append("resumed with other settings: " + ", ".join(
                    f"{k} {first.get(k)!r}->{self.args.get(k)!r}" for k in changed))
        return out

    def _read_eval(self):
        path = os.path.join(self.folder, "eval.json")
        if not os.path.isfile(path):
            self.why = "no eval.json"
            return
        result = read_json(path)
        if not isinstance(result, dict) or not isinstance(result.get("miou"), (int, float)):
            raise ReportError(f"{path}: no 'miou' number; not written by train.py")
        if not 0 <= result["miou"] <= 1:
            raise ReportError(f"{path}: miou {result['miou']} is not a fraction in [0, 1]")
        # eval.json stays behind when a folder is reused with --overwrite; its own copy of
        # the run record tells whether it belongs to the run that run.json describes.
        if "run" not in result:
            self.why = "eval.json has no run record (not written by train.py)"
            return
        if result["run"] != self.manifest:
            self.why = "eval.json belongs to an earlier run in this folder"
            return
        if result.get("split") != self.args.get("val_split"):
            self.why = (f"eval.json scores split {result.get('split')!r}, not the run's "
                        f"--val-split {self.args.get('val_split')!r}")
            return
        if result.get("iteration") != self.args["iters"]:
            self.why = (f"eval.json is for iteration {result.get('iteration')}, not the "
                        f"final {self.args['iters']}")
            return
        self.miou = float(result["miou"])
        self.eval_warnings = [f"eval: {w}" for w in result.get("warnings", [])]

    @property
    def finished(self):
        return self.miou is not None

    def last_iter(self):
        """The last logged training iteration (0 when nothing is logged)."""
        return max((r["iter"] for r in self.log if "loss" in r), default=0)

    def init_name(self):
        """The init's row label: file name, layout and short hash, or 'random'."""
        if self.args["init"] == "random":
            return "random"
        init = self.manifest.get("init") or {}
        parts = [init.get("layout"), (self.init_sha256 or "")[:8] or None, self.known_release]
        return (f"{os.path.basename(self.args['init'])} "
                f"({', '.join(str(p) for p in parts if p)})")

    def schedule_name(self):
        """The column label: the schedule, and its variant when it is not the default one."""
        name = self.args["lr_schedule"]
        opts = resolved_schedule_options(self.args)
        defaults = _plain(schedules.DEFAULT_OPTIONS.get(name, {}))
        changed = ", ".join(f"{k}={_number(v)}" for k, v in opts.items()
                            if defaults.get(k) != v)
        if self.args.get("match_footprint"):
            return f"{name} matched to {self.args['match_footprint']} footprint" + \
                (f" ({changed})" if changed else "")
        return f"{name} ({changed})" if changed else name

    def paper(self):
        """(what, mIoU %) from the MoCo paper for this init, or None when not a known one."""
        if not self.known_release or self.args.get("init_encoder", "default") != "default":
            return None
        key = "".join(c for c in str(self.known_release).lower() if c.isalnum())
        return PAPER_MIOU.get(key)


def _number(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def load_runs(folders):
    """Run objects for the given folders, each folder once, in the given order."""
    runs, seen = [], set()
    for folder in folders:
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        runs.append(Run(folder))
    if not runs:
        raise ReportError("no run folders given")
    return runs


# ----------------------------------------------------------------------------------------
# The table


def _key(d):
    return json.dumps(d, sort_keys=True)


def build_table(runs):
    """Pool the finished runs by fingerprint into cells; returns plain data (JSON-ready).

    {"columns": [label], "rows": [{"label", "paper", "cells": {column: cell}}],
     "notes": {mark: [deviation]}, "unfinished": [...], "fingerprint_excludes": {...}}.
    A cell: {"runs": [{"folder", "seed", "miou"}], "fingerprint", "n", "mean", "std",
    "flags", "note"},
    mIoU in percent; std is the sample standard deviation (n - 1), None when n = 1.
    """
    finished = [r for r in runs if r.finished]
    groups = {}
    for r in finished:
        groups.setdefault(_key(r.fingerprint), []).append(r)

    # Rows: the non-column part of the fingerprint. Rows of one init that differ in other
    # settings get a suffix naming those settings, so neither hides behind the other.
    row_fp = {k: {f: v for f, v in rs[0].fingerprint.items() if f not in COLUMN_KEYS}
              for k, rs in groups.items()}
    by_init = {}
    for k, rs in groups.items():
        by_init.setdefault(rs[0].init_name(), {})[_key(row_fp[k])] = row_fp[k]
    row_label = {}
    for name, variants in by_init.items():
        differing = sorted({f for a in variants.values() for b in variants.values()
                            for f in _differences(a, b)})
        for rk, fp in variants.items():
            suffix = ", ".join(f"{f}={fp.get(f)!r}" for f in differing)
            row_label[rk] = f"{name} [{suffix}]" if suffix else name

    order = {s: i for i, s in enumerate(schedules.SCHEDULES)}
    columns = sorted({rs[0].schedule_name() for rs in groups.values()},
                     key=lambda c: (order.get(c.split()[0], len(order)), c))
    rows, notes, note_of = {}, {}, {}
    for k, rs in groups.items():
        rk = _key(row_fp[k])
        row = rows.setdefault(rk, {"label": row_label[rk], "paper": None, "cells": {}})
        paper = rs[0].paper()
        if paper:
            row["paper"] = {"what": paper[0], "miou": paper[1]}
        deviations = sorted({d for r in rs for d in r.deviations + r.eval_warnings})
        if deviations and _key(deviations) not in note_of:
            note_of[_key(deviations)] = chr(ord("A") + len(notes)) if len(notes) < 26 \
                else f"D{len(notes) + 1}"
            notes[note_of[_key(deviations)]] = deviations
        row["cells"][rs[0].schedule_name()] = _cell(rs, note_of.get(_key(deviations)))
    ordered = sorted(rows.values(), key=lambda r: r["label"])
    unfinished = [{"folder": r.folder, "why": r.why, "iter": r.last_iter(),
                   "iters": r.args["iters"],
                   "checkpoint": os.path.isfile(os.path.join(r.folder, "checkpoint.pth"))}
                  for r in runs if not r.finished]
    return {"unit": "mIoU %, final iteration", "columns": columns, "rows": ordered,
            "notes": notes, "unfinished": unfinished,
            "fingerprint_excludes": dict(FINGERPRINT_EXCLUDES)}


def _cell(runs, note):
    runs = sorted(runs, key=lambda r: (r.args["seed"], r.folder))
    values = [100 * r.miou for r in runs]
    seeds = [r.args["seed"] for r in runs]
    flags = []
    if len(values) < PAPER_TRIALS:
        flags.append(f"n<{PAPER_TRIALS}")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        # Same settings and same seed: repeats of one trial, not independent ones.
        flags.append("repeated seed " + ", ".join(map(str, repeated)))
    return {"runs": [{"folder": r.folder, "seed": s, "miou": v}
                     for r, s, v in zip(runs, seeds, values)],
            "fingerprint": runs[0].fingerprint,
            "n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "flags": flags, "note": note}


def format_cell(cell):
    """'72.20 ± 0.57 (n=5; s0 72.00, s1 72.50, ...)' plus flags and the note mark."""
    std = f"{cell['std']:.2f}" if cell["std"] is not None else "n/a"
    seeds = ", ".join(f"s{r['seed']} {r['miou']:.2f}" for r in cell["runs"])
    text = f"{cell['mean']:.2f} ± {std} (n={cell['n']}; {seeds})"
    marks = [f"**{f}**" for f in cell["flags"]] + ([f"[{cell['note']}]"] if cell["note"]
                                                   else [])
    return " ".join([text] + marks)


def _md(text):
    # A '|' inside a cell (a path, a setting) would split it into two columns.
    return text.replace("|", "\\|")


def format_table(table):
    """The table as markdown lines: the grid, then its notes and the unfinished runs."""
    cols = table["columns"]
    head = ["init"] + [_md(c) for c in cols] + ["MoCo paper (step, mean of 5)"]
    lines = ["mIoU (%) on each run's val split (the official VOC 2012 val unless a note says "
             "otherwise) at the final iteration: mean ± sample std (n-1) over seeds, n, then "
             "each seed's run.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table["rows"]:
        cells = [format_cell(row["cells"][c]) if c in row["cells"] else "-" for c in cols]
        paper = f"{row['paper']['miou']:.1f} ({row['paper']['what']})" if row["paper"] \
            else ""
        lines.append("| " + " | ".join([_md(row["label"])] + cells + [paper]) + " |")
    if not table["rows"]:
        lines.append("| (no finished runs) |" + " |" * (len(head) - 1))
    lines.append("")
    for mark, deviations in table["notes"].items():
        lines.append(f"- [{mark}] deviates from the protocol: {'; '.join(deviations)}")
    lines.append(f"- n<{PAPER_TRIALS}: fewer runs than the paper's {PAPER_TRIALS} trials.")
    lines.append("- A cell pools only runs with the same fingerprint: every train.py argument "
                 "except " + ", ".join(FINGERPRINT_EXCLUDES) + ", plus the init file's "
                 "sha256, per-process BN and the AMP dtype.")
    if table["unfinished"]:
        lines.append("")
        lines.append("Unfinished, not pooled:")
        for u in table["unfinished"]:
            ckpt = ", checkpoint present" if u["checkpoint"] else ""
            lines.append(f"- {u['folder']}: {u['why']} (logged to iteration {u['iter']} of "
                         f"{u['iters']}{ckpt})")
    return lines


# ----------------------------------------------------------------------------------------
# The figure


def ema(values, beta):
    """Bias-corrected exponential moving average over logged points (a list of floats).

    out[i] = s[i] / (1 - beta ** (i + 1)), s[i] = beta * s[i-1] + (1 - beta) * values[i],
    s[-1] = 0: the correction keeps the first points from being pulled towards 0. beta
    acts per logged point, so the window is about 1 / (1 - beta) log steps.
    """
    out, s = [], 0.0
    for i, v in enumerate(values):
        s = beta * s + (1 - beta) * v
        out.append(s / (1 - beta ** (i + 1)))
    return out


def _needs_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib") from None
    return FigureCanvasAgg, Figure


def plot_runs(path, runs, beta=0.9):
    """Draw loss (raw and EMA-smoothed), lr and val mIoU against the iteration into `path`.

    Top panel: loss per labelled pixel, raw (thin) and smoothed by `ema` (thick), and on its
    right axis every val mIoU (%) in the log, the final one as a star. Bottom panel: the lr
    of each log step. One colour per run; the legend names the folder, init and schedule
    variant. Needs matplotlib (Agg canvas, no pyplot); the file is written to a temporary
    name and moved into place, so a failure leaves `path` untouched.
    """
    FigureCanvasAgg, Figure = _needs_matplotlib()
    path = pathlib.Path(path)
    fig = Figure(figsize=(11, 8), dpi=110)
    FigureCanvasAgg(fig)
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    ax_miou = ax_loss.twinx()
    ax_miou.ticklabel_format(axis="y", useOffset=False)  # equal scores must look equal
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        steps = [r for r in run.log if "loss" in r]
        its = [r["iter"] for r in steps]
        loss = [r["loss"] for r in steps]
        status = "" if run.finished else f", unfinished at {run.last_iter()}/{run.args['iters']}"
        label = f"{run.name}: {run.init_name()}, {run.schedule_name()}{status}"
        ax_loss.plot(its, loss, color=colour, linewidth=0.6, alpha=0.35)
        ax_loss.plot(its, ema(loss, beta), color=colour, linewidth=1.6, label=label)
        ax_lr.plot(its, [r.get("lr", math.nan) for r in steps], color=colour, linewidth=1.4)
        evals = [(r["iter"], 100 * r["eval"]["miou"], bool(r.get("final")))
                 for r in run.log if isinstance(r.get("eval"), dict) and "miou" in r["eval"]]
        if run.finished and not any(final for _, _, final in evals):
            evals.append((run.args["iters"], 100 * run.miou, True))
        for it, miou, final in evals:
            ax_miou.plot([it], [miou], color=colour, linestyle="none",
                         marker="*" if final else "o", markersize=11 if final else 5)
    ax_loss.set_ylabel(f"train loss (thin: raw, thick: EMA beta={beta:g} per log step)")
    ax_miou.set_ylabel("val mIoU % (o: during training, *: final)")
    ax_lr.set_ylabel("learning rate")
    # A log step stands at the iterations done; its lr is that of the last one of them.
    ax_lr.set_xlabel("iterations done")
    ax_lr.set_ylim(bottom=0)
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
    ax_loss.set_title(f"training loss, lr and val mIoU of {len(runs)} run"
                      f"{'s' if len(runs) != 1 else ''}", fontsize=10)
    # Below the panels, one run a line: the labels are long and the curves need the room.
    height = min(0.45, 0.02 * len(runs) + 0.02)
    fig.set_figheight(fig.get_figheight() / (1 - height))
    fig.legend(*ax_loss.get_legend_handles_labels(), loc="lower left", fontsize=7,
               frameon=False)
    fig.tight_layout(rect=(0, height, 1, 1))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format=path.suffix[1:].lower() or "png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------
# The grid


TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")

# Flags the grid sets for every run; given after "--" they would contradict it.
GRID_OWNED = {"init": "--inits", "lr_schedule": "--schedules", "seed": "--seeds",
              "output_dir": "--runs-dir", "resume": "(decided per folder)",
              "overwrite": "(a finished run is never replaced)"}


def _train_parser():
    """train.py's parser, raising ReportError instead of printing usage and exiting."""
    import train

    parser = train.get_args_parser()

    def error(message):
        raise ReportError(f"train.py flags after '--': {message}")

    parser.error = error
    return parser, train


def _sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def plan_grid(inits, schedule_names, seeds, nproc, runs_dir, extra):
    """One entry per run, seeds outermost: a grid stopped early still covers every cell.

    Returns a list of dicts {"folder", "argv", "state"}; state is "finished" (skipped),
    "resume" (a checkpoint, no eval.json) or "start". Raises ReportError for a flag train.py
    rejects, a missing init file, two inits with the same folder name, or a folder that
    holds a run with other settings (it is never reused silently).
    """
    parser, train = _train_parser()
    # --init is required by train.py and owned by the grid: a sentinel stands in for it, so
    # a user's own --init after '--' shows as a changed value.
    given = parser.parse_args(["--init", "\0grid", *extra])
    defaults = parser.parse_args(["--init", "\0grid"])
    for dest, owner in GRID_OWNED.items():
        if getattr(given, dest) != getattr(defaults, dest):
            raise ReportError(f"train.py flag --{dest.replace('_', '-')} after '--' is set "
                              f"by the grid {owner}; drop it")
    hashes, stems = {}, {}
    for init in inits:
        if init not in INIT_NAMES and not os.path.isfile(init):
            raise ReportError(f"--inits {init}: no such file (or one of "
                              f"{', '.join(INIT_NAMES)})")
        # train.py's own default folder stem, so a run started by hand lands in the same place
        stem = "random" if init == "random" else os.path.basename(init).split(".")[0]
        if stems.setdefault(stem, init) != init:
            raise ReportError(f"--inits {stems[stem]} and {init} would share the run folder "
                              f"name {stem!r}; rename or symlink one")
    plan = []
    for seed in seeds:
        for init in inits:
            for name in schedule_names:
                stem = "random" if init == "random" else os.path.basename(init).split(".")[0]
                variant = f"-match{given.match_footprint}" if given.match_footprint else ""
                folder = os.path.join(runs_dir, f"{stem}-{name}{variant}-seed{seed}")
                argv = ["--init", init, "--lr-schedule", name, "--seed", str(seed),
                        "--output-dir", folder] + list(extra)
                args = parser.parse_args(argv)
                try:
                    train.resolve_args(args, nproc)
                except train.UsageError as e:
                    raise ReportError(f"train.py: {e}") from None
                if init not in hashes:
                    hashes[init] = None if init in INIT_NAMES else _sha256(init)
                plan.append({"folder": folder, "argv": argv,
                             "state": _folder_state(folder, vars(args), hashes[init])})
    return plan


def _folder_state(folder, planned_args, init_sha256):
    if not os.path.exists(os.path.join(folder, "args.json")):
        return "resume" if os.path.isfile(os.path.join(folder, "checkpoint.pth")) else "start"
    run = Run(folder)
    # channels_last is resolved from the device inside train.py; it changes no number.
    planned = {k: v for k, v in fingerprint(planned_args, init_sha256).items()
               if k != "channels_last"}
    stored = {k: v for k, v in fingerprint(run.args, run.init_sha256).items()
              if k != "channels_last"}
    planned["seed"], stored["seed"] = planned_args["seed"], run.args["seed"]
    if init_sha256 is None and planned_args["init"] != "random":
        # A named init ("imagenet") is hashed only when train.py fetches it.
        del planned["init_sha256"], stored["init_sha256"]
    changed = _differences(planned, stored)
    if changed:
        k = changed[0]
        raise ReportError(f"{folder} holds a run with other settings ({k}={stored.get(k)!r} "
                          f"there, {planned.get(k)!r} planned"
                          f"{f', and {len(changed) - 1} more' if len(changed) > 1 else ''}); "
                          "choose another --runs-dir or move the folder")
    if run.finished:
        return "finished"
    return "resume" if os.path.isfile(os.path.join(folder, "checkpoint.pth")) else "start"


def grid_command(entry, nproc):
    """The command line of one planned run: train.py alone for one process, else torchrun."""
    argv = entry["argv"] + (["--resume"] if entry["state"] == "resume" else [])
    if nproc == 1:
        # One process needs no rendezvous; train.py sees WORLD_SIZE unset and runs alone.
        return [sys.executable, TRAIN] + argv
    # torchrun through this interpreter, so the runs use the environment report.py runs in.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", TRAIN] + argv


def get_grid_parser():
    p = _Parser(prog="report.py grid",
                usage="%(prog)s --inits INIT [INIT ...] --schedules SCHEDULE [SCHEDULE ...] "
                      "[options] [-- train.py flags]",
                description="Run train.py for every (init, schedule, seed), one run after "
                            "another, into RUNS_DIR/<init>-<schedule>[-match<target>]-seed<s>. "
                            "Finished folders (eval.json) are skipped, folders with a "
                            "checkpoint are resumed. train.py flags go after '--'.",
                epilog="example: python report.py grid --inits moco.pth sup.pth --schedules "
                       "step linear --nproc 8 -- --data-root /data/voc [--match-footprint "
                       "step]")
    g = p.add_argument_group("grid")
    g.add_argument("--inits", nargs="+", required=True, metavar="INIT",
                   help=f"checkpoint paths, or {' / '.join(INIT_NAMES)} as train.py --init "
                        "takes them")
    g.add_argument("--schedules", nargs="+", required=True, choices=schedules.SCHEDULES,
                   metavar="SCHEDULE", help=f"any of {', '.join(schedules.SCHEDULES)}")
    g.add_argument("--seeds", nargs="+", type=int, default=list(range(PAPER_TRIALS)),
                   metavar="SEED", help="(default: 0 1 2 3 4, the paper's 5 trials)")
    g.add_argument("--runs-dir", default="runs", help="(default: runs)")
    g = p.add_argument_group("launch")
    g.add_argument("--nproc", type=int, default=None,
                   help="processes per run: torchrun --nproc_per_node (default: the visible "
                        "GPUs, 1 without any; 1 runs train.py without torchrun)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the plan and the command lines, run nothing")
    g.add_argument("--keep-going", action="store_true",
                   help="after a failed run, go on with the next (default: stop)")
    return p


def grid_main(argv):
    """Plan, print and run the grid; returns the exit status."""
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    args = get_grid_parser().parse_args(own)
    try:
        nproc = args.nproc
        if nproc is None:
            import torch

            nproc = torch.cuda.device_count() or 1
        if nproc < 1:
            raise ReportError(f"--nproc must be >= 1, got {nproc}")
        plan = plan_grid(args.inits, args.schedules, args.seeds, nproc, args.runs_dir, extra)
    except (ReportError, OSError) as e:
        print(f"report.py grid: error: {e}", file=sys.stderr)
        return 2
    counts = {s: sum(e["state"] == s for e in plan) for s in ("finished", "resume", "start")}
    print(f"grid: {len(args.inits)} init(s) x {len(args.schedules)} schedule(s) x "
          f"{len(args.seeds)} seed(s) = {len(plan)} runs in {args.runs_dir}, {nproc} "
          f"process(es) each: {counts['finished']} finished, {counts['resume']} to resume, "
          f"{counts['start']} to start", flush=True)
    ran = failed = 0
    for i, entry in enumerate(plan, 1):
        if entry["state"] == "finished":
            print(f"[{i}/{len(plan)}] skip {entry['folder']} (finished)", flush=True)
            continue
        cmd = grid_command(entry, nproc)
        print(f"[{i}/{len(plan)}] {entry['state']} {entry['folder']}: {shlex.join(cmd)}",
              flush=True)
        if args.dry_run:
            continue
        rc = subprocess.run(cmd).returncode
        ran += 1
        if rc != 0:
            failed += 1
            print(f"report.py grid: {entry['folder']} failed (exit {rc})", file=sys.stderr,
                  flush=True)
            if not args.keep_going:
                print("report.py grid: stopped; rerun the same command to continue",
                      file=sys.stderr)
                return 1
    if not args.dry_run:
        print(f"grid: done, {ran} run(s) started, {failed} failed, {counts['finished']} "
              f"skipped; table: python report.py {os.path.join(args.runs_dir, '*/')} "
              "--table results.md", flush=True)
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, no usage block: the convention for bad input in this repository.
        self.exit(2, f"{self.prog}: error: {message}\n")


def get_args_parser():
    p = _Parser(prog="report.py",
                description="The results table (printed, and written with --table) and a "
                            "figure of loss, lr and mIoU over run folders. To launch the "
                            "whole grid of runs: python report.py grid --help",
                epilog="mIoU is in percent; cells pool only runs with the same fingerprint "
                       "(every train.py argument except "
                       + ", ".join(FINGERPRINT_EXCLUDES) + ", plus the init's sha256).")
    p.add_argument("runs", nargs="+", metavar="RUN_FOLDER",
                   help="run folders written by train.py, e.g. runs/*/")
    g = p.add_argument_group("output")
    g.add_argument("--table", metavar="FILE", type=pathlib.Path,
                   help="also write the markdown table to FILE")
    g.add_argument("--json", metavar="FILE", type=pathlib.Path,
                   help="write the table's data (every run's mIoU, cells, notes) to FILE")
    g.add_argument("--plot", metavar="FILE", type=pathlib.Path,
                   help="draw loss, lr and mIoU against the iteration to FILE (png, pdf, "
                        "svg); needs matplotlib")
    g = p.add_argument_group("figure")
    g.add_argument("--smooth", type=float, default=0.9, metavar="BETA",
                   help="EMA weight per log step for the smoothed loss, in [0, 1) "
                        "(default: 0.9, about the last 10 log steps)")
    return p


def _write_text(path, text):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "grid":
        return grid_main(argv[1:])
    args = get_args_parser().parse_args(argv)
    try:
        for flag, path in (("--table", args.table), ("--json", args.json),
                           ("--plot", args.plot)):
            if path is not None and not path.resolve().parent.is_dir():
                raise ReportError(f"{flag} {path}: folder {path.resolve().parent} does not "
                                  "exist")
            if path is not None and path.is_dir():
                raise ReportError(f"{flag} {path} is a folder; give a file name")
        if not 0 <= args.smooth < 1:
            raise ReportError(f"--smooth must be in [0, 1), got {args.smooth}")
        if args.plot is not None:
            _needs_matplotlib()  # before any work, so a missing package costs nothing
        runs = load_runs(args.runs)
        table = build_table(runs)
        text = "\n".join(format_table(table)) + "\n"
        print(text, end="")
        if args.table is not None:
            _write_text(args.table, text)
            print(f"wrote {args.table}")
        if args.json is not None:
            _write_text(args.json, json.dumps(table, indent=1) + "\n")
            print(f"wrote {args.json}")
        if args.plot is not None:
            plot_runs(args.plot, runs, args.smooth)
            print(f"wrote {args.plot}")
    except (ReportError, ImportError, OSError) as e:
        print(f"report.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
