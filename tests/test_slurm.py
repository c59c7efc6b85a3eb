"""The batch scripts under a real SLURM: a private single-node cluster (slurmctld, slurmd and munged with
their config, key, sockets and state in a temporary folder, stopped by their pids at the end) runs both
scripts with 2 CPU ranks. Training equals launch/local.sh 2; every way a job is stopped (USR1 to the job
step, USR1 to the batch shell, scancel, scontrol requeue) leaves a complete checkpoint at the step it
stopped, with `latest` on it, and the next job continues bit-exactly. A stop in a job's first seconds (USR1
to the job's steps as the watch step starts, during the preflight when the job has no other step, as the
launch step's first process starts; to the batch shell as soon as it runs; the scripts' own
`--signal=B:USR1@120` due at once) is neither lost nor fatal: the job ends before its first step with exit
75 and says so, its checkpoint untouched.

Skipped, with the reason, where SLURM cannot be started: not root, the packages missing (.ci/run installs
slurm-wlm and munge with apt as root), or daemons that do not come up.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from megacpt.policy.stages import read_state

from datagen import read_metrics, tiny_config, write_config
from launch import assert_ok, clean_env, free_port, signal_mask, wait_for_step

# Each test chains three or four jobs, each starting two ranks.
pytestmark = [pytest.mark.launcher, pytest.mark.slurm, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
STEPS = 60  # tiny steps (tens a second): room for two stops, each some steps after its signal, before the end
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "scancel", "scontrol", "squeue")

SLURM_CONF = """\
ClusterName=megacpttest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.socket
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
SchedulerType=sched/builtin
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """A private SLURM: `run` calls its commands with its config; `stop` ends the daemons by their pids."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.env = {**clean_env(), "SLURM_CONF": str(folder / "slurm.conf"),
                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHON": sys.executable}
        self.pid_files = [folder / name for name in ("slurmd.pid", "slurmctld.pid", "munged.pid")]

    def start(self) -> str | None:
        """Start munged, slurmctld and slurmd; None when the node is idle, else why it is not."""
        host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir()
        key = self.folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (self.folder / "slurm.conf").write_text(SLURM_CONF.format(
            host=host, dir=self.folder, ctld_port=free_port(), slurmd_port=free_port()))
        f = self.folder
        for command in (["munged", f"--socket={f}/munge.socket", f"--key-file={key}", f"--pid-file={f}/munged.pid",
                         f"--log-file={f}/munged.log", f"--seed-file={f}/munged.seed"],
                        ["slurmctld"], ["slurmd"]):
            result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
            if result.returncode != 0:
                return f"{command[0]} did not start: {result.stderr.strip()[-500:]}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return None
            time.sleep(0.5)
        logs = " | ".join((f / name).read_text()[-300:] for name in ("slurmctld.log", "slurmd.log")
                          if (f / name).is_file())
        return f"the node is '{state}', not idle, after 60 s: {logs}"

    def stop(self) -> None:
        self.run("scancel", "--user=root", check=False)
        for pid_file in self.pid_files:
            if pid_file.is_file():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        for pid_file in self.pid_files:
            deadline = time.monotonic() + 30
            while pid_file.is_file() and _alive(pid_file) and time.monotonic() < deadline:
                time.sleep(0.2)

    def run(self, *command: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=120, **kwargs)
        if check:
            assert_ok(result)
        return result

    def submit(self, script: str, config: str, *options: str, **env: str) -> str:
        """sbatch from the repository root, as docs/LAUNCH.md says; returns the job id."""
        out = Path(config).parent / "slurm-%j.out"
        result = subprocess.run(["sbatch", "--parsable", f"--output={out}", *options, f"launch/{script}", config],
                                cwd=REPO, env={**self.env, **env}, capture_output=True, text=True, timeout=120)
        assert_ok(result)
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        text = self.run("scontrol", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_job(self, job_id: str, timeout: float = 600) -> dict[str, str]:
        """Wait until the job has ended (and is not requeued); returns its final record."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return job
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id)['JobState']} after {timeout} s")


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text()), 0)
        return True
    except (ProcessLookupError, ValueError, FileNotFoundError):
        return False


