"""`megacpt plot RUN_DIR [RUN_DIR ...] --output FILE.png [--table]`: the forgetting/adaptation figure.

For each run, the LR and every validation set's loss against the tokens the model has seen, over the run's
own stage and the earlier stages it grew from: a stage's `stage_start` record names the checkpoint it
started from, whose megacpt state lists every earlier stage with its run directory and the step the next
stage started from; their metrics.jsonl supply the records up to that step. One colour per run, dashed
vertical lines where stages begin. `--table` prints each run's final validation losses and their change since
its stage began (the last evaluation before the stage). `--by-position` draws instead, per validation set,
the loss against the position in the sample (the `eval_by_position` buckets of `train.eval_position_bucket`)
of the last evaluation of every stage of every run: the earlier stage's short-context curve next to a
longer stage's.
Earlier stages whose run directory or metrics.jsonl is gone (a model imported from Hugging Face has none)
are left out; when the init checkpoint itself is gone, only the run's own stage remains, its start unknown.
Reads metrics.jsonl and checkpoint states only (through `megacpt.evaluation.lineage.run_lineage`): no torch, no model.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from megacpt.cli_helpers import add_overwrite_argument, new_figure, save_figure
from megacpt.errors import UserError
from megacpt.evaluation.forgetting import forgetting_table, validation_names
from megacpt.evaluation.lineage import StageRun, run_lineage
from megacpt.run_dir import METRICS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (each holds metrics.jsonl)")
    parser.add_argument("--output", required=True, metavar="FILE.png", help="where to write the figure")
    parser.add_argument("--table", action="store_true", help="also print the final validation losses side by side")
    parser.add_argument("--by-position", action="store_true",
                        help="loss against position in the sample (eval_by_position) of each stage's last evaluation")
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    histories = {str(run_dir): run_lineage(Path(run_dir)).logged for run_dir in args.run_dirs}
    inputs = [stage.run_dir / METRICS for runs in histories.values() for stage in runs if stage.run_dir]
    if args.by_position:
        curves = position_curves(histories)
        if not curves:
            raise UserError(f"{', '.join(args.run_dirs)}: no evaluation record carries eval_by_position; train with "
                            "train.eval_position_bucket set (or run `megacpt eval --position-bucket N`)")
        save_figure(position_figure(curves), args.output, "--output", args.overwrite, inputs)
    else:
        save_figure(build_figure(histories), args.output, "--output", args.overwrite, inputs)
    print(f"wrote {args.output}")
    if args.table:
        print(forgetting_table(histories))
    return 0


# ------------------------------------------------------------------------------------ the figure


def build_figure(histories: dict[str, list[StageRun]]):
    """A matplotlib Figure: LR on top, one panel per validation set below; one line per run in each panel.

    Data lines have gid 'run' and label RUN_DIR; stage boundaries are vertical lines with gid 'stage'.
    """
    names = validation_names(histories)
    figure = new_figure("megacpt plot", figsize=(9, 2.6 * (1 + len(names))), layout="constrained")
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


def position_curves(histories: dict[str, list[StageRun]]) -> dict[str, dict[str, dict[str, float]]]:
    """{"RUN_DIR (stage k, step s)": {validation set: {bucket: loss}}}: the last evaluation with eval_by_position
    of every stage of every run, earlier stages first (a stage shared by several runs once)."""
    curves: dict[str, dict] = {}
    for stages in histories.values():
        for stage in stages:
            records = [r for r in stage.evals if "eval_by_position" in r]
            if records and stage.run_dir is not None:
                last = records[-1]
                curves[f"{stage.run_dir} (stage {last['stage']}, step {last['step']})"] = last["eval_by_position"]
    return curves


def position_figure(curves: dict[str, dict[str, dict[str, float]]]):
    """A matplotlib Figure: one panel per validation set, loss against the middle position of each bucket;
    one line (gid 'curve', label the stage) per curve."""
    names = sorted({name for curve in curves.values() for name in curve})
    figure = new_figure("megacpt plot", figsize=(9, 2.8 * len(names)), layout="constrained")
    axes = figure.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    for i, (label, curve) in enumerate(curves.items()):
        for ax, name in zip(axes, names):
            if name in curve:
                spans = [tuple(map(int, bucket.split("-"))) for bucket in curve[name]]
                ax.plot([(a + b) / 2 for a, b in spans], list(curve[name].values()), "o-", markersize=3,
                        color=f"C{i % 10}", label=label, gid="curve")
    for ax, name in zip(axes, names):
        ax.set_ylabel(f"{name} loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    axes[-1].set_xlabel("position in the sample (middle of each bucket)")
    figure.suptitle("validation loss by position, last evaluation of each stage")
    return figure
