"""The launch scripts in launch/: the SLURM scripts turn a (faked) allocation into a hostfile and the exact
launch commands, refuse bad input with exit code 2, and every form trains for real on CPU processes with
the losses of one node with two processes. A stop signal reaches the ranks, not the launchers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from datagen import read_metrics, tiny_config, write_config
from launch import assert_ok, clean_env, free_port, signal_tree, wait_for_signals, wait_for_step

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TEN_B = "configs/ibrahim_10b_cpt_cosine.json"
SMALL = str(REPO / "configs/gupta_pythia410m_cpt_lr3e-4.json")

FAKE_SCONTROL = """#!/bin/sh
# scontrol for tests: logs its arguments; `show hostnames LIST` prints $FAKE_HOSTS one a line.
echo "$@" >> "$FAKE_SLURM_LOG"
[ "$1 $2" = "show hostnames" ] || exit 1
for host in $FAKE_HOSTS; do echo "$host"; done
"""

FAKE_SRUN = f"""#!{sys.executable}
# srun for tests: the command as NODES x TASKS processes on this machine, with SLURM's task variables.
import os, subprocess, sys
args, nodes, per_node = sys.argv[1:], 1, 1
while args[0].startswith("--"):
    key, _, value = args.pop(0).partition("=")
    if key == "--nodes":
        nodes = int(value)
    elif key in ("--ntasks-per-node", "--ntasks"):
        per_node = int(value)
    elif key not in ("--cpus-per-task", "--kill-on-bad-exit"):
        sys.exit("fake srun: unexpected option " + key)
tasks = [subprocess.Popen(args, env=dict(os.environ, SLURM_NODEID=str(n), SLURM_LOCALID=str(t),
                                         SLURM_PROCID=str(n * per_node + t), SLURM_NTASKS=str(nodes * per_node),
                                         SLURM_NTASKS_PER_NODE=str(per_node)))
         for n in range(nodes) for t in range(per_node)]
sys.exit(max(task.wait() for task in tasks))
"""

# What the scripts read besides SLURM's own variables; none may leak in from the environment of the tests.
SCRIPT_KNOBS = ("GPUS_PER_NODE", "HOSTFILE", "GPU_MEMORY_GB", "PYTHON", "DEEPSPEED", "NO_SSH", "MEGACPT_DRY_RUN",
                "MEGACPT_LAUNCH_DIR", "STOP_FORWARD_DELAY")


def script_env(**extra: str) -> dict:
    env = {k: v for k, v in clean_env().items() if not k.startswith("SLURM_") and k not in SCRIPT_KNOBS}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the venv's deepspeed and python
    return {**env, "PYTHON": sys.executable, **extra}


def slurm_env(tmp_path: Path, hosts: list[str], gpus_per_node: int, **extra: str) -> dict:
    """A job 4242 on `hosts` as sbatch would set it up, with scontrol and srun faked on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = script_env(**{"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-node-[01-02]", "SLURM_SUBMIT_DIR": str(REPO),
                        "FAKE_HOSTS": " ".join(hosts), "FAKE_SLURM_LOG": str(tmp_path / "scontrol.log"),
                        "SLURM_CPUS_ON_NODE": "16", "GPUS_PER_NODE": str(gpus_per_node),
                        "HOSTFILE": str(tmp_path / "hostfile"), **extra})
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env


