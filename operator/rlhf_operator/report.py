"""`rlhf-operator report DIR`: plot a run's per-step metrics into a PNG and print a text summary.

DIR is a local run folder (runs/<job>, metrics under checkpoints/metrics/) or a checkpoint volume
copied from a cluster (metrics/ directly under it). Each trainer process appends one JSON line per
step to metrics/<role>-<rank>.jsonl (docs/spec.md); after a gang restart it resumes from a
checkpoint, so a file's steps go back: that is how restarts and redone steps are counted here.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Curves worth a panel each, in order; a panel is drawn only if some row has the key.
PANELS = (
    ("reward_mean", "reward (mean)"),
    ("kl", "KL"),
    ("loss", "loss"),
    ("policy_loss", "policy loss"),
    ("value_loss", "value loss"),
    ("preference_accuracy", "preference accuracy"),
    ("eval_reward_mean", "held-out reward (greedy)"),
    ("eval_preference_accuracy", "held-out pref. accuracy"),
    ("eval_exact_match", "held-out answers right"),
    ("eval_loss", "held-out loss"),
    ("tokens_per_second", "tokens / s"),
)
# The learning figures of a run (summary lines): a training curve's first and last WINDOW steps.
WINDOW = 5
TRAINING_FIGURES = (("reward_mean", "reward"), ("loss", "loss"), ("preference_accuracy", "preference accuracy"))
# Held-out metrics: the first evaluation (step 0 = the initial policy) against the last.
EVAL_FIGURES = (
    ("eval_reward_mean", "held-out reward (greedy)"),
    ("eval_pass_rate", "held-out pass rate (greedy)"),
    ("eval_preference_accuracy", "held-out preference accuracy"),
    ("eval_exact_match", "held-out answers right (greedy)"),
    ("eval_loss", "held-out loss"),
)
MAIN_SERIES = "actor-0"


class ReportError(ValueError):
    """The folder holds no metrics, or a metrics line is not JSON (message names file and line)."""


@dataclass(frozen=True)
class RunHistory:
    """One process's metrics file read as a run: the final trajectory plus its restarts."""

    rows: list[dict[str, Any]]  # every line, in write order
    final: list[dict[str, Any]]  # one row per step, the last written (what the finished model saw)
    restarts: int  # times the step went back (a resume from a checkpoint)
    steps_redone: list[int]  # per restart: steps computed again

    @property
    def last_step(self) -> int:
        return self.final[-1]["step"] if self.final else 0


def metrics_dir(run_dir: Path) -> Path:
    for candidate in (run_dir / "checkpoints" / "metrics", run_dir / "metrics", run_dir):
        if any(candidate.glob("*.jsonl")):
            return candidate
    raise ReportError(f"{run_dir}: no metrics *.jsonl under checkpoints/metrics/ or metrics/")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                # A process killed mid-write leaves a torn last line: skip it, name anything else.
                if lineno == _count_lines(path):
                    continue
                raise ReportError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ReportError(f"{path}:{lineno}: expected an object with an integer 'step'")
            rows.append(row)
    return rows


def _count_lines(path: Path) -> int:
    with path.open() as f:
        return sum(1 for _ in f)


def history(rows: list[dict[str, Any]]) -> RunHistory:
    """Split a metrics file at every resume; keep the last row written per step. The trainer marks the first
    row after a resume with the checkpoint step it resumed from (`resumed_from`), so a resume that redoes
    no step counts too; in files without the mark, a step that goes back is a resume."""
    by_step: dict[int, dict[str, Any]] = {}
    redone: list[int] = []
    previous = -1  # step 0: the evaluation of the initial policy, before the first step
    for row in rows:
        step = row["step"]
        resumed_from = row.get("resumed_from")
        if isinstance(resumed_from, int | float) and not isinstance(resumed_from, bool):
            redone.append(max(previous - int(resumed_from), 0))
        elif step <= previous:
            redone.append(previous - step + 1)
        previous = step
        by_step[step] = row
    final = [by_step[s] for s in sorted(by_step)]
    return RunHistory(rows, final, len(redone), redone)


