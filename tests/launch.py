"""Run megacpt in fresh processes: plainly, or under the real `deepspeed` launcher on CPU.

The environment is cleaned of the distributed variables that in-process tests set, so every child builds
its own world.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from megacpt.runtime.launcher_env import free_port, own_world_env

clean_env = own_world_env  # the name the tests use


def run_megacpt(args: list[str], timeout: float = 300, extra_env: dict | None = None,
                **kwargs) -> subprocess.CompletedProcess:
    """`python -m megacpt ARGS` as one plain process."""
    return subprocess.run([sys.executable, "-m", "megacpt", *args], env={**clean_env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def run_python(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`python ARGS` in a clean environment."""
    return subprocess.run([sys.executable, *args], env=clean_env(), capture_output=True, text=True, timeout=timeout)


def deepspeed_launch(num_procs: int, target: list[str], module: bool = True, timeout: float = 600,
                     extra: list[str] = ()) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N [--module] TARGET...` on this machine (CPU, gloo)."""
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    cmd = [launcher, "--num_gpus", str(num_procs), "--master_port", str(free_port()), *extra]
    cmd += (["--module"] if module else []) + target
    result = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    return result


def start_process(cmd: list[str]) -> subprocess.Popen:
    """CMD in a clean environment and a session of its own (so `os.killpg` reaches every process it starts)."""
    return subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def kill_9_after(run_dir: Path, step: int, cmd: list[str]) -> int:
    """Start CMD (a training run of RUN_DIR), SIGKILL its whole session once a training record reaches `step`;
    the newest step it had logged."""
    import os
    import signal

    proc = start_process(cmd)
    try:
        return wait_for_step(run_dir, step, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n"
                                    f"--- stderr\n{result.stderr[-6000:]}")


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> int:
    """Poll RUN_DIR/metrics.jsonl until a training record reaches `step`; return the newest step seen."""
    import json
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before step {step}")
        metrics = Path(run_dir) / "metrics.jsonl"
        complete_lines = metrics.read_text().split("\n")[:-1] if metrics.is_file() else []  # the last may be partial
        steps = [r["step"] for r in map(json.loads, complete_lines) if "loss" in r]
        if steps and steps[-1] >= step:
            return steps[-1]
        time.sleep(0.02)
    raise TimeoutError(f"no training record for step {step} in {run_dir} after {timeout} s")


def signal_mask(pid: int, field: str) -> int:
    """A signal set of process PID from /proc: field "SigBlk" (blocked) or "SigCgt" (caught by a handler)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def wait_for_signals(proc: subprocess.Popen, field: str, *signals: int, timeout: float = 60) -> None:
    """Wait until PROC blocks (field "SigBlk") or catches ("SigCgt") all of SIGNALS, i.e. a signal sent now is
    held or handled, not fatal."""
    import time

    bits = sum(1 << (sig - 1) for sig in signals)
    deadline = time.monotonic() + timeout
    while signal_mask(proc.pid, field) & bits != bits:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"process {proc.pid} never set {field} for {signals} (exit {proc.poll()})")
        time.sleep(0.005)


def signal_tree(pid: int, sig: int) -> None:
    """Send SIG to PID and all its descendants, as SLURM signals every process of a job step (and as a test
    cleans up: the launchers put the ranks in a process group of their own)."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


HOLD_SIGNALS = Path(__file__).resolve().parents[1] / "launch" / "hold_signals.py"


def start_held(args: list[str]) -> subprocess.Popen:
    """`python -m megacpt ARGS` started as the launch scripts start every rank: USR1 and TERM blocked
    (launch/hold_signals.py) until `megacpt train` installs its handler. Returns once they are blocked, so a
    signal sent now is held, not fatal."""
    import signal

    proc = subprocess.Popen([sys.executable, str(HOLD_SIGNALS), "USR1,TERM", sys.executable, "-m", "megacpt", *args],
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    wait_for_signals(proc, "SigBlk", signal.SIGUSR1, signal.SIGTERM)
    return proc
