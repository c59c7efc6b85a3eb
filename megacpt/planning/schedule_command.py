"""`megacpt schedule CONFIG --csv FILE [--plot FILE.png]`: the LR of every step of a config's stage.

It reads only the config and evaluates `megacpt.schedule.lr_at`: no model, no torch, no torch.distributed,
so a schedule can be checked and plotted in a second before a run spends any compute.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from megacpt.cli_helpers import add_set_argument, new_figure, non_negative_int, require_matplotlib, save_figure
from megacpt.config import load_config
from megacpt.files import write_output
from megacpt.schedule import check_schedule, lr_at


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="JSON run config")
    parser.add_argument("--csv", required=True, metavar="FILE",
                        help="write 'step,stage,lr' for steps 0 .. train.steps - 1")
    parser.add_argument("--plot", metavar="FILE.png", help="also plot the LR against the step (needs matplotlib)")
    add_set_argument(parser)
    parser.add_argument("--stage-index", type=non_negative_int, default=0, metavar="N",
                        help="stage index tau for meta schedules (0 = first stage); default 0")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    steps = config.train.steps
    check_schedule(config.schedule, steps)
    lrs = [lr_at(config.schedule, steps, t, args.stage_index) for t in range(steps)]
    if args.plot:
        require_matplotlib("--plot")
    # repr() keeps every digit, so the CSV reproduces lr_at exactly.
    rows = [f"{t},{args.stage_index},{lr!r}" for t, lr in enumerate(lrs)]
    write_output(args.csv, "\n".join(["step,stage,lr", *rows]) + "\n", "--csv")
    if args.plot:
        _plot(Path(args.plot), args.stage_index, lrs, title=f"{Path(args.config).name}: {config.schedule.style}")
    print(f"{steps} steps, stage {args.stage_index}: LR from {lrs[0]:.3g} (step 0), peak {max(lrs):.3g}, to "
          f"{lrs[-1]:.3g} (step {steps - 1}) -> {args.csv}")
    return 0


def _plot(path: Path, stage: int, lrs: list[float], title: str) -> None:
    fig = new_figure("--plot", figsize=(8, 4), layout="tight")
    ax = fig.subplots()
    ax.plot(range(len(lrs)), lrs, linewidth=1.2, label=f"stage {stage}")
    ax.set(xlabel="step within the stage", ylabel="learning rate", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, "--plot")
