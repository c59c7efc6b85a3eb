"""`megacpt sweep`: a grid x seeds becomes one validated config per run, named after its values; a bad key or
value is refused before anything is written; the runs train one after another, a killed sweep resumes without
re-running finished runs; the report holds the runs' own numbers; the SLURM array script runs under stand-in
sbatch / scontrol / srun."""
from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from test_launch import FAKE_SCONTROL, FAKE_SRUN, script_env

from megacpt import cli
from megacpt.config import load_config
from megacpt.runtime.launcher_env import free_port, own_world_env
from megacpt.sweep.grid import grid_axes, write_sweep
from megacpt.sweep.slurm import array_spec
from megacpt.sweep.sweep_command import add_arguments, build_sweep

from datagen import read_metrics, tiny_config, write_config
from launch import assert_ok, run_megacpt, wait_for_step

REPO = Path(__file__).resolve().parents[1]
GRID = ["--grid", "schedule.max_lr=1e-3,3e-3", "--grid", "schedule.warmup=0,1", "--seeds", "2"]
SEEDS = (1234, 1235)  # the base's train.seed (the default) and the next
# the module's sweep (a stage 0 and 8 runs plus a restart) is set up by whichever of its tests runs first; about
# 2 minutes on 2 idle cores, more than pytest.ini's 900 s on a crowded one
SWEEP_TIMEOUT = pytest.mark.timeout(1800)
RUNS = [f"max_lr{lr}_warmup{w}_seed{s}" for s in SEEDS for lr in ("1e-3", "3e-3") for w in (0, 1)]

FAKE_SBATCH = f"""#!{sys.executable}
# sbatch for tests: runs every task of the script's --array one after another, here, as SLURM would start it.
import os, re, subprocess, sys
script = sys.argv[-1]
options = dict(m.groups() for m in re.finditer(r"^#SBATCH --([a-z-]+)=?(.*)$", open(script).read(), re.M))
tasks = []
for part in options["array"].split("%")[0].split(","):
    first, _, last = part.partition("-")
    tasks += range(int(first), int(last or first) + 1)
print("Submitted batch job 4242", flush=True)
for task in tasks:
    env = dict(os.environ, SLURM_JOB_ID=str(5000 + task), SLURM_ARRAY_JOB_ID="4242", SLURM_ARRAY_TASK_ID=str(task),
               SLURM_JOB_NODELIST="node-01", SLURM_SUBMIT_DIR=os.getcwd())
    if subprocess.run(["bash", script], cwd=options["chdir"], env=env).returncode:
        sys.exit(1)
"""


def base_config(folder: Path, pattern_data: dict, steps: int = 3) -> dict:
    """Stage 1 on dataset b, validated on a (the old data) and b (the new); no run_dir: the sweep sets it."""
    config = tiny_config(folder / "unused", [{"name": "b", "prefix": pattern_data["b"]}],
                         data={"validation": [{"name": "a", "prefix": pattern_data["a_val"]},
                                              {"name": "b", "prefix": pattern_data["b_val"]}],
                               "cache_dir": str(folder / "cache")},
                         train={"steps": steps, "eval_batches": 1}, schedule={"warmup": 1})
    del config["run_dir"]
    return config


def sweep_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["sweep", *args])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------ expansion (no training)


def test_grid_and_seeds_expand_into_one_validated_config_per_run(tmp_path, pattern_data):
    base = write_config(tmp_path / "base.json", base_config(tmp_path, pattern_data))
    workdir = tmp_path / "sweep"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sweep = build_sweep(parser.parse_args([base, *GRID, "--workdir", str(workdir)]))  # the command's expansion
    write_sweep(sweep)
    assert [r.name for r in sweep.runs] == RUNS
    assert sorted(p.stem for p in (workdir / "configs").glob("*.json")) == sorted(RUNS)
    for run in sweep.runs:
        config = load_config(workdir / "configs" / f"{run.name}.json")
        lr, warmup, seed = run.labels["schedule.max_lr"], run.labels["schedule.warmup"], run.labels["seed"]
        assert config.schedule.max_lr == float(lr) and config.schedule.warmup == int(warmup)
        assert config.train.seed == config.data.seed == int(seed)
        assert Path(config.run_dir) == (workdir / "runs" / run.name).resolve()
        assert run.values == {"schedule.max_lr": float(lr), "schedule.warmup": int(warmup), "seed": int(seed)}
        # everything else is the base's
        assert config.train.steps == 3 and config.data.sources[0].name == "b" and config.schedule.min_lr == 3e-4


