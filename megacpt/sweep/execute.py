"""Run megacpt commands as child processes, the way a user would: a sweep's runs one after another, the demo's
phases, each with its output in a log file and its progress on the console.

Each child is `python -m megacpt ...` (or the deepspeed launcher running `megacpt train` on N processes) in
its own session, with the distributed variables of the parent removed so that it builds its own world. Its
output goes in full to a log file and, filtered to the progress lines, to the console with a prefix
("[stage0] step 40/300 ..."). Ctrl-C (or SIGTERM, see `stop_on_sigterm`) reaches only the parent, which asks
each child to stop the way that child understands: `megacpt train` saves a checkpoint on SIGTERM or SIGUSR1
(so a re-run resumes from that step); the data commands clean up their partial outputs on SIGINT.
"""
from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from megacpt.config import RunConfig, load_config
from megacpt.errors import UserError
from megacpt.runtime.launcher_env import own_world_env

PROGRESS_PREFIXES = ("stage ", "eval step", "resuming", "stop signal", "preprocess: wrote", "tokenizer:")
STEP_LINE = re.compile(r"^step (\d+)/(\d+)\b")
STOP_SECONDS = 120  # how long a child may take to save and exit after being asked to stop
TAIL_LINES = 30
LAUNCHER_PORT = "29500"  # the deepspeed launcher's own default, as launch/local.sh; MASTER_PORT overrides it


@dataclass
class Job:
    """One command: its argv, console prefix, log file, which lines to show and how to ask it to stop."""

    name: str
    command: list[str]
    log: Path
    step_every: int = 0  # show "step N/M" lines when N is a multiple of this (0: none)
    echo: bool = True  # show the progress lines at all
    stop_signal: int = signal.SIGINT
    stop_group: bool = False  # send the stop signal to the child's whole process group (a launcher and its ranks)
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))

    def shows(self, line: str) -> bool:
        if not self.echo:
            return False
        match = STEP_LINE.match(line)
        if match:
            step, steps = int(match[1]), int(match[2])
            return self.step_every > 0 and (step % self.step_every == 0 or step == steps)
        return line.startswith(PROGRESS_PREFIXES)


def megacpt_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "megacpt", *args]


def stop_on_sigterm() -> None:
    """Make SIGTERM stop this process like Ctrl-C does, so that its children are stopped cleanly too."""
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_jobs(jobs: list[Job]) -> None:
    """Run `jobs` at the same time and wait for all; a UserError with the output's tail if any fails."""
    procs: list[subprocess.Popen] = []
    threads = []
    try:
        for job in jobs:
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with _usr1_ignored(job.stop_group):
                proc = subprocess.Popen(job.command, env=own_world_env(), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)
            procs.append(proc)
            thread = threading.Thread(target=_stream, args=(job, proc), daemon=True)
            thread.start()
            threads.append(thread)
        for proc in procs:
            proc.wait()
    except BaseException:
        _stop(jobs, procs)
        raise
    finally:
        for thread in threads:
            thread.join(timeout=5)
    for job, proc in zip(jobs, procs):
        if proc.returncode != 0:
            tail = "".join(f"    {line}" for line in job.tail)
            raise UserError(f"[{job.name}] `{' '.join(job.command[2:])}` failed with exit code {proc.returncode}; "
                            f"full output in {job.log}; its last lines:\n{tail}")


@contextlib.contextmanager
def _usr1_ignored(active: bool):
    """Start a launcher with SIGUSR1 ignored, as launch/deepspeed.sh does: the launcher processes keep ignoring
    it across exec, while each `megacpt train` rank installs its own handler, saves and exits 0."""
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN) if active else None
    try:
        yield
    finally:
        if active:
            signal.signal(signal.SIGUSR1, previous)


def _stream(job: Job, proc: subprocess.Popen) -> None:
    with open(job.log, "a", encoding="utf-8") as log:
        for line in proc.stdout:
            log.write(line)
            job.tail.append(line)
            if job.shows(line):
                print(f"[{job.name}] {line.rstrip()}", flush=True)


def _stop(jobs: list[Job], procs: list[subprocess.Popen]) -> None:
    """Ask every running child to stop, wait for it, and kill what does not stop in time."""
    for job, proc in zip(jobs, procs):
        if proc.poll() is None:
            print(f"[{job.name}] stopping ...", flush=True)
            if job.stop_group:
                os.killpg(proc.pid, job.stop_signal)
            else:
                proc.send_signal(job.stop_signal)
    for job, proc in zip(jobs, procs):
        try:
            proc.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            if job.stop_group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------ training runs


def latest_tag(config: RunConfig) -> str | None:
    """The tag the run directory's `latest` pointer names, None before the first checkpoint."""
    from megacpt.checkpoint.tags import LATEST
    from megacpt.run_dir import checkpoint_dir

    latest = checkpoint_dir(config.run_dir) / LATEST
    return latest.read_text().strip() if latest.is_file() else None


def is_finished(config: RunConfig) -> bool:
    """A run is finished when its latest checkpoint is its last step."""
    from megacpt.checkpoint.tags import tag_name

    return latest_tag(config) == tag_name(config.train.steps)


def train_job(name: str, config_path: Path, log: Path, nproc: int = 1, **shown) -> Job:
    """`megacpt train CONFIG` as one process, or under the deepspeed launcher on `nproc` processes (GPUs, or CPU
    processes on gloo), stopped by SIGUSR1 to its process group as launch/local.sh describes."""
    if nproc == 1:
        return Job(name, megacpt_command("train", str(config_path)), log, stop_signal=signal.SIGTERM, **shown)
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
                "--master_port", os.environ.get("MASTER_PORT", LAUNCHER_PORT)]
    return Job(name, [*launcher, "--module", "megacpt", "train", str(config_path)], log,
               stop_signal=signal.SIGUSR1, stop_group=True, **shown)


def train(name: str, config: RunConfig, config_path: Path, log: Path, nproc: int = 1, **shown) -> None:
    """Train one run to its last step (resuming its checkpoint if it has one); a UserError if it stops early."""
    run_jobs([train_job(name, config_path, log, nproc, **shown)])
    if not is_finished(config):  # `megacpt train` saves and exits 0 on a stop signal that did not come from us
        raise UserError(f"[{name}] stopped before its last step; run the same command again to resume it from "
                        f"its checkpoint")


def run_sweep(sweep, nproc: int = 1) -> list[str]:
    """A sweep's runs one after another, skipping finished ones, one console line as each starts and ends.
    A failed run does not stop the others; returns the names of the runs that failed."""
    failed = []
    for number, run in enumerate(sweep.runs, start=1):
        prefix = f"[{number}/{len(sweep.runs)}] {run.name}"
        path = sweep.config_path(run.name)
        config = load_config(path)
        if is_finished(config):
            print(f"{prefix}: finished earlier, skipped", flush=True)
            continue
        log = sweep.log(run.name)
        print(f"{prefix}: {'resuming' if latest_tag(config) else 'training'} "
              f"({config.train.steps} steps; log {log}) ...", flush=True)
        start = time.monotonic()
        try:
            train(run.name, config, path, log, nproc, echo=False)
        except UserError as e:
            failed.append(run.name)
            print(f"{prefix}: FAILED after {time.monotonic() - start:.0f} s: {e}", flush=True)
            continue
        print(f"{prefix}: done in {time.monotonic() - start:.0f} s", flush=True)
    return failed
