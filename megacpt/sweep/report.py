"""A sweep's report: DIR/summary.json, DIR/summary.txt (the table, also printed) and DIR/sweep.png.

Per run: its values, whether it is done, the final training loss and, for each validation set, the final
loss and its change since the run's stage began (the last evaluation of the stage it started from: the loop
does not evaluate at step 0, so a run from fresh weights has no change). The numbers are `megacpt plot`'s,
read from each run's metrics.jsonl and its earlier stages. Runs of the same values with other seeds form a
group (mean, standard deviation and count of the finished ones); the figure draws each group's losses
against the first swept key, one line per combination of the other keys, seeds as error bars. A partly
finished sweep reports what is there; runs not yet done are marked and left out of the groups.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from megacpt.cli_helpers import new_figure, save_figure, text_table
from megacpt.config import load_config
from megacpt.errors import UserError
from megacpt.evaluation.forgetting import final_and_change
from megacpt.evaluation.lineage import StageRun, run_lineage
from megacpt.files import write_output
from megacpt.sweep.execute import is_finished
from megacpt.sweep.grid import SEED, Sweep

DONE, PARTIAL, NOT_STARTED = "done", "partial", "not started"
TRAIN_LOSS = "train loss"
FIGURE = "sweep.png"


@dataclass
class RunResult:
    """One run's numbers as its metrics.jsonl holds them now (None where there are none yet)."""

    name: str
    labels: dict[str, str]
    values: dict
    status: str
    step: int
    steps: int
    train_loss: float | None = None
    validation: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)  # name: (final, change)
    history: list[StageRun] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        return {"name": self.name, "labels": self.labels, "values": self.values, "status": self.status,
                "step": self.step, "steps": self.steps, "train_loss": self.train_loss,
                "validation": {n: {"final": f, "change": c} for n, (f, c) in self.validation.items()}}


def collect(sweep: Sweep) -> list[RunResult]:
    return [_result(sweep, run) for run in sweep.runs]


def _result(sweep: Sweep, run) -> RunResult:
    config = load_config(sweep.config_path(run.name))
    result = RunResult(run.name, run.labels, run.values, NOT_STARTED, 0, config.train.steps)
    finished = is_finished(config)
    try:
        result.history = run_lineage(Path(config.run_dir)).logged
    except UserError:
        if finished:  # a finished run's metrics must be readable; an unfinished one may have none yet
            raise
        return result
    own = result.history[-1]
    if own.train:
        result.step, result.train_loss = own.train[-1]["step"], own.train[-1]["loss"]
    result.status = DONE if finished else PARTIAL
    result.validation = {v.name: final_and_change(result.history, v.name) for v in config.data.validation}
    return result


# ------------------------------------------------------------------------------------ groups over seeds


def group_key(sweep: Sweep, labels: dict[str, str]) -> tuple[str, ...]:
    return tuple(labels[a.key] for a in sweep.axes if a.key != SEED)


def groups(sweep: Sweep, results: list[RunResult]) -> list[dict]:
    """One entry per combination of the non-seed values: the finished runs' mean, standard deviation and count
    of the training loss and of each validation set's final loss and change."""
    keys = [a.key for a in sweep.axes if a.key != SEED]
    by_key: dict[tuple, list[RunResult]] = {}
    for result in results:
        by_key.setdefault(group_key(sweep, result.labels), []).append(result)
    names = validation_names(results)
    out = []
    for key, members in by_key.items():
        done = [r for r in members if r.status == DONE]
        out.append({
            "labels": dict(zip(keys, key)),
            "runs": [r.name for r in members],
            "done": len(done),
            "train_loss": _stats([r.train_loss for r in done]),
            "validation": {n: {part: _stats([r.validation[n][i] for r in done if n in r.validation])
                               for i, part in enumerate(("final", "change"))} for n in names},
        })
    return out


def validation_names(results: list[RunResult]) -> list[str]:
    """Every validation set of any run, in the order the configs list them."""
    return list(dict.fromkeys(n for r in results for n in r.validation))


def _stats(values: list[float | None]) -> dict:
    known = [v for v in values if v is not None]
    return {"mean": statistics.fmean(known) if known else None,
            "std": statistics.stdev(known) if len(known) > 1 else None, "n": len(known)}