def load_run(run_dir: Path) -> dict[str, RunHistory]:
    """`<role>-<rank>` -> its history, for every metrics file of the run."""
    folder = metrics_dir(run_dir)
    return {p.stem: history(read_jsonl(p)) for p in sorted(folder.glob("*.jsonl"))}


def main_history(runs: dict[str, RunHistory]) -> tuple[str, RunHistory]:
    name = MAIN_SERIES if MAIN_SERIES in runs else sorted(runs)[0]
    return name, runs[name]


def read_status(run_dir: Path) -> dict[str, Any]:
    """The job status the local runner saved (status.json); {} for a bare checkpoint folder."""
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _numbers(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), int | float) and r[key] == r[key]]


@dataclass(frozen=True)
class Figure:
    """One learning figure: a metric before and after training."""

    before: float
    after: float
    window: int  # steps averaged at each end; 0 for held-out metrics (first / last evaluation)

    @property
    def change(self) -> float:
        return self.after - self.before


def learning_figures(final: list[dict[str, Any]]) -> dict[str, Figure]:
    """What a run learned, by metric name.

    Training curves (reward, loss, preference accuracy): the mean of the first WINDOW steps against
    the mean of the last WINDOW (fewer than 2 x WINDOW steps: halves). Held-out metrics: the first
    evaluation (step 0, the initial policy, when the run started from scratch) against the last.
    """
    figures: dict[str, Figure] = {}
    for key, _ in TRAINING_FIGURES:
        values = [v for step, v in _numbers(final, key) if step > 0]
        if len(values) >= 2:
            n = min(WINDOW, len(values) // 2)
            figures[key] = Figure(sum(values[:n]) / n, sum(values[-n:]) / n, n)
    for key, _ in EVAL_FIGURES:
        points = _numbers(final, key)
        if len(points) >= 2:
            figures[key] = Figure(points[0][1], points[-1][1], 0)
    return figures


def figure_lines(figures: dict[str, Figure]) -> list[str]:
    """`reward (mean of first / last 5 steps): 0.0106 -> 0.8 (+0.79)`, one line per figure."""
    labels = {**dict(TRAINING_FIGURES), **dict(EVAL_FIGURES)}
    lines = []
    for key, fig in figures.items():
        how = f"mean of first / last {fig.window} steps" if fig.window else "first / last evaluation"
        lines.append(f"{labels[key]} ({how}): {_fmt(fig.before)} -> {_fmt(fig.after)} ({fig.change:+.3g})")
    return lines


def summary_lines(runs: dict[str, RunHistory], status: dict[str, Any]) -> list[str]:
    name, main = main_history(runs)
    lines = [f"series: {name} ({len(runs)} metric files: {', '.join(sorted(runs))})",
             f"steps: {main.last_step}"]
    if status.get("phase"):
        lines.append(f"phase: {status['phase']}")
    for key, label in PANELS[:2]:
        values = [r[key] for r in main.final if isinstance(r.get(key), int | float)]
        if values:
            lines.append(f"{label}: first {_fmt(values[0])}, last {_fmt(values[-1])}")
    lines.extend(figure_lines(learning_figures(main.final)))
    restarts = status.get("restarts", main.restarts)
    lines.append(f"restarts: {restarts} (resumes seen in metrics: {main.restarts}, "
                 f"steps redone: {sum(main.steps_redone)})")
    # The experiment tracker runs (rlhf_trainer.trackers): the status's links, else the metrics lines'.
    links = (status.get("progress") or {}).get("trackers") or next(
        (r["trackers"] for r in reversed(main.final) if isinstance(r.get("trackers"), dict)), {})
    lines.extend(f"{tracker} run: {link}" for tracker, link in sorted(links.items()))
    return lines


# Samples shown in the report (the newest ones of the main series).
SAMPLE_ROWS = 8
SAMPLE_COLUMNS = ("step", "prompt", "response", "reward", "kl", "length", "truncated")


def load_samples(run_dir: Path, series: str = MAIN_SERIES) -> list[dict[str, Any]]:
    """The rollouts a series wrote to samples/<series>.jsonl (rlhf_trainer.samples); [] if none."""
    for folder in (run_dir / "checkpoints" / "samples", run_dir / "samples"):
        path = folder / f"{series}.jsonl"
        if path.exists():
            return read_jsonl(path)
    return []


def _cell(value: Any, width: int) -> str:
    text = _fmt(value) if isinstance(value, float) else ("-" if value is None else str(value))
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)  # "\t", "\n": one line, no tofu
    return text if len(text) <= width else text[:width - 1] + "~"