@pytest.fixture(scope="module")
def cluster():
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("a private SLURM needs root (slurmd runs the jobs' processes as their user)")
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        pytest.skip(f"SLURM is not installed (no {', '.join(missing)}); as root, .ci/run installs slurm-wlm and "
                    "munge with apt")
    # munged wants its socket's folder (and the folders above) open to all; pytest's are private.
    folder = Path(tempfile.mkdtemp(prefix="megacpt-slurm-"))
    folder.chmod(0o755)
    slurm = Cluster(folder)
    try:
        failure = slurm.start()
        if failure:
            pytest.skip(f"the private SLURM did not come up: {failure}")
        yield slurm
    finally:
        slurm.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def make_config(pattern_data, tmp_path_factory):
    """make_config(name) -> a tiny 2-rank config of STEPS steps, checkpoints only when stopped and at the end."""
    def make(name: str) -> str:
        folder = tmp_path_factory.mktemp(name)
        config = tiny_config(folder / "run", [{"name": "a", "prefix": pattern_data["a"]}],
                             train={"steps": STEPS, "save_interval": 0})
        return write_config(folder / "config.json", config)
    return make


def run_dir(config: str) -> Path:
    return Path(json.loads(Path(config).read_text())["run_dir"])


def per_step(config: str) -> dict[int, dict]:
    """The last training record of each step (a resumed run logs again the steps after its checkpoint)."""
    return {r["step"]: r for r in read_metrics(run_dir(config)) if "loss" in r}


@pytest.fixture(scope="module")
def reference(make_config) -> dict[int, dict]:
    """launch/local.sh 2 on this machine, no SLURM."""
    config = make_config("local")
    env = {**clean_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MASTER_PORT": str(free_port())}
    assert_ok(subprocess.run([str(REPO / "launch" / "local.sh"), "2", config], env=env, capture_output=True,
                             text=True, timeout=900))
    return per_step(config)


def stopped_at(config: str) -> int:
    """The step of the checkpoint `latest` names, checked complete: megacpt's state says that step and the
    DeepSpeed files of the model are there."""
    checkpoints = run_dir(config) / "checkpoints"
    tag = checkpoints / (checkpoints / "latest").read_text().strip()
    step = int(tag.name.removeprefix("step"))
    assert read_state(tag).step == step
    assert (tag / "mp_rank_00_model_states.pt").is_file()
    return step


def trained_steps(config: str) -> int:
    return max(per_step(config), default=0)


def stop_after_a_step(slurm: Cluster, job_id: str, config: str, stop: list[str], expect_state: str) -> int:
    """Let the job train a step past the last checkpoint, stop it with the `stop` command, check that it ended
    in `expect_state` with a complete checkpoint at its last trained step; returns that step."""
    start = stopped_at(config) if (run_dir(config) / "checkpoints" / "latest").is_file() else 0
    wait_for_step(run_dir(config), start + 1, _JobProcess(slurm, job_id), timeout=600)
    slurm.run(*stop, job_id)
    job = slurm.wait_job(job_id)
    log = (Path(config).parent / f"slurm-{job_id}.out").read_text()
    assert job["JobState"] == expect_state, f"{job}\n{log[-4000:]}"
    step = stopped_at(config)
    assert start < step < STEPS and trained_steps(config) == step, log[-4000:]
    assert f"saved a checkpoint at step {step}, exiting" in log
    return step


class _JobProcess:
    """What wait_for_step needs of a process (`poll`, `returncode`), for a SLURM job (asked once a second)."""

    def __init__(self, slurm: Cluster, job_id: str):
        self.slurm, self.job_id, self.returncode, self.asked = slurm, job_id, None, 0.0

    def poll(self):
        if time.monotonic() - self.asked > 1:
            self.asked = time.monotonic()
            job = self.slurm.job(self.job_id)
            if job["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING"):
                self.returncode = f"{job['JobState']} {job['ExitCode']}"
        return self.returncode


def continue_to_the_end(slurm: Cluster, script: str, config: str, reference: dict[int, dict], *options: str,
                        **env: str) -> None:
    """Submit again: the job resumes, completes with exit 0, and every step's loss and the samples per source
    equal the run that was never stopped."""
    job_id = slurm.submit(script, config, *options, **env)
    job = slurm.wait_job(job_id)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), job
    resumed = per_step(config)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert [resumed[s]["loss"] for s in resumed] == [reference[s]["loss"] for s in resumed]
    assert resumed[STEPS]["samples"] == reference[STEPS]["samples"]