# ------------------------------------------------------------------------------------ table, file, figure


def sweep_table(sweep: Sweep, results: list[RunResult]) -> str:
    """One row per run: its values, status, final training loss, each validation set's final loss (change)."""
    names = validation_names(results)
    headers = ["run", *(a.key for a in sweep.axes), "status", TRAIN_LOSS, *names]
    rows = []
    for r in results:
        status = r.status if r.status != PARTIAL else f"step {r.step}/{r.steps}"
        rows.append([r.name, *(r.labels[a.key] for a in sweep.axes), status, _number(r.train_loss),
                     *(_final_change(*r.validation.get(n, (None, None))) for n in names)])
    return text_table(rows, headers)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _final_change(final: float | None, change: float | None) -> str:
    return _number(final) + ("" if change is None else f" ({change:+.4f})")


def write_report(sweep: Sweep, results: list[RunResult] | None = None, extra: dict | None = None) -> dict:
    """Write summary.json (with `extra`'s keys, e.g. the demo's checks), summary.txt and the figure into the
    sweep's directory; print the table. `results` default to `collect(sweep)`."""
    results = collect(sweep) if results is None else results
    summary = {"axes": [a.key for a in sweep.axes], "runs": [r.summary() for r in results],
               "groups": groups(sweep, results), **(extra or {})}
    write_output(sweep.root / "summary.json", json.dumps(summary, indent=1) + "\n", "the sweep's summary", True)
    table = sweep_table(sweep, results)
    write_output(sweep.root / "summary.txt", table + "\n", "the sweep's table", True)
    print(table, flush=True)
    waiting = [r.name for r in results if r.status != DONE]
    print(f"{len(results) - len(waiting)} of {len(results)} runs done"
          + (f"; not yet done: {', '.join(waiting)}" if waiting else ""), flush=True)
    _write_figure(sweep, summary)
    return summary


def _write_figure(sweep: Sweep, summary: dict) -> None:
    """The figure, or a note where matplotlib is missing: the numbers above are the report's substance."""
    try:
        fig = build_figure(sweep, summary["groups"])
    except UserError as e:
        print(f"no {FIGURE}: {e}", flush=True)
        return
    save_figure(fig, sweep.root / FIGURE, "the sweep's figure", True, dpi=110)  # each report replaces the last
    print(f"figure: {sweep.root / FIGURE}", flush=True)


def build_figure(sweep: Sweep, group_list: list[dict]):
    """One panel for the training loss and one per validation set; x: the first swept key's values (in sweep
    order); one line per combination of the other keys; error bars: standard deviation over seeds."""
    axes = [a for a in sweep.axes if a.key != SEED]
    x_axis, others = (axes[0], axes[1:]) if axes else (None, [])
    x_labels = list(x_axis.labels) if x_axis else ["all runs"]
    names = list(dict.fromkeys(n for g in group_list for n in g["validation"]))  # the same in every group
    panels = [(TRAIN_LOSS, lambda g: g["train_loss"])] + [(n, lambda g, n=n: g["validation"][n]["final"])
                                                          for n in names]
    fig = new_figure(FIGURE, figsize=(4.2 * len(panels), 3.8), layout="constrained")
    for ax, (title, stats_of) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        lines: dict[str, list[tuple[int, dict]]] = {}
        for g in group_list:
            label = ", ".join(f"{a.key}={g['labels'][a.key]}" for a in others) or None
            x = x_labels.index(g["labels"][x_axis.key]) if x_axis else 0
            lines.setdefault(label, []).append((x, stats_of(g)))
        for label, points in lines.items():
            points = [(x, s) for x, s in points if s["mean"] is not None]
            if points:
                ax.errorbar([x for x, _ in points], [s["mean"] for _, s in points],
                            yerr=[s["std"] or 0.0 for _, s in points], marker="o", capsize=4, label=label)
        ax.set_xticks(range(len(x_labels)), x_labels)
        ax.set_xlabel(x_axis.key if x_axis else "")
        ax.set_title(f"{title} (final)" if title != TRAIN_LOSS else title)
        ax.grid(alpha=0.3)
    fig.axes[0].set_ylabel("loss (nats/token)")
    if others:
        fig.axes[-1].legend(fontsize="small")
    return fig
