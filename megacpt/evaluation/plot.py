"""`megacpt plot RUN_DIR [RUN_DIR ...] --output FILE.png [--table]`: the forgetting/adaptation figure.

For each run, the LR and every validation set's loss against the tokens the model has seen, over the run's
own stage and the earlier stages it grew from: a stage's `stage_start` record names the checkpoint it
started from, whose megacpt state lists every earlier stage with its run directory and the step the next
stage started from; their metrics.jsonl supply the records up to that step. One colour per run, dashed
vertical lines where stages begin. `--table` prints each run's final validation losses and their change since
its stage began (the last evaluation before the stage).
Reads metrics.jsonl and checkpoint states only: no torch, no model.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from megacpt import checkpoint
from megacpt.errors import UserError

METRICS = "metrics.jsonl"


@dataclass
class Stage:
    """One stage's records from one run directory, cut at the step a later stage started from."""

    run_dir: Path
    start_tokens: float | None  # tokens seen before this stage (None: unknown, its checkpoint is gone)
    train: list[dict] = field(default_factory=list)  # training records, one per step
    evals: list[dict] = field(default_factory=list)  # evaluation records, one per step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (each holds metrics.jsonl)")
    parser.add_argument("--output", required=True, metavar="FILE.png", help="where to write the figure")
    parser.add_argument("--table", action="store_true", help="also print the final validation losses side by side")


def run(args: argparse.Namespace) -> int:
    histories = {str(run_dir): stage_history(Path(run_dir)) for run_dir in args.run_dirs}
    figure = build_figure(histories)
    try:
        figure.savefig(args.output, dpi=120)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot write --output {args.output}: {e}") from None
    print(f"wrote {args.output}")
    if args.table:
        print(format_table(histories))
    return 0


# ------------------------------------------------------------------------------------ reading runs


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl; a UserError naming the path when there are none."""
    path = run_dir / METRICS
    if not path.is_file():
        what = "does not exist" if not run_dir.exists() else f"holds no {METRICS}"
        raise UserError(f"run directory {run_dir} {what}: give the run_dir of a `megacpt train` run")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {number} is not JSON: {e.msg}") from None
    if not any("loss" in r or "eval" in r for r in records):
        raise UserError(f"{path} holds no training or evaluation records yet")
    return records


def stage_history(run_dir: Path) -> list[Stage]:
    """This run's stage after the earlier stages its init checkpoint's stage history names (oldest first).

    Earlier stages whose run directory or metrics.jsonl is gone (a model imported from Hugging Face has none)
    are left out; when the init checkpoint itself is gone, only this run's stage remains, its start unknown.
    """
    records = read_metrics(run_dir)
    starts = [r for r in records if r.get("event") == "stage_start"]
    init = starts[-1]["init"] if starts else None
    own = _stage(run_dir, records, None, 0.0 if starts else None)
    if init is None:
        return [own]
    if not (Path(init) / checkpoint.STATE_FILE).is_file():
        own.start_tokens = None
        return [own]
    state = checkpoint.read_state(Path(init))
    own.start_tokens = state["tokens"]
    earlier, tokens = [], 0
    for entry in state["stages"]:
        earlier_dir = Path(entry["run_dir"]) if entry.get("run_dir") else None
        if earlier_dir is not None and (earlier_dir / METRICS).is_file():
            earlier.append(_stage(earlier_dir, read_metrics(earlier_dir), entry["steps_done"], tokens))
        tokens += entry["steps_done"] * entry.get("global_batch_size", 0) * entry.get("seq_length", 0)
    return earlier + [own]


def _stage(run_dir: Path, records: list[dict], until_step: int | None, start_tokens: float | None) -> Stage:
    kept = [r for r in records if until_step is None or r["step"] <= until_step]
    return Stage(run_dir, start_tokens, _last_per_step(kept, "loss"), _last_per_step(kept, "eval"))


def _last_per_step(records: list[dict], key: str) -> list[dict]:
    """The last record holding `key` for each step (a resumed run logs the steps after its checkpoint again)."""
    by_step = {r["step"]: r for r in records if key in r}
    return [by_step[step] for step in sorted(by_step)]


def validation_names(histories: dict[str, list[Stage]]) -> list[str]:
    """Every validation set any run evaluated, in order of first appearance (one panel and one table row each)."""
    names: dict[str, None] = {}
    for stages in histories.values():
        for stage in stages:
            for record in stage.evals:
                names.update(dict.fromkeys(record["eval"]))
    return list(names)


# ------------------------------------------------------------------------------------ the figure


def build_figure(histories: dict[str, list[Stage]]):
    """A matplotlib Figure: LR on top, one panel per validation set below; one line per run in each panel.

    Data lines have gid 'run' and label RUN_DIR; stage boundaries are vertical lines with gid 'stage'.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("megacpt plot needs matplotlib: pip install 'megacpt[viz]'") from None

    names = validation_names(histories)
    figure = Figure(figsize=(9, 2.6 * (1 + len(names))), layout="constrained")
    axes = figure.subplots(1 + len(names), 1, sharex=True, squeeze=False)[:, 0]
    colours = [f"C{i % 10}" for i in range(len(histories))]
    for colour, (label, stages) in zip(colours, histories.items()):
        train = [r for s in stages for r in s.train]
        axes[0].plot([r["tokens"] for r in train], [r["lr"] for r in train], color=colour, label=label, gid="run")
        for ax, name in zip(axes[1:], names):
            points = [(r["tokens"], r["eval"][name]) for s in stages for r in s.evals if name in r["eval"]]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, "o-", markersize=3, color=colour, label=label, gid="run")
        for stage in stages:
            if stage.start_tokens:  # not at 0 (the first stage), nor unknown (its checkpoint is gone)
                for ax in axes:
                    ax.axvline(stage.start_tokens, color=colour, linestyle="--", linewidth=0.8, alpha=0.6, gid="stage")
    axes[0].set_ylabel("learning rate")
    axes[0].legend(fontsize="small")
    for ax, name in zip(axes[1:], names):
        ax.set_ylabel(f"{name} loss")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("tokens seen")
    figure.suptitle("validation loss per dataset across stages (dashed: stage starts)")
    return figure


# ------------------------------------------------------------------------------------ the table


def final_and_change(stages: list[Stage], name: str) -> tuple[float | None, float | None]:
    """The run's last loss on `name` and its change since the stage began (None where unknown)."""
    own = [r["eval"][name] for r in stages[-1].evals if name in r["eval"]]
    before = [r["eval"][name] for s in stages[:-1] for r in s.evals if name in r["eval"]]
    final = own[-1] if own else None
    change = final - before[-1] if final is not None and before else None
    return final, change


def format_table(histories: dict[str, list[Stage]]) -> str:
    """Rows: validation sets; columns: runs; cells: final loss (change since the stage began)."""
    names = validation_names(histories)
    header = ["validation set"] + list(histories)
    rows = []
    for name in names:
        cells = [name]
        for stages in histories.values():
            final, change = final_and_change(stages, name)
            cells.append("-" if final is None else f"{final:.4f}" + ("" if change is None else f" ({change:+.4f})"))
        rows.append(cells)
    tokens = ["tokens"] + [_last_tokens(stages) for stages in histories.values()]
    widths = [max(len(row[i]) for row in [header, tokens, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell,
                               w in zip(row, widths)).rstrip() for row in [header, tokens, *rows])


def _last_tokens(stages: list[Stage]) -> str:
    records = stages[-1].train + stages[-1].evals
    tokens = max((r["tokens"] for r in records if "tokens" in r), default=math.nan)
    return f"{tokens:,.0f}"
