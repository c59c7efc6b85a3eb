"""`megacpt sweep BASE.json --grid KEY=V1,V2 [...] [--seeds N] --workdir DIR [--run local|slurm]` and
`megacpt sweep --report DIR`: argument parsing and printing only; the work is in grid, execute, slurm and
report (docs/SWEEP.md)."""
from __future__ import annotations

import argparse
from pathlib import Path

from megacpt.cli_helpers import add_set_argument, non_negative_int, positive_int
from megacpt.config import TrainConfig, apply_override, read_config_file
from megacpt.errors import UserError
from megacpt.files import check_writable_folder
from megacpt.sweep import execute, grid, slurm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", nargs="?", metavar="BASE.json", help="the config every run starts from")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="a swept config key and its values, as --set takes them (repeatable: the cartesian "
                             "product); KEY=[JSON, values] for values with commas")
    parser.add_argument("--seeds", type=non_negative_int, default=0, metavar="N",
                        help="run every combination with N seeds: train.seed = data.seed = the base's train.seed "
                             "+ 0 .. N-1")
    add_set_argument(parser)  # applied to the base config, so to every run
    parser.add_argument("--init", metavar="RUN_OR_CHECKPOINT",
                        help="every run is a new stage from this checkpoint (a run directory: its latest)")
    parser.add_argument("--workdir", metavar="DIR", help="where configs/, runs/, logs/ and the report go")
    parser.add_argument("--run", choices=("local", "slurm"), default="local",
                        help="local: train the runs one after another here (default); slurm: write a job-array "
                             "script and print its sbatch command")
    parser.add_argument("--nproc", type=positive_int, default=1, metavar="N",
                        help="ranks per run (local: under the deepspeed launcher when N > 1) or per node (slurm)")
    slurm_group = parser.add_argument_group("--run slurm")
    slurm_group.add_argument("--nodes", type=positive_int, default=1, metavar="N", help="nodes per run (default 1)")
    slurm_group.add_argument("--launcher", choices=tuple(slurm.LAUNCH_SCRIPTS), default="deepspeed",
                             help="launch/slurm_deepspeed.sbatch (default) or launch/slurm_srun_tasks.sbatch")
    slurm_group.add_argument("--max-parallel", type=positive_int, metavar="M",
                             help="at most M runs at a time (--array=...%%M)")
    slurm_group.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                             help="an extra #SBATCH line, e.g. --sbatch=--time=4:00:00 (repeatable)")
    slurm_group.add_argument("--launch-dir", type=Path, default=slurm.default_launch_dir(), metavar="DIR",
                             help="the launch/ folder of the megacpt checkout (default: next to this package)")
    parser.add_argument("--report", metavar="DIR", help="only write the report of the sweep in DIR")


def run(args: argparse.Namespace) -> int:
    from megacpt.sweep import report  # reads checkpoints (torch): imported once the arguments are checked

    if args.report:
        if args.base or args.grid or args.workdir:
            raise UserError("--report DIR takes no BASE.json, --grid or --workdir: it reports the sweep in DIR")
        report.write_report(grid.read_sweep(Path(args.report)))
        return 0
    if not args.base or not args.workdir:
        raise UserError("give BASE.json and --workdir DIR (or --report DIR for the report of an existing sweep)")
    check_writable_folder(Path(args.workdir), "--workdir")
    sweep = build_sweep(args)
    grid.write_sweep(sweep)
    print(f"sweep of {len(sweep.runs)} runs in {sweep.root}: configs in {sweep.root / 'configs'}", flush=True)
    if args.run == "slurm":
        return submit_slurm(sweep, args)
    execute.stop_on_sigterm()
    failed = execute.run_sweep(sweep, args.nproc)
    report.write_report(sweep)
    if failed:
        raise UserError(f"{len(failed)} of {len(sweep.runs)} runs failed: {', '.join(failed)} (logs in "
                        f"{sweep.root / 'logs'}); run the same command again to retry them")
    return 0


def build_sweep(args: argparse.Namespace) -> grid.Sweep:
    """The base config with --set and --init applied, expanded over the grid; validated, nothing written."""
    base = read_config_file(args.base)
    for item in args.overrides:
        apply_override(base, item)
    if args.init:
        base.setdefault("init", {}).update(checkpoint=str(init_checkpoint(Path(args.init))), mode="new_stage")
    seeds = []
    if args.seeds:
        train = base.get("train") if isinstance(base.get("train"), dict) else {}
        first = train.get("seed", TrainConfig.model_fields["seed"].default)
        if not isinstance(first, int):
            raise UserError(f"--seeds counts up from the base's train.seed, which is {first!r}, not an integer")
        seeds = [first + k for k in range(args.seeds)]
    return grid.expand(base, grid.grid_axes(args.grid, seeds), Path(args.workdir), args.base)


def init_checkpoint(path: Path) -> Path:
    """--init: a run directory (its checkpoints' latest), a checkpoints folder or one tag, as the tag folder, so
    that every run starts from the same checkpoint even if the run it names goes on training."""
    from megacpt.checkpoint.tags import resolve_tag
    from megacpt.run_dir import checkpoint_dir

    if (checkpoint_dir(path)).is_dir():
        path = checkpoint_dir(path)
    return resolve_tag(path, key="--init").resolve()


def submit_slurm(sweep: grid.Sweep, args: argparse.Namespace) -> int:
    from megacpt.config import load_config

    unfinished = [i for i, r in enumerate(sweep.runs)
                  if not execute.is_finished(load_config(sweep.config_path(r.name)))]
    if not unfinished:
        print(f"all {len(sweep.runs)} runs are finished; nothing to submit. "
              f"Report: megacpt sweep --report {sweep.root}")
        return 0
    path = slurm.write_array_script(sweep, unfinished, args.launch_dir, args.launcher, args.nodes, args.nproc,
                                    args.max_parallel, args.sbatch)
    print(f"wrote {path}: {len(unfinished)} array tasks ({len(sweep.runs) - len(unfinished)} runs already finished)")
    print("submit it with:")
    print(f"  sbatch {path}")
    print(f"then report with: megacpt sweep --report {sweep.root}")
    return 0
