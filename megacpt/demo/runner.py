"""Run megacpt commands as child processes, the way a user would, with their progress on the console.

Each child is `python -m megacpt ...` in its own session, with the distributed variables of the parent
removed so that it builds its own world. Its output goes in full to a log file and, filtered to the progress
lines, to the console with a phase prefix ("[stage0] step 40/300 ..."). Ctrl-C reaches only the demo, which
asks each child to stop the way that child understands: `megacpt train` saves a checkpoint on SIGTERM (so
the re-run resumes from that step); the data commands clean up their partial outputs on SIGINT.
"""
from __future__ import annotations

import collections
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from megacpt.errors import UserError
from megacpt.launcher_env import own_world_env

PROGRESS_PREFIXES = ("stage ", "eval step", "resuming", "stop signal", "preprocess: wrote", "tokenizer:")
STEP_LINE = re.compile(r"^step (\d+)/(\d+)\b")
STOP_SECONDS = 120  # how long a child may take to save and exit after being asked to stop
TAIL_LINES = 30


@dataclass
class Job:
    """One megacpt command: its arguments, console prefix, log file and how to report its steps."""

    name: str
    args: list[str]
    log: Path
    step_every: int = 0  # show "step N/M" lines when N is a multiple of this (0: none)
    stop_signal: int = signal.SIGINT
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))

    def shows(self, line: str) -> bool:
        match = STEP_LINE.match(line)
        if match:
            step, steps = int(match[1]), int(match[2])
            return self.step_every > 0 and (step % self.step_every == 0 or step == steps)
        return line.startswith(PROGRESS_PREFIXES)


def run_jobs(jobs: list[Job]) -> None:
    """Run `jobs` at the same time and wait for all; a UserError with the output's tail if any fails."""
    procs: list[subprocess.Popen] = []
    threads = []
    try:
        for job in jobs:
            job.log.parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.Popen([sys.executable, "-m", "megacpt", *job.args], env=own_world_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
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
            raise UserError(f"[{job.name}] `megacpt {' '.join(job.args)}` failed with exit code {proc.returncode}; "
                            f"full output in {job.log}; its last lines:\n{tail}")


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
            proc.send_signal(job.stop_signal)
    for proc in procs:
        try:
            proc.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
