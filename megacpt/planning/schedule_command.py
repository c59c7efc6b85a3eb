"""`megacpt schedule CONFIG --csv FILE [--plot FILE.png]`: the LR of every step of a config's stage.

It reads only the config and evaluates `megacpt.schedule.lr_at`: no model, no torch, no torch.distributed,
so a schedule can be checked and plotted in a second before a run spends any compute.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from megacpt.config import load_config
from megacpt.errors import UserError
from megacpt.schedule import check_schedule, lr_at


def _stage_index(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="JSON run config")
    parser.add_argument("--csv", required=True, metavar="FILE",
                        help="write 'step,stage,lr' for steps 0 .. train.steps - 1")
    parser.add_argument("--plot", metavar="FILE.png", help="also plot the LR against the step (needs matplotlib)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="dotted.key=value",
                        help="override a config key (repeatable)")
    parser.add_argument("--stage-index", type=_stage_index, default=0, metavar="N",
                        help="stage index tau for meta schedules (0 = first stage); default 0")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    steps = config.train.steps
    check_schedule(config.schedule, steps)
    lrs = [lr_at(config.schedule, steps, t, args.stage_index) for t in range(steps)]
    _write_csv(Path(args.csv), args.stage_index, lrs)
    if args.plot:
        _plot(Path(args.plot), args.stage_index, lrs, title=f"{Path(args.config).name}: {config.schedule.style}")
    print(f"{steps} steps, stage {args.stage_index}: LR from {lrs[0]:.3g} (step 0), peak {max(lrs):.3g}, to "
          f"{lrs[-1]:.3g} (step {steps - 1}) -> {args.csv}")
    return 0


def _write_csv(path: Path, stage: int, lrs: list[float]) -> None:
    # repr() keeps every digit, so the CSV reproduces lr_at exactly.
    lines = ["step,stage,lr"] + [f"{t},{stage},{lr!r}" for t, lr in enumerate(lrs)]
    try:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write --csv {path}: {e.strerror}") from None


def _plot(path: Path, stage: int, lrs: list[float], title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'megacpt[viz]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(range(len(lrs)), lrs, linewidth=1.2, label=f"stage {stage}")
    ax.set(xlabel="step within the stage", ylabel="learning rate", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise UserError(f"cannot write --plot {path}: {e.strerror}") from None
    finally:
        plt.close(fig)