def sample_table(samples: list[dict[str, Any]], rows: int = SAMPLE_ROWS) -> list[str]:
    """The newest `rows` samples as fixed-width text lines, a header first ([] without samples)."""
    if not samples:
        return []
    widths = {"step": 5, "prompt": 24, "response": 24, "reward": 7, "kl": 7, "length": 6, "truncated": 9}
    line = "  ".join(f"{c:<{widths[c]}}" for c in SAMPLE_COLUMNS)
    out = [line.rstrip()]
    for s in samples[-rows:]:
        out.append("  ".join(f"{_cell(s.get(c), widths[c]):<{widths[c]}}" for c in SAMPLE_COLUMNS).rstrip())
    return out


def plot(runs: dict[str, RunHistory], out: Path, title: str, samples: list[dict[str, Any]] | None = None) -> Path:
    """The curves of PANELS (one panel each, shared step axis) and, with samples, a table of the newest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [(k, label) for k, label in PANELS
              if any(isinstance(r.get(k), int | float) for h in runs.values() for r in h.final)]
    panels = panels or [("step", "step")]
    table = sample_table(samples or [])
    heights = [2.2] * len(panels) + ([0.3 * len(table) + 0.4] if table else [])
    fig = plt.figure(figsize=(7 if not table else 9, sum(heights)))
    grid = fig.add_gridspec(len(heights), 1, height_ratios=heights)
    axes = [fig.add_subplot(grid[0])]
    axes += [fig.add_subplot(grid[i], sharex=axes[0]) for i in range(1, len(panels))]
    for ax, (key, label) in zip(axes, panels, strict=True):
        for name, h in sorted(runs.items()):
            points = [(r["step"], r[key]) for r in h.final if isinstance(r.get(key), int | float)]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker=".", label=name)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax is not axes[-1]:
            ax.tick_params(labelbottom=False)
    axes[0].set_title(title)
    axes[0].legend(fontsize="small")
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    if table:
        ax = fig.add_subplot(grid[len(panels)])
        ax.axis("off")
        ax.set_title(f"newest samples ({MAIN_SERIES})", fontsize="small", loc="left")
        ax.text(0, 1, "\n".join(table), family="monospace", fontsize=7, va="top", transform=ax.transAxes)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_report(run_dir: Path, out: Path | None = None) -> tuple[Path, list[str]]:
    """Plot and summarise a run; returns the PNG path and the summary lines (then the samples table)."""
    runs = load_run(run_dir)
    status = read_status(run_dir)
    samples = load_samples(run_dir, main_history(runs)[0])
    png = plot(runs, out or run_dir / "report.png", title=run_dir.resolve().name, samples=samples)
    table = sample_table(samples)
    lines = summary_lines(runs, status)
    if table:
        lines += [f"newest samples ({len(samples)} written):", *table]
    return png, lines


def main(args: Any) -> int:
    run_dir = Path(args.run_dir)
    try:
        png, lines = write_report(run_dir, Path(args.out) if args.out else None)
    except (ReportError, OSError) as e:
        print(f"rlhf-operator report: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    print(f"report: {png}")
    return 0