def test_linked_keys_reproduce_the_three_hand_written_gupta_configs(tmp_path):
    """Gupta et al.'s LR sweep: max_lr and min_lr = 0.1 x max_lr change together, one run per pair."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = str(REPO / "configs" / "gupta_pythia410m_cpt_lr3e-4.json")
    grid = "schedule.max_lr:schedule.min_lr=1.5e-4:1.5e-5,3e-4:3e-5,6e-4:6e-5"
    sweep = build_sweep(parser.parse_args([base, "--grid", grid, "--workdir", str(tmp_path)]))
    assert [r.name for r in sweep.runs] == ["max_lr1.5e-4", "max_lr3e-4", "max_lr6e-4"]
    for run, lr in zip(sweep.runs, ("1.5e-4", "3e-4", "6e-4")):
        hand_written = json.loads((REPO / "configs" / f"gupta_pythia410m_cpt_lr{lr}.json").read_text())
        assert {**run.config, "run_dir": None} == {**hand_written, "run_dir": None}
        assert run.values == {"schedule.max_lr:schedule.min_lr": [float(lr), hand_written["schedule"]["min_lr"]]}


@pytest.mark.parametrize("grid, words", [
    ("schedule.max_lrr=1e-3,3e-3", ["'schedule.max_lrr'", "unknown key", "did you mean 'max_lr'"]),
    ("schedule.max_lr=1e-3,fast", ["'schedule.max_lr'", "schedule.max_lr=fast", "valid number"]),
    ("schedule.warmup=1,3", ["'schedule.warmup'", "schedule.warmup=3", "fewer than train.steps"]),
    ("train.steps=3,-1", ["'train.steps'", "train.steps=-1", "greater than 0"]),
    ("schedule.max_lr=", ["--grid expects KEY=V1,V2"]),
    ("schedule.max_lr=1e-3,,2e-3", ["empty value"]),
    ("run_dir=a,b", ["set by the sweep"]),
    ("schedule.max_lr:schedule.min_lr=1e-3:1e-4,2e-3", ["every value needs 2 parts"]),
])
def test_a_bad_grid_key_or_value_exits_2_naming_it_and_writes_nothing(tmp_path, pattern_data, capsys, grid, words):
    base = write_config(tmp_path / "base.json", base_config(tmp_path, pattern_data))
    workdir = tmp_path / "sweep"
    code, out, err = sweep_cli(capsys, base, "--grid", grid, "--workdir", str(workdir))
    assert code == 2 and "Traceback" not in err
    for word in words:
        assert word in err, err
    assert not workdir.exists()


def test_seeds_and_a_seed_grid_together_are_refused():
    from megacpt.errors import UserError

    with pytest.raises(UserError, match="--seeds sets train.seed and data.seed"):
        grid_axes(["train.seed=1,2"], [1, 2])


def test_a_workdir_holding_another_sweep_is_refused_untouched(tmp_path, pattern_data, capsys):
    base = write_config(tmp_path / "base.json", base_config(tmp_path, pattern_data))
    workdir = tmp_path / "sweep"
    args = [base, "--grid", "schedule.max_lr=1e-3,3e-3", "--workdir", str(workdir), "--run", "slurm"]
    code, out, err = sweep_cli(capsys, *args)
    assert code == 0, err
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    code, _, err = sweep_cli(capsys, base, "--grid", "schedule.max_lr=1e-3,2e-3", "--workdir", str(workdir))
    assert code == 2 and "holds another sweep" in err
    changed = base_config(tmp_path, pattern_data, steps=4)  # same grid, another base: refused too
    code, _, err = sweep_cli(capsys, write_config(tmp_path / "base.json", changed), *args[1:])
    assert code == 2 and "the config of run max_lr1e-3 differs" in err
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


def test_array_spec_joins_consecutive_runs_into_ranges():
    assert array_spec([0, 1, 2, 3], None) == "0-3"
    assert array_spec([0, 2, 3, 4, 7], 2) == "0,2-4,7%2"
    assert array_spec([5], 1) == "5%1"


# ------------------------------------------------------------------------------------ a local sweep, killed and resumed


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory, pattern_data):
    """Stage 0 on a; then a 2 x 2 grid with 2 seeds from its checkpoint, SIGTERMed while the third run trains,
    reported, and run again to the end. Returns what each phase left."""
    folder = tmp_path_factory.mktemp("sweep")
    stage0 = tiny_config(folder / "stage0", [{"name": "a", "prefix": pattern_data["a"]}],
                         data={"validation": [{"name": "a", "prefix": pattern_data["a_val"]},
                                              {"name": "b", "prefix": pattern_data["b_val"]}]},
                         train={"steps": 3, "eval_batches": 1})
    assert_ok(run_megacpt(["train", write_config(folder / "stage0.json", stage0)]))
    base = write_config(folder / "base.json", base_config(folder, pattern_data))
    workdir = folder / "work"
    command = [sys.executable, "-m", "megacpt", "sweep", base, *GRID, "--init", str(folder / "stage0"),
               "--workdir", str(workdir)]
    first = subprocess.Popen(command, env=own_world_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(workdir / "runs" / RUNS[2], 1, first, timeout=1200)
        first.send_signal(signal.SIGTERM)
        first_output, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    finished = {name: (workdir / "runs" / name / "metrics.jsonl").read_bytes() for name in RUNS
                if (workdir / "runs" / name / "checkpoints" / "latest").is_file()
                and (workdir / "runs" / name / "checkpoints" / "latest").read_text() == "step00000003"}
    partial = run_megacpt(["sweep", "--report", str(workdir)])
    partial_summary = json.loads((workdir / "summary.json").read_text())
    again = subprocess.run(command, env=own_world_env(), capture_output=True, text=True, timeout=1800)
    return {"folder": folder, "workdir": workdir, "first": (first.returncode, first_output), "finished": finished,
            "partial": (partial, partial_summary), "again": again}


@SWEEP_TIMEOUT
def test_a_killed_sweep_resumes_without_rerunning_finished_runs(sweep_run):
    code, output = sweep_run["first"]
    assert code == 130, output  # SIGTERM stops the sweep like Ctrl-C, after the running run saved a checkpoint
    finished = sweep_run["finished"]
    assert set(RUNS[:2]) <= set(finished) and not set(RUNS[3:]) & set(finished), output
    again = sweep_run["again"]
    assert_ok(again)
    for number, name in enumerate(RUNS, start=1):
        if name in finished:
            assert f"[{number}/8] {name}: finished earlier, skipped" in again.stdout
            assert (sweep_run["workdir"] / "runs" / name / "metrics.jsonl").read_bytes() == finished[name]
        else:
            assert f"[{number}/8] {name}: done in" in again.stdout
    if RUNS[2] not in finished:  # the run that was stopped mid-way resumed from its own checkpoint
        assert f"[3/8] {RUNS[2]}: resuming" in again.stdout
        records = read_metrics(sweep_run["workdir"] / "runs" / RUNS[2])
        assert sum(r.get("event") == "stage_start" for r in records) == 1
    summary = json.loads((sweep_run["workdir"] / "summary.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["done"] * 8


@SWEEP_TIMEOUT
def test_the_report_of_a_partial_sweep_marks_the_runs_not_yet_done(sweep_run):
    result, summary = sweep_run["partial"]
    assert_ok(result)
    status = {r["name"]: r["status"] for r in summary["runs"]}
    for name in RUNS:
        assert status[name] == ("done" if name in sweep_run["finished"] else
                                "partial" if name == RUNS[2] else "not started"), (name, status)
    assert "not yet done: " in result.stdout
    for group in summary["groups"]:  # only finished runs count
        assert group["train_loss"]["n"] == sum(name in sweep_run["finished"] for name in group["runs"])


def _expected(run_dir: Path, stage0_dir: Path) -> dict:
    """A run's report numbers computed from its own metrics.jsonl (and stage 0's for the change)."""
    records = read_metrics(run_dir)
    train = {r["step"]: r for r in records if "loss" in r}
    evals = {r["step"]: r["eval"] for r in records if "eval" in r}
    start = {r["step"]: r["eval"] for r in read_metrics(stage0_dir) if "eval" in r}[3]  # stage 0's last eval
    last = evals[max(evals)]
    return {"train_loss": train[max(train)]["loss"],
            "validation": {n: {"final": last[n], "change": last[n] - start[n]} for n in ("a", "b")}}


@SWEEP_TIMEOUT
def test_the_report_holds_each_runs_own_numbers_and_the_seed_statistics(sweep_run):
    workdir, folder = sweep_run["workdir"], sweep_run["folder"]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["axes"] == ["schedule.max_lr", "schedule.warmup", "seed"]
    assert [r["name"] for r in summary["runs"]] == RUNS
    expected = {}
    for run in summary["runs"]:
        expected[run["name"]] = _expected(workdir / "runs" / run["name"], folder / "stage0")
        assert run["train_loss"] == expected[run["name"]]["train_loss"]
        for name in ("a", "b"):
            for part in ("final", "change"):
                assert run["validation"][name][part] == pytest.approx(expected[run["name"]]["validation"][name][part],
                                                                      abs=1e-12), (run["name"], name, part)
    assert len(summary["groups"]) == 4
    for group in summary["groups"]:
        members = [expected[n] for n in group["runs"]]
        assert len(members) == 2 and group["done"] == 2
        finals = [m["validation"]["b"]["final"] for m in members]
        assert group["validation"]["b"]["final"]["mean"] == pytest.approx(statistics.fmean(finals))
        assert group["validation"]["b"]["final"]["std"] == pytest.approx(statistics.stdev(finals))
        assert group["train_loss"]["n"] == 2
    # the stage-1 data is b: every run adapts to it
    assert all(r["validation"]["b"]["change"] < 0 for r in summary["runs"])
    table = (workdir / "summary.txt").read_text()
    assert table in sweep_run["again"].stdout
    row = next(line for line in table.splitlines() if line.startswith(RUNS[5]))
    b = summary["runs"][5]["validation"]["b"]
    assert f"{b['final']:.4f} ({b['change']:+.4f})" in row and "done" in row
    assert (workdir / "sweep.png").read_bytes().startswith(b"\x89PNG")


def test_the_report_of_a_directory_without_a_sweep_exits_2(tmp_path, capsys):
    code, _, err = sweep_cli(capsys, "--report", str(tmp_path))
    assert code == 2 and "holds no sweep.json" in err


# ------------------------------------------------------------------------------------ SLURM job array


def fake_slurm(tmp_path: Path, **extra: str) -> dict:
    """sbatch, scontrol and srun stand-ins on PATH; one node called localhost."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("sbatch", FAKE_SBATCH), ("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = script_env(FAKE_HOSTS="localhost", FAKE_SLURM_LOG=str(tmp_path / "scontrol.log"),
                     MASTER_PORT=str(free_port()), **extra)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env


