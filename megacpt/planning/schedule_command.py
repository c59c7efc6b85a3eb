"""`megacpt schedule CONFIG [CONFIG ...] --csv FILE [--plot FILE.png]`: the LR of every step of a chain of stages.

It reads only the configs and evaluates `megacpt.schedule.lr_at`: no model, no torch, no torch.distributed,
so a schedule can be checked and plotted in a second before a run spends any compute. Several configs are
the stages of one chain, each starting where the one before ends (a stage with `schedule.rewarm` false is
checked against the stage before it, as `megacpt train` would check it against its checkpoint).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from megacpt.cli_helpers import add_set_argument, new_figure, non_negative_int, require_matplotlib, save_figure
from megacpt.config import RunConfig, load_config
from megacpt.files import write_output
from megacpt.schedule import check_continuation, check_schedule, lr_at


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("configs", nargs="+", metavar="CONFIG",
                        help="JSON run config; several are consecutive stages of one chain")
    parser.add_argument("--csv", required=True, metavar="FILE",
                        help="write 'step,stage,lr' for every step, counted from the first stage's start")
    parser.add_argument("--plot", metavar="FILE.png", help="also plot the LR against the step (needs matplotlib)")
    add_set_argument(parser)
    parser.add_argument("--stage-index", type=non_negative_int, default=0, metavar="N",
                        help="stage index tau of the first config for meta schedules (0 = first stage); default 0")


def stage_lrs(configs: list[RunConfig], first_index: int) -> list[tuple[int, list[float]]]:
    """(stage index, LR of every step) for each stage of the chain, after checking every link."""
    stages = []
    for k, config in enumerate(configs):
        check_schedule(config.schedule, config.train.steps)
        if k > 0:
            before = configs[k - 1]
            check_continuation(config.schedule, before.schedule, before.train.steps, before.train.steps)
        index = first_index + k
        steps = config.train.steps
        stages.append((index, [lr_at(config.schedule, steps, t, index) for t in range(steps)]))
    return stages


def run(args: argparse.Namespace) -> int:
    configs = [load_config(path, args.overrides) for path in args.configs]
    stages = stage_lrs(configs, args.stage_index)
    if args.plot:
        require_matplotlib("--plot")
    # repr() keeps every digit, so the CSV reproduces lr_at exactly.
    rows = [f"{step},{index},{lr!r}" for step, (index, lr) in enumerate(
        (index, lr) for index, lrs in stages for lr in lrs)]
    write_output(args.csv, "\n".join(["step,stage,lr", *rows]) + "\n", "--csv")
    if args.plot:
        labels = [f"stage {index}: {Path(p).stem} ({c.schedule.style}{'' if c.schedule.rewarm else ', no re-warm'})"
                  for (index, _), p, c in zip(stages, args.configs, configs)]
        _plot(Path(args.plot), stages, labels)
    for index, lrs in stages:
        print(f"stage {index}: {len(lrs)} steps, LR from {lrs[0]:.3g} (step 0), peak {max(lrs):.3g}, "
              f"to {lrs[-1]:.3g} (step {len(lrs) - 1})")
    print(f"-> {args.csv}")
    return 0


def _plot(path: Path, stages: list[tuple[int, list[float]]], labels: list[str]) -> None:
    fig = new_figure("--plot", figsize=(8, 4), layout="tight")
    ax = fig.subplots()
    start = 0
    for (_, lrs), label in zip(stages, labels):
        ax.plot(range(start, start + len(lrs)), lrs, linewidth=1.2, label=label)
        if start:
            ax.axvline(start, color="grey", linewidth=0.6, linestyle=":")
        start += len(lrs)
    ax.set(xlabel="step" if len(stages) == 1 else "step (stages one after another)", ylabel="learning rate")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, "--plot")