def sbatch(script: str, args: list[str], env: dict, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a batch script the way sbatch does once the allocation exists: bash, from the submit directory."""
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def dry_run_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("would run:")]


# ------------------------------------------------------------------------------ command assembly (fast)

HOSTS = ["gpu-node-01", "gpu-node-02"]
ARGS = [TEN_B, "--set", "train.steps=10"]
FORMS = {
    "one launcher over ssh": ("slurm_deepspeed.sbatch", {}, (
        "srun --kill-on-bad-exit=1 --nodes=1 --ntasks=1 --cpus-per-task=16 {launch}/deepspeed.sh --hostfile {hostfile} "
        "--master_addr gpu-node-01 --master_port 24242 --module megacpt train configs/ibrahim_10b_cpt_cosine.json "
        "--set train.steps=10")),
    "one launcher per node": ("slurm_deepspeed.sbatch", {"NO_SSH": "1"}, (
        "srun --kill-on-bad-exit=1 --nodes=2 --ntasks-per-node=1 --cpus-per-task=16 {launch}/deepspeed.sh "
        "--hostfile {hostfile} --master_addr gpu-node-01 --master_port 24242 --no_ssh --module megacpt train "
        "configs/ibrahim_10b_cpt_cosine.json --set train.steps=10")),
    "one task per gpu": ("slurm_srun_tasks.sbatch", {}, (
        "srun --kill-on-bad-exit=1 --nodes=2 --ntasks-per-node=8 --cpus-per-task=2 {launch}/task.sh "
        "configs/ibrahim_10b_cpt_cosine.json --set train.steps=10")),
}


@pytest.mark.parametrize("form", FORMS)
def test_slurm_script_writes_the_hostfile_and_assembles_the_exact_command(tmp_path, form):
    script, extra, command = FORMS[form]
    result = sbatch(script, ARGS, slurm_env(tmp_path, HOSTS, 8, MEGACPT_DRY_RUN="1", SLURM_GPUS_ON_NODE="8", **extra))
    assert_ok(result)
    hostfile = tmp_path / "hostfile"
    assert dry_run_lines(result) == ["would run: " + command.format(launch=LAUNCH, hostfile=hostfile)]
    assert (tmp_path / "scontrol.log").read_text() == "show hostnames gpu-node-[01-02]\n"
    assert ("megacpt launch: job 4242 on 2 node(s) x 8 ranks, 16 CPUs each node (gpu-node-01 gpu-node-02), "
            "master gpu-node-01:24242") in result.stdout
    assert "2 nodes x 8 GPUs = 16" in result.stdout  # the preflight plan ran on this cluster
    if script == "slurm_deepspeed.sbatch":
        assert hostfile.read_text() == "gpu-node-01 slots=8\ngpu-node-02 slots=8\n"


@pytest.mark.parametrize("script, gpus, words", [
    ("slurm_deepspeed.sbatch", 0, ["gpu-node-01 slots=0", "at least one slot"]),
    ("slurm_deepspeed.sbatch", 3, ["world size 6", "not divisible by parallel.tensor 4"]),
    ("slurm_srun_tasks.sbatch", 3, ["world size 6", "not divisible by parallel.tensor 4"]),
])
def test_slurm_script_refuses_a_bad_allocation_before_launching(tmp_path, script, gpus, words):
    result = sbatch(script, [TEN_B], slurm_env(tmp_path, HOSTS, gpus, MEGACPT_DRY_RUN="1"))
    assert result.returncode == 2, result.stderr
    assert not dry_run_lines(result) and "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr


def test_one_node_needs_no_ssh_and_the_hostfile_leaves_no_trace(tmp_path):
    """On one node the deepspeed script runs the launcher with --no_ssh (DeepSpeed would otherwise check the
    host over ssh), with all the node's CPUs; its hostfile goes to TMPDIR, not the submit directory, and is
    gone when the script ends."""
    submit_dir, tmpdir = tmp_path / "submit", tmp_path / "tmp"
    submit_dir.mkdir(), tmpdir.mkdir()
    env = slurm_env(tmp_path, ["node-a"], 2, MEGACPT_DRY_RUN="1", TMPDIR=str(tmpdir), SLURM_CPUS_ON_NODE="6")
    del env["HOSTFILE"]
    result = sbatch("slurm_deepspeed.sbatch", [SMALL], env, cwd=submit_dir)
    assert_ok(result)
    assert dry_run_lines(result) == [
        f"would run: srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=1 --cpus-per-task=6 {LAUNCH}/deepspeed.sh "
        f"--hostfile "
        f"{tmpdir}/megacpt-hostfile-4242 --master_addr node-a --master_port 24242 --no_ssh --module megacpt train "
        f"{SMALL}"]
    assert not any(submit_dir.iterdir()) and not any(tmpdir.iterdir())


@pytest.mark.parametrize("script, extra, words", [
    ("slurm_srun_tasks.sbatch", {"SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_ON_NODE": "4"},
     ["would run: srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=2 --cpus-per-task=2 "]),
    ("slurm_srun_tasks.sbatch", {"SLURM_NTASKS_PER_NODE": "2", "SLURM_GPUS_ON_NODE": "4"},
     ["would run: srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=4 --cpus-per-task=4 "]),
    ("slurm_deepspeed.sbatch", {"SLURM_NTASKS_PER_NODE": "1"},
     ["GPUS_PER_NODE is ''; set it", "on a partition without GPUs the CPU processes"]),
    ("slurm_srun_tasks.sbatch", {"SLURM_NTASKS_PER_NODE": "32"}, ["32 ranks per node but only 16 CPUs each node"]),
])
def test_ranks_per_node_without_gpus(tmp_path, script, extra, words):
    """A partition without GPUs: the per-task script runs the job's tasks per node, each with its share of the
    CPUs (GPUs, when the job has them, decide instead); the deepspeed script asks for GPUS_PER_NODE."""
    env = slurm_env(tmp_path, ["node-a"], 0, MEGACPT_DRY_RUN="1", **extra)
    del env["GPUS_PER_NODE"]
    result = sbatch(script, [SMALL], env)
    assert "Traceback" not in result.stderr
    output = result.stdout + result.stderr
    for word in words:
        assert word in output
    assert result.returncode == (0 if words[0].startswith("would run") else 2), output[-3000:]


def test_a_job_without_the_environment_is_told_to_activate_it(tmp_path):
    """Submitted without the venv (a python without megacpt, in the repository root where `python -m megacpt`
    would import the sources without their dependencies): exit 2 naming what to do, before anything runs."""
    no_megacpt = tmp_path / "python"
    no_megacpt.symlink_to(sys.base_prefix + "/bin/python3")
    env = slurm_env(tmp_path, ["node-a"], 2, PYTHON=str(no_megacpt))
    for script in ("slurm_deepspeed.sbatch", "slurm_srun_tasks.sbatch"):
        result = sbatch(script, [SMALL], env)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        for words in (f"'{no_megacpt}' has no megacpt installed", "activate the environment megacpt is installed in",
                      "PYTHON=/path/to/env/bin/python and DEEPSPEED=/path/to/env/bin/deepspeed"):
            assert words in result.stderr
        assert "megacpt plan" not in result.stdout


def test_a_script_submitted_outside_the_repository_stops_at_the_missing_file(tmp_path):
    """sbatch runs a copy of the script, so launch/ is found from the submit directory: elsewhere the script
    stops at once (exit 2) and names MEGACPT_LAUNCH_DIR; with it set, it runs from anywhere."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = slurm_env(tmp_path, ["node-a"], 2, MEGACPT_DRY_RUN="1", SLURM_SUBMIT_DIR=str(elsewhere))
    for script in ("slurm_deepspeed.sbatch", "slurm_srun_tasks.sbatch"):
        copy = elsewhere / script  # what sbatch runs: a copy, here outside the repository
        copy.write_text((LAUNCH / script).read_text())
        run = subprocess.run(["bash", str(copy), SMALL], cwd=elsewhere, env=env, capture_output=True, text=True)
        assert run.returncode == 2, run.stderr
        assert f"no slurm_common.sh in {elsewhere}/launch" in run.stderr and "MEGACPT_LAUNCH_DIR" in run.stderr
        assert "command not found" not in run.stderr and "would run" not in run.stdout
        run = subprocess.run(["bash", str(copy), SMALL], cwd=elsewhere, env={**env, "MEGACPT_LAUNCH_DIR": str(LAUNCH)},
                             capture_output=True, text=True)
        assert_ok(run)
        assert dry_run_lines(run)


FAKE_SRUN_STOPPED = """#!/usr/bin/env bash
# srun whose job step ended as FAKE_STOP says: killed by a signal as its tasks started, or megacpt's own exit
case "$FAKE_STOP" in
  USR1|TERM) bash -c 'kill -s '"$FAKE_STOP"' $$' ;;
  *) exit "$FAKE_STOP" ;;
esac
"""


@pytest.mark.parametrize("stop, words", [
    ("USR1", "SLURM's stop signal USR1 killed the job step's processes as they started, before they could hold it"),
    ("TERM", "SLURM's stop signal TERM killed the job step's processes as they started, before they could hold it"),
    ("75", "the ranks took a stop signal during their startup"),
    ("before", "a stop signal reached the batch shell before the launch"),
])
def test_a_job_stopped_before_its_first_step_says_so_and_exits_75(tmp_path, stop, words):
    """However a stop ended a job before its first step, the log says that nothing was trained and the job
    exits 75 (not 0, which reads as success): a stop the batch shell took before the launch (here during
    the preflight; no step is started), ranks that SLURM's signal killed as they started, ranks that took it
    during their startup (`megacpt train`'s own 75). Other exit statuses pass through unchanged."""
    env = slurm_env(tmp_path, ["node-a"], 2, FAKE_STOP=stop)
    (tmp_path / "bin" / "srun").write_text(FAKE_SRUN_STOPPED)
    if stop == "before":  # the preflight's python sends the batch shell a stop
        python = tmp_path / "bin" / "python-stopping"
        python.write_text(f'#!/usr/bin/env bash\nkill -USR1 $PPID\nexec {sys.executable} "$@"\n')
        python.chmod(0o755)
        env["PYTHON"] = str(python)
        (tmp_path / "bin" / "srun").write_text("#!/bin/sh\ntouch $FAKE_SLURM_LOG.srun\n")
    for script in ("slurm_deepspeed.sbatch", "slurm_srun_tasks.sbatch"):
        result = sbatch(script, [SMALL], env)
        assert result.returncode == 75, result.stderr
        assert (f"megacpt launch: stopped before the first step ({words}): nothing trained; submit the job again "
                "(or requeue it) to train") in result.stderr
        assert not Path(env["FAKE_SLURM_LOG"] + ".srun").exists()
    if stop == "75":
        result = sbatch("slurm_srun_tasks.sbatch", [SMALL], {**env, "FAKE_STOP": "3"})
        assert result.returncode == 3 and "stopped before" not in result.stderr


def test_slurm_script_outside_a_job_is_an_error(tmp_path):
    result = sbatch("slurm_deepspeed.sbatch", [TEN_B], script_env())
    assert result.returncode == 2 and "submit this script with sbatch" in result.stderr


@pytest.mark.parametrize("args, words", [(["0", TEN_B], ["NPROCS must be a positive integer, got '0'"]),
                                         (["2"], ["no CONFIG given"])])
def test_local_launcher_refuses_bad_arguments(args, words):
    result = subprocess.run([str(LAUNCH / "local.sh"), *args], env=script_env(), capture_output=True, text=True)
    assert result.returncode == 2
    for word in words:
        assert word in result.stderr


# ------------------------------------------------------------------ real runs (CPU processes, gloo)


@pytest.fixture(scope="module")
def make_config(pattern_data, tmp_path_factory):
    """make_config(name, steps) -> path of a tiny-model config: global batch 4, micro 2, so 2 data-parallel ranks."""
    def make(name: str, steps: int = 4) -> str:
        folder = tmp_path_factory.mktemp(name)
        config = tiny_config(folder / "run", [{"name": "a", "prefix": pattern_data["a"]}], train={"steps": steps})
        return write_config(folder / "config.json", config)
    return make


def losses(config_path: str) -> list[float]:
    run_dir = json.loads(Path(config_path).read_text())["run_dir"]
    return [record["loss"] for record in read_metrics(run_dir) if "loss" in record]


def cpu_threads_each(output: str, processes_on_this_machine: int) -> None:
    """Each process took its share of this machine's cores as torch threads, and said so."""
    share = max(1, len(os.sched_getaffinity(0)) // processes_on_this_machine)
    assert f"{share} CPU threads each" in output


def shared_memory_files() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.fixture(scope="module")
def one_node(make_config) -> tuple[list[float], str, set[str]]:
    """The reference: launch/local.sh with 2 processes on this machine; its losses, its output and the files it
    left in /dev/shm."""
    config = make_config("one_node")
    before = shared_memory_files()
    result = subprocess.run([str(LAUNCH / "local.sh"), "2", config], env=script_env(MASTER_PORT=str(free_port())),
                            capture_output=True, text=True, timeout=600)
    assert_ok(result)
    return losses(config), result.stdout + result.stderr, shared_memory_files() - before


@pytest.fixture(scope="module")
def one_node_losses(one_node) -> list[float]:
    return one_node[0]


@pytest.mark.launcher
def test_local_launcher_trains_with_two_processes(one_node):
    one_node_losses, output, left_in_shared_memory = one_node
    assert len(one_node_losses) == 4 and one_node_losses[-1] < one_node_losses[0]
    cpu_threads_each(output, 2)
    # DeepSpeed's CPU shared-memory all-reduce would leave a 69 MB buffer per process here, every run.
    assert not left_in_shared_memory


@pytest.mark.launcher
def test_two_nodes_with_a_launcher_each_train_like_one_node(tmp_path, make_config, one_node_losses):
    """srun starts launch/deepspeed.sh once per node; each runs the deepspeed launcher with --no_ssh and its
    node rank over a two-node hostfile, meeting at a loopback master address. Both "nodes" share this
    machine's cores, so each is given half of them, as the one-node run's processes take."""
    config = make_config("two_nodes")
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    env = slurm_env(tmp_path, ["node-a", "node-b"], 1, NO_SSH="1", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(free_port()), OMP_NUM_THREADS=threads)
    result = sbatch("slurm_deepspeed.sbatch", [config], env, cwd=tmp_path)
    assert_ok(result)
    assert (tmp_path / "hostfile").read_text() == "node-a slots=1\nnode-b slots=1\n"
    output = result.stdout + result.stderr
    assert "--node_rank=0" in output and "--node_rank=1" in output
    assert losses(config) == one_node_losses


@pytest.mark.launcher
def test_one_srun_task_per_gpu_trains_like_one_node(tmp_path, make_config, one_node_losses):
    """srun starts launch/task.sh once per GPU; SLURM_PROCID/LOCALID/NTASKS become RANK/LOCAL_RANK/WORLD_SIZE."""
    config = make_config("tasks")
    env = slurm_env(tmp_path, ["node-a"], 2, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    result = sbatch("slurm_srun_tasks.sbatch", [config], env, cwd=tmp_path)
    assert_ok(result)
    assert losses(config) == one_node_losses
    cpu_threads_each(result.stdout + result.stderr, 2)


def start_local(config: str) -> subprocess.Popen:
    """launch/local.sh 2 CONFIG in a session of its own, once it catches the stop signals (a signal sent
    earlier would find bash with its default action)."""
    run = subprocess.Popen([str(LAUNCH / "local.sh"), "2", config], env=script_env(MASTER_PORT=str(free_port())),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for_signals(run, "SigCgt", signal.SIGUSR1, signal.SIGTERM)
    return run


def finish(run: subprocess.Popen) -> str:
    try:
        return run.communicate(timeout=600)[0]
    finally:
        signal_tree(run.pid, signal.SIGKILL)


def per_step_losses(config_path: str) -> dict[int, float]:
    """The loss of each step; a resumed run logs again the steps after its checkpoint, the last record wins."""
    run_dir = json.loads(Path(config_path).read_text())["run_dir"]
    return {record["step"]: record["loss"] for record in read_metrics(run_dir) if "loss" in record}


@pytest.mark.launcher
@pytest.mark.parametrize("sig, to_all", [(signal.SIGUSR1, True), (signal.SIGTERM, False)],
                         ids=["USR1 to every process", "TERM to the launcher"])
def test_a_stop_to_the_launcher_checkpoints_and_everything_exits_0(make_config, sig, to_all):
    """USR1 to every process of the launch (as SLURM signals a job step), or TERM to the launcher alone
    (`kill PID`; DeepSpeed's runner would die of it and leave the ranks training): the deepspeed launcher's
    processes do not act on it, the ranks finish their step, save and exit 0, and so does everything
    (resuming from such a checkpoint bit-exactly: test_checkpoint.py and test_slurm.py)."""
    steps = 40
    config = make_config(f"stop_{sig.name}", steps=steps)
    run_dir = Path(json.loads(Path(config).read_text())["run_dir"])
    run = start_local(config)
    wait_for_step(run_dir, 2, run)
    (signal_tree if to_all else os.kill)(run.pid, sig)
    output = finish(run)
    assert run.returncode == 0, output[-4000:]
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step"))
    assert 2 <= stopped_at < steps and f"saved a checkpoint at step {stopped_at}, exiting" in output
    assert max(per_step_losses(config)) == stopped_at


@pytest.mark.launcher
def test_a_stop_before_the_ranks_exist_reaches_them_and_ends_the_run_before_its_first_step(make_config,
                                                                                           one_node_losses):
    """USR1 to the launcher as it starts, before any rank is forked: launch/deepspeed.sh passes it on until
    the launcher exits, the ranks hold it until their handler is installed, and the run stops before its first
    step with nothing saved and exit 75 through the launcher (nothing trained, not a finished run); the same
    command then trains exactly like an undisturbed run."""
    config = make_config("startup")
    run_dir = Path(json.loads(Path(config).read_text())["run_dir"])
    run = start_local(config)
    os.kill(run.pid, signal.SIGUSR1)
    output = finish(run)
    assert run.returncode == 75, output[-4000:]
    assert "before step 1, the first of this run: no step trained, nothing new to save" in output
    assert not (run_dir / "checkpoints").exists()
    assert_ok_output = finish(start_local(config))
    assert list(per_step_losses(config).values()) == one_node_losses, assert_ok_output[-3000:]