def job_processes(job_id: str, step: str | None) -> list[int]:
    """The pids of this node's processes of a job's step (None: its batch shell), from their environment."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            variables = (entry / "environ").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:  # gone, or a kernel thread
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in variables:
            steps = [v.removeprefix(b"SLURM_STEP_ID=").decode() for v in variables if v.startswith(b"SLURM_STEP_ID=")]
            if steps == ([] if step is None else [step]):
                pids.append(int(entry.name))
    return pids


def catches_usr1(pid: int) -> bool:
    try:
        return bool(signal_mask(pid, "SigCgt") & (1 << (signal.SIGUSR1 - 1)))
    except (OSError, AssertionError):
        return False


def stopped_at_startup(slurm: Cluster, script: str, config: str, options: list[str], env: dict[str, str],
                       when: str) -> str:
    """Submit a job and stop it in its first seconds, with USR1 to the job's steps (`scancel --signal=USR1
    JOB`, which SLURM drops while the job has no step) or to its batch shell. `when`: "watch": to the steps
    within 100 ms of the first process of the job's first step (the scripts' watch step, started as the batch
    shell's first command); "preflight": to the steps while `megacpt plan` runs in the batch shell (slowed down
    by 5 s); "launch": to the steps within 100 ms of the launch step's first process (SLURM then signals
    every process of the step, those still starting too); "batch": to the batch shell the moment it catches
    USR1 (its first line). The job must end before its first step with exit 75 (not 0: nothing was trained),
    saying so, the checkpoint as it was. Returns the log."""
    before = _checkpoint_step(config)
    if when == "preflight":
        env = {**env, "PYTHON": str(_slow_python(config, 5))}
    job_id = slurm.submit(script, config, *options, **env)
    deadline = time.monotonic() + 300

    def ready() -> list[int]:
        if when == "batch":
            return [pid for pid in job_processes(job_id, None) if catches_usr1(pid)]
        if when == "preflight":
            return [pid for pid in job_processes(job_id, None) if " plan " in _command_line(pid)]
        return job_processes(job_id, "0" if when == "watch" else "1")

    while not ready():
        assert time.monotonic() < deadline, slurm.job(job_id)
    seen = time.monotonic()
    slurm.run("scancel", "--signal=USR1", *(["--batch"] if when == "batch" else []), job_id)
    assert time.monotonic() - seen < 0.1 or when in ("batch", "preflight"), "scancel took more than 100 ms"
    return _ended_before_its_first_step(slurm, job_id, config, before)


def _slow_python(config: str, seconds: int) -> Path:
    """A PYTHON whose `megacpt plan` (the preflight) first sleeps SECONDS."""
    slow_python = Path(config).parent / f"python-slow-preflight-{seconds}"
    slow_python.write_text(f'#!/bin/sh\n[ "$3" = plan ] && sleep {seconds}\nexec {sys.executable} "$@"\n')
    slow_python.chmod(0o755)
    return slow_python


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def stopped_by_the_time_limit_at_startup(slurm: Cluster, script: str, config: str, options: list[str],
                                         env: dict[str, str]) -> None:
    """A 2-minute limit: the scripts' `--signal=B:USR1@120` is due at once, and SLURM sends it to the batch shell
    at its next time-limit check, within 30 s. A preflight slowed down to 32 s makes sure that it arrives
    during the preflight: the job must end before its first step (exit 75, as `stopped_at_startup`) without
    starting the ranks, not train as if nothing had happened."""
    before = _checkpoint_step(config)
    job_id = slurm.submit(script, config, *options, "--time=2", **{**env, "PYTHON": str(_slow_python(config, 32))})
    log = _ended_before_its_first_step(slurm, job_id, config, before)
    assert "(a stop signal reached the batch shell before the launch)" in log


def _checkpoint_step(config: str) -> int | None:
    return stopped_at(config) if (run_dir(config) / "checkpoints" / "latest").is_file() else None


def _ended_before_its_first_step(slurm: Cluster, job_id: str, config: str, before: int | None) -> str:
    job = slurm.wait_job(job_id)
    log = (Path(config).parent / f"slurm-{job_id}.out").read_text()
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "75:0"), f"{job}\n{log[-4000:]}"
    assert "megacpt launch: stopped before the first step (" in log and "nothing trained" in log, log[-4000:]
    assert "Traceback" not in log
    assert _checkpoint_step(config) == before
    metrics = run_dir(config) / "metrics.jsonl"
    assert (trained_steps(config) if metrics.is_file() else 0) == (before or 0)
    return log


DEEPSPEED = ("slurm_deepspeed.sbatch", ["--nodes=1"], {"GPUS_PER_NODE": "2"})
TASKS = ("slurm_srun_tasks.sbatch", ["--nodes=1", "--ntasks-per-node=2"], {})


def test_the_deepspeed_script_stops_at_startup_on_usr1_to_the_step_and_on_requeue_then_finishes_exactly(
        cluster, make_config, reference):
    """slurm_deepspeed.sbatch on one node (no ssh: one launcher with --no_ssh): USR1 to the job's steps as the
    watch step starts, during the preflight and as the launch step starts, and to the batch shell as soon as
    it runs, each end the job before its first step with exit 75; `scancel --signal=USR1` (the job's steps)
    after a step saves and completes the job with exit 0; `scontrol requeue` (TERM to every process, while
    deepspeed.sh passes USR1 on to the launcher's group) saves at the step it reached without a traceback, and
    the requeued job trains to the end, bit-exactly."""
    script, options, env = DEEPSPEED
    config = make_config("deepspeed")
    for when in ("watch", "preflight", "launch"):
        stopped_at_startup(cluster, script, config, options, env, when)
    job_id = cluster.submit(script, config, *options, **env)
    first = stop_after_a_step(cluster, job_id, config, ["scancel", "--signal=USR1"], "COMPLETED")
    assert cluster.job(job_id)["ExitCode"] == "0:0"
    log = stopped_at_startup(cluster, script, config, options, env, "batch")
    assert "(a stop signal reached the batch shell before the launch)" in log

    job_id = cluster.submit(script, config, *options, **env)
    wait_for_step(run_dir(config), first + 1, _JobProcess(cluster, job_id), timeout=600)
    cluster.run("scontrol", "requeue", job_id)
    deadline = time.monotonic() + 600
    while cluster.job(job_id)["JobState"] != "PENDING":  # the TERM of the requeue, the save, the job's end
        assert time.monotonic() < deadline, cluster.job(job_id)
        time.sleep(0.5)
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")  # SLURM delays a requeued job 2 min
    job = cluster.wait_job(job_id)
    log = (Path(config).parent / f"slurm-{job_id}.out").read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), f"{job}\n{log[-4000:]}"
    saved = [int(m) for m in re.findall(r"saved a checkpoint at step (\d+), exiting", log)]
    assert len(saved) == 1 and first < saved[0] < STEPS  # the requeue's TERM, then the requeued run to the end
    assert "Traceback" not in log and "ignored due to race condition" not in log
    assert f"resuming stage 0 at step {saved[0]}/{STEPS}" in log
    resumed = per_step(config)
    assert [resumed[s]["loss"] for s in range(1, STEPS + 1)] == [reference[s]["loss"] for s in range(1, STEPS + 1)]
    assert resumed[STEPS]["samples"] == reference[STEPS]["samples"]


def test_the_per_task_script_stops_at_startup_on_usr1_to_the_batch_shell_and_on_scancel_then_finishes_exactly(
        cluster, make_config, reference):
    """slurm_srun_tasks.sbatch, one srun task per rank with a CPU each: USR1 to the job's steps as the watch
    step starts, during the preflight and as the launch step's first task starts, to the batch shell as soon
    as it runs, and the time limit's USR1 due at once (the batch shell's
    path, the same in both scripts) each end the job before its first step with exit 75; `scancel --batch
    --signal=USR1` (the batch shell alone, as --signal=B:USR1@... does) after a step is passed on to the tasks,
    which save and exit 0 (the job COMPLETED, not killed by the signal); plain `scancel` (TERM to every
    process) saves too; the last job trains to the end, bit-exactly."""
    script, options, env = TASKS
    config = make_config("tasks")
    for when in ("watch", "preflight", "launch", "batch"):
        stopped_at_startup(cluster, script, config, options, env, when)
    job_id = cluster.submit(script, config, *options, **env)
    stop_after_a_step(cluster, job_id, config, ["scancel", "--batch", "--signal=USR1"], "COMPLETED")
    assert cluster.job(job_id)["ExitCode"] == "0:0"
    stopped_by_the_time_limit_at_startup(cluster, script, config, options, env)
    job_id = cluster.submit(script, config, *options, **env)
    stop_after_a_step(cluster, job_id, config, ["scancel"], "CANCELLED")
    continue_to_the_end(cluster, script, config, reference, *options, **env)
