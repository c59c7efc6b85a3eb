"""`megacpt schedule CONFIG [CONFIG ...] --csv FILE [--plot FILE.png]`: the LR and the samples per source of every
step of a chain of stages.

It reads only the configs and evaluates `megacpt.schedule.lr_at` and the blend's arithmetic
(`megacpt.data.datasets.build_blend`, the apportionment training uses): no model, no data files, no torch, so
a schedule and a data mix can be checked and plotted in a second before a run spends any compute. Several configs are
the stages of one chain, each starting where the one before ends (a stage with `schedule.rewarm` false is
checked against the stage before it, as `megacpt train` would check it against its checkpoint).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from megacpt.cli_helpers import (
    add_overwrite_argument,
    add_set_argument,
    new_figure,
    non_negative_int,
    require_matplotlib,
    save_figure,
)
from megacpt.config import RunConfig, load_config
from megacpt.data.datasets import build_blend
from megacpt.files import check_output, write_output
from megacpt.schedule import check_continuation, check_schedule, lr_at


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("configs", nargs="+", metavar="CONFIG",
                        help="JSON run config; several are consecutive stages of one chain")
    parser.add_argument("--csv", required=True, metavar="FILE",
                        help="write 'step,stage,lr' and then one column of samples per source ('samples:NAME') for "
                             "every step, counted from the first stage's start")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="also plot the LR and the samples per source against the step (needs matplotlib)")
    add_set_argument(parser)
    add_overwrite_argument(parser)
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


def stage_samples(config: RunConfig) -> dict[str, np.ndarray]:
    """{source: samples it contributes to each step of the stage}, from the start of the data."""
    steps, batch = config.train.steps, config.train.global_batch_size
    blend, names = build_blend(config.data, steps, batch, steps * batch)
    return dict(zip(names, blend.counts.T))


def run(args: argparse.Namespace) -> int:
    for option, path in (("--csv", args.csv), ("--plot", args.plot)):
        if path:  # both before either is written
            check_output(path, option, args.overwrite, args.configs)
    configs = [load_config(path, args.overrides) for path in args.configs]
    stages = stage_lrs(configs, args.stage_index)
    samples = [stage_samples(c) for c in configs]
    if args.plot:
        require_matplotlib("--plot")
    names = list(dict.fromkeys(name for per_stage in samples for name in per_stage))
    # repr() keeps every digit, so the CSV reproduces lr_at exactly.
    rows, step = [], 0
    for (index, lrs), per_stage in zip(stages, samples):
        for t, lr in enumerate(lrs):
            counts = [str(per_stage[n][t]) if n in per_stage else "0" for n in names]
            rows.append(",".join([str(step), str(index), repr(lr), *counts]))
            step += 1
    header = ",".join(["step", "stage", "lr", *(f"samples:{n}" for n in names)])
    write_output(args.csv, "\n".join([header, *rows]) + "\n", "--csv", args.overwrite, args.configs)
    if args.plot:
        labels = [f"stage {index}: {Path(p).stem} ({c.schedule.style}{'' if c.schedule.rewarm else ', no re-warm'})"
                  for (index, _), p, c in zip(stages, args.configs, configs)]
        _plot(Path(args.plot), stages, labels, samples, names, args.overwrite, args.configs)
    for (index, lrs), per_stage, config in zip(stages, samples, configs):
        print(f"stage {index}: {len(lrs)} steps, LR from {lrs[0]:.3g} (step 0), peak {max(lrs):.3g}, "
              f"to {lrs[-1]:.3g} (step {len(lrs) - 1})")
        batch = config.train.global_batch_size
        print("  samples: " + ", ".join(
            f"{n} {int(c.sum())} ({c.sum() / (batch * len(lrs)):.1%}; {c[0] / batch:.1%} of step 0, "
            f"{c[-1] / batch:.1%} of step {len(lrs) - 1})" for n, c in per_stage.items()))
    print(f"-> {args.csv}")
    return 0


def _plot(path: Path, stages: list[tuple[int, list[float]]], labels: list[str],
          samples: list[dict[str, np.ndarray]], names: list[str], overwrite: bool, inputs: list[str]) -> None:
    fig = new_figure("--plot", figsize=(8, 6), layout="tight")
    ax, mix = fig.subplots(2, 1, sharex=True)
    start = 0
    for (_, lrs), label in zip(stages, labels):
        ax.plot(range(start, start + len(lrs)), lrs, linewidth=1.2, label=label)
        if start:
            for a in (ax, mix):
                a.axvline(start, color="grey", linewidth=0.6, linestyle=":")
        start += len(lrs)
    per_step = np.concatenate([np.stack([s.get(n, np.zeros(len(lrs), dtype=np.int64)) for n in names])
                               for s, (_, lrs) in zip(samples, stages)], axis=1)
    mix.stackplot(range(start), per_step, labels=names, alpha=0.8)
    ax.set(ylabel="learning rate")
    mix.set(xlabel="step" if len(stages) == 1 else "step (stages one after another)", ylabel="samples per step")
    for a in (ax, mix):
        a.grid(alpha=0.3)
        a.legend(fontsize="small")
    save_figure(fig, path, "--plot", overwrite, inputs)
