"""What a run owns on disk: RUN_DIR, held under an exclusive lock for the run's life, the names of every
file and folder in it (this module is their one owner), and the files a restart rewrites (config.json,
metrics.jsonl).

The lock is an OS file lock (flock through the `filelock` package) on RUN_DIR/.megacpt.lock: it dies with its
process, so a killed run never leaves a stale lock, and a second run on the same folder (a requeued job that
starts while the old one still runs) stops with the holder's host and pid instead of overwriting its tags.
On shared file systems flock must reach across nodes (NFS does; Lustre needs the `flock` mount option).
Only the main process of a launch takes it. This module does not know about checkpoints' contents.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import filelock

from megacpt.errors import ConfigError, UserError
from megacpt.files import check_writable_folder, write_atomic

LOCK = ".megacpt.lock"
OWNER = ".megacpt.lock.owner"  # host and pid of the holder (the lock file itself stays empty)
CONFIG = "config.json"  # the resolved config of the run's latest start
METRICS = "metrics.jsonl"  # one JSON record per line: training, evaluation, events
CHECKPOINTS = "checkpoints"  # DeepSpeed tags and the `latest` pointer
SAMPLES = "samples.jsonl"  # the sample ledger (logging.sample_ledger)
SPIKE_LEDGER = "spike_ledger.json"  # loss-spike rollbacks and the batches skipped since
TENSORBOARD = "tensorboard"  # event files (logging.tensorboard)
DATA_CACHE = "data_cache"  # megatron's dataset indices, unless data.cache_dir says otherwise
WANDB_RUN_ID = "wandb_run_id"  # the W&B run a resumed stage continues (logging.wandb)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


class Start:
    """What `hold` learns from the run it guards: whether it began to train (`began()`)."""

    def __init__(self):
        self.training = False

    def began(self) -> None:
        self.training = True


def check_files(run_dir: Path) -> None:
    """The files megacpt writes in RUN_DIR are files (or absent), not folders someone put in their place."""
    for name in (CONFIG, METRICS, SAMPLES, SPIKE_LEDGER, WANDB_RUN_ID):
        if (run_dir / name).exists() and not (run_dir / name).is_file():
            raise UserError(f"{run_dir / name} is a folder, but megacpt writes its {name} file there; move that "
                            "folder away")


@contextmanager
def hold(run_dir: str | Path, main: bool = True) -> Iterator[Start]:
    """Create RUN_DIR if needed and hold its lock for the block (only where `main`).

    If this call created the folder and the run did not begin to train (a failed start, or a stop signal
    during startup), the folder is removed again, whatever the start wrote: it leaves the disk as it found it.
    """
    start = Start()
    if not main:
        yield start
        return
    run_dir = Path(run_dir)
    check_writable_folder(run_dir, "run_dir")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("run_dir", f"cannot create {run_dir}: {e.strerror}") from None
    lock = filelock.FileLock(run_dir / LOCK, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise UserError(f"run_dir {run_dir} is in use by another megacpt run ({_owner(run_dir)}); two runs on one "
                        "folder would overwrite each other's checkpoints and metrics. Wait for it to end or stop "
                        "it, or give this run another run_dir") from None
    try:
        write_atomic(run_dir / OWNER, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        yield start
    finally:
        if created and not start.training:
            shutil.rmtree(run_dir, ignore_errors=True)
        lock.release()


def _owner(run_dir: Path) -> str:
    try:
        owner = json.loads((run_dir / OWNER).read_text())
        return f"host {owner['host']}, pid {owner['pid']}, since {owner['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"holder unknown: {run_dir / OWNER} is unreadable"


def start_metrics_anew(run_dir: Path) -> Path | None:
    """A stage that starts (not a resume) in a run dir whose metrics.jsonl holds records of an earlier start
    (killed before its first checkpoint, or another run's): set that file aside as metrics.jsonl.superseded
    (-2, -3, ...), so that readers see this stage's steps once. Returns where it went."""
    path = run_dir / METRICS
    if not path.is_file() or not path.read_text(encoding="utf-8", errors="replace").strip():
        return None
    aside = run_dir / f"{METRICS}.superseded"
    n = 1
    while aside.exists():
        n += 1
        aside = run_dir / f"{METRICS}.superseded-{n}"
    os.replace(path, aside)
    return aside


def write_config(run_dir: Path, config: dict) -> None:
    """RUN_DIR/config.json, replaced atomically (written only once a start has passed its checks)."""
    write_atomic(run_dir / CONFIG, json.dumps(config, indent=2))


def keep_metrics_until(run_dir: Path, step: int) -> int:
    """Drop the records of steps after `step` from RUN_DIR/metrics.jsonl (atomically); returns how many.

    A run killed after its last checkpoint logged steps that its resume will train again: dropping them
    leaves one record per step for every reader (plot, predict, eval).
    """
    path = run_dir / METRICS
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            keep = record.get("step", 0) <= step
        except (ValueError, AttributeError, TypeError):
            keep = False  # a line cut short by the kill
        if keep:
            kept.append(line)
        else:
            dropped += line.strip() != ""
    if dropped:
        write_atomic(path, "".join(line + "\n" for line in kept))
    return dropped


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl; a UserError naming the path when there are none."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        what = "does not exist" if not Path(run_dir).exists() else f"holds no {METRICS}"
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
