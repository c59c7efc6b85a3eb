"""`megacpt sweep --run slurm`: a SLURM job-array script, one array task per run that is not finished yet.

Each array task runs one of the launch scripts in launch/ (`slurm_deepspeed.sbatch`, or
`slurm_srun_tasks.sbatch`) on its run's config, so a sweep's run starts, checkpoints on SLURM's USR1, and
resumes after a requeue exactly as a single job does (docs/LAUNCH.md). The resources (`#SBATCH` lines) are
the array task's, since the launch script's own `#SBATCH` lines are comments when it is run from another
script; like those scripts it assumes no GPUs (`--sbatch=--gpus-per-node=8` asks for them) and sets the ranks
per node with GPUS_PER_NODE. This module writes the script and the sbatch command; it submits nothing.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from megacpt.errors import UserError
from megacpt.files import write_atomic
from megacpt.sweep.grid import Sweep

SCRIPT = "sweep.sbatch"
LAUNCH_SCRIPTS = {"deepspeed": "slurm_deepspeed.sbatch", "tasks": "slurm_srun_tasks.sbatch"}


def default_launch_dir() -> Path:
    """launch/ of the repository this megacpt runs from (an editable install or a checkout)."""
    return Path(__file__).resolve().parents[2] / "launch"


def array_spec(indices: list[int], max_parallel: int | None) -> str:
    """SLURM's --array value: ranges of consecutive indices, e.g. [0, 1, 2, 5] -> '0-2,5', then '%M'."""
    parts, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ",".join(parts) + (f"%{max_parallel}" if max_parallel else "")


def array_script(sweep: Sweep, indices: list[int], launch_dir: Path, launcher: str, nodes: int,
                 ranks_per_node: int, max_parallel: int | None, extra: list[str], workdir: Path) -> str:
    """The batch script: #SBATCH lines for one array task, the run configs, the launch script for task i."""
    tasks_per_node = ranks_per_node if launcher == "tasks" else 1
    options = [f"--job-name=megacpt-sweep-{sweep.root.name}", f"--array={array_spec(indices, max_parallel)}",
               f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", "--exclusive", "--signal=B:USR1@120",
               "--requeue", "--open-mode=append", f"--chdir={workdir}",
               f"--output={sweep.root / 'logs' / 'slurm-%A_%a.log'}", *extra]
    configs = "\n".join(f"  {shlex.quote(str(sweep.config_path(r.name)))}  # {i}" for i, r in enumerate(sweep.runs))
    return "\n".join([
        "#!/bin/bash",
        *(f"#SBATCH {option}" for option in options),
        "#",
        f"# megacpt sweep {sweep.root}: array task i trains run i of the list below with",
        f"# launch/{LAUNCH_SCRIPTS[launcher]} (docs/SWEEP.md, docs/LAUNCH.md). Written by `megacpt sweep --run slurm`;",
        "# a finished run is left out of --array; a requeued task resumes its run from its checkpoint.",
        "set -euo pipefail",
        f"configs=(\n{configs}\n)",
        f"export MEGACPT_LAUNCH_DIR={shlex.quote(str(launch_dir))}",
        f'export GPUS_PER_NODE="${{GPUS_PER_NODE:-{ranks_per_node}}}"',
        f'exec bash "$MEGACPT_LAUNCH_DIR/{LAUNCH_SCRIPTS[launcher]}" "${{configs[$SLURM_ARRAY_TASK_ID]}}"',
        "",
    ])


def write_array_script(sweep: Sweep, unfinished: list[int], launch_dir: Path, launcher: str = "deepspeed",
                       nodes: int = 1, ranks_per_node: int = 1, max_parallel: int | None = None,
                       extra: list[str] = (), workdir: Path | None = None) -> Path:
    """Write DIR/sweep.sbatch for the runs at `unfinished` (indices into sweep.runs); returns its path."""
    script = launch_dir / LAUNCH_SCRIPTS[launcher]
    if not script.is_file():
        raise UserError(f"--launch-dir {launch_dir} holds no {LAUNCH_SCRIPTS[launcher]}: give the launch/ folder of a "
                        f"megacpt checkout")
    bad = [o for o in extra if not o.startswith("--")]
    if bad:
        raise UserError(f"--sbatch takes sbatch options such as --time=4:00:00, got '{bad[0]}'")
    text = array_script(sweep, unfinished, launch_dir.resolve(), launcher, nodes, ranks_per_node, max_parallel,
                        list(extra), (workdir or Path.cwd()).resolve())
    (sweep.root / "logs").mkdir(parents=True, exist_ok=True)  # SLURM does not create the --output folder
    path = sweep.root / SCRIPT
    write_atomic(path, text)
    path.chmod(0o755)
    return path