def test_the_slurm_array_script_runs_each_unfinished_run_under_stand_in_sbatch(tmp_path, pattern_data):
    base = write_config(tmp_path / "base.json", base_config(tmp_path, pattern_data, steps=2))
    workdir = tmp_path / "sweep"
    args = ["sweep", base, "--grid", "schedule.max_lr=1e-3,3e-3", "--seeds", "2", "--workdir", str(workdir),
            "--run", "slurm", "--launcher", "tasks", "--max-parallel", "2", "--sbatch=--time=0:10:00"]
    written = run_megacpt(args)
    assert_ok(written)
    script = workdir / "sweep.sbatch"
    assert f"sbatch {script}" in written.stdout and not (workdir / "runs").exists()  # nothing ran
    text = script.read_text()
    assert "#SBATCH --array=0-3%2\n" in text and "#SBATCH --time=0:10:00\n" in text
    assert "#SBATCH --ntasks-per-node=1\n" in text and f"#SBATCH --chdir={Path.cwd()}\n" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0

    # dry run: every array task reaches its launch script's launch command with its own config
    dry = subprocess.run(["sbatch", str(script)], cwd=tmp_path, env=fake_slurm(tmp_path, MEGACPT_DRY_RUN="1"),
                         capture_output=True, text=True, timeout=600)
    assert_ok(dry)
    lines = [line for line in dry.stdout.splitlines() if line.startswith("would run:")]
    names = [f"max_lr{lr}_seed{s}" for s in (1234, 1235) for lr in ("1e-3", "3e-3")]
    assert lines == [f"would run: srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=1 --cpus-per-task=1 "
                     f"{REPO}/launch/task.sh {workdir}/configs/{name}.json" for name in names]

    # one array task for real (task 1, as SLURM would run it alone): it trains its run
    env = fake_slurm(tmp_path)
    real = subprocess.run(["bash", str(script)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**env, "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node-01",
                               "SLURM_ARRAY_TASK_ID": "1", "SLURM_SUBMIT_DIR": str(REPO)})
    assert_ok(real)
    assert [r["step"] for r in read_metrics(workdir / "runs" / names[1]) if "loss" in r] == [1, 2]
    again = run_megacpt(args)  # the finished run leaves the array
    assert_ok(again)
    assert "#SBATCH --array=0,2-3%2\n" in script.read_text() and "1 runs already finished" in again.stdout


@pytest.mark.launcher
def test_nproc_runs_each_run_under_the_deepspeed_launcher(tmp_path, pattern_data):
    base = write_config(tmp_path / "base.json", base_config(tmp_path, pattern_data, steps=2))
    workdir = tmp_path / "sweep"
    result = run_megacpt(["sweep", base, "--grid", "schedule.max_lr=1e-3,3e-3", "--nproc", "2",
                          "--workdir", str(workdir)], timeout=900, extra_env={"MASTER_PORT": str(free_port())})
    assert_ok(result)
    for name in ("max_lr1e-3", "max_lr3e-3"):
        assert "world 2 (tensor 1 x data 2" in (workdir / "logs" / f"{name}.log").read_text()
    assert [r["status"] for r in json.loads((workdir / "summary.json").read_text())["runs"]] == ["done", "done"]
