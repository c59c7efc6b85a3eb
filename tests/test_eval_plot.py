"""Measuring runs: `megacpt eval` gives the training loop's validation numbers for a checkpoint (in one process
and under the launcher), `megacpt plot` draws and tabulates each run with the stages it grew from, TensorBoard
gets the metrics.jsonl scalars, and bad input fails with exit code 2."""
import json
import math
import shutil
from pathlib import Path

import pytest

from megacpt.cli import main
from megacpt.evaluation.lineage import run_lineage

from datagen import read_metrics, tiny_config, trained_stage, write_config, write_state
from launch import assert_ok, deepspeed_launch


def _config(tmp_path: Path, name: str, pattern_data: dict, **sections) -> dict:
    """A tiny stage on dataset 'a' (or 'b') with two validation sets and TensorBoard on."""
    source = sections.pop("source", "a")
    sections["train"] = {"steps": 6, "eval_interval": 3, "save_interval": 3, "log_interval": 1,
                         **sections.get("train", {})}
    return tiny_config(tmp_path / name, [{"name": source, "prefix": pattern_data[source]}],
                       data={"validation": [{"name": "a_val", "prefix": pattern_data["a_val"]},
                                            {"name": "b_val", "prefix": pattern_data["b_val"]}]},
                       logging={"tensorboard": True}, **sections)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pattern_data) -> dict:
    """Stage 0 on 'a' (6 steps, eval at 3 and 6), then stage 1 on 'b' from its latest checkpoint (4 steps)."""
    tmp_path = tmp_path_factory.mktemp("runs")
    config0 = write_config(tmp_path / "stage0.json", _config(tmp_path, "stage0", pattern_data))
    assert main(["train", config0]) == 0
    config1 = write_config(tmp_path / "stage1.json", _config(
        tmp_path, "stage1", pattern_data, source="b", train={"steps": 4, "eval_interval": 2, "save_interval": 0},
        init={"checkpoint": str(tmp_path / "stage0" / "checkpoints"), "mode": "new_stage"}))
    assert main(["train", config1]) == 0
    return {"root": tmp_path, "config0": config0, "config1": config1,
            "stage0": tmp_path / "stage0", "stage1": tmp_path / "stage1"}


def _evals(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r["eval"] for r in read_metrics(run_dir) if "eval" in r}


def _eval_json(capsys, *args) -> dict:
    out = Path(args[0]).parent / "eval.json"
    assert main(["eval", *map(str, args), "--json", str(out), "--overwrite"]) == 0  # one file for every call
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    for name, result in report["results"].items():
        assert name in table and f"{result['loss']:.4f}" in table
        assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    return report


# ------------------------------------------------------------------------------------ megacpt eval


@pytest.mark.parametrize("stage, tag, step", [("0", "step00000003", 3), ("1", "", 4)])
def test_eval_equals_the_training_loops_evaluation_at_the_same_step(runs, capsys, stage, tag, step):
    checkpoint = runs[f"stage{stage}"] / "checkpoints" / tag  # a tag, or the folder (its latest)
    report = _eval_json(capsys, runs[f"config{stage}"], "--checkpoint", checkpoint)
    assert report["step"] == step
    losses = {name: r["loss"] for name, r in report["results"].items()}
    assert losses == pytest.approx(_evals(runs[f"stage{stage}"])[step], rel=1e-6, abs=0)


def test_eval_data_picks_or_adds_validation_sets_and_samples_changes_the_sample_count(runs, capsys, pattern_data):
    checkpoint = runs["stage0"] / "checkpoints" / "step00000006"
    report = _eval_json(capsys, runs["config0"], "--checkpoint", checkpoint, "--data", "b_val",
                        f"noise={pattern_data['noise']}")
    assert list(report["results"]) == ["b_val", "noise"]
    assert report["results"]["b_val"]["loss"] == pytest.approx(_evals(runs["stage0"])[6]["b_val"], rel=1e-6, abs=0)
    assert report["results"]["noise"]["loss"] > math.log(256) - 1  # random tokens stay near uniform
    fewer = _eval_json(capsys, runs["config0"], "--checkpoint", checkpoint, "--data", "a_val", "--samples", "3")
    assert fewer["samples"] == 3 and fewer["results"]["a_val"]["tokens"] == 3 * 64
    assert fewer["results"]["a_val"]["loss"] != pytest.approx(_evals(runs["stage0"])[6]["a_val"])


def _fails(capsys, *args) -> str:
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_eval_refuses_an_unknown_validation_name(runs, capsys):
    err = _fails(capsys, "eval", runs["config0"], "--checkpoint", runs["stage0"] / "checkpoints", "--data", "c_val")
    assert "unknown validation set 'c_val'" in err and "a_val, b_val" in err


def test_eval_refuses_a_checkpoint_of_another_architecture(runs, capsys):
    err = _fails(capsys, "eval", runs["config0"], "--checkpoint", runs["stage0"] / "checkpoints",
                 "--set", "model.hidden_size=128")
    assert "hidden_size: checkpoint 64 vs config 128" in err and str(runs["stage0"] / "checkpoints") in err


def test_eval_refuses_a_missing_checkpoint_and_a_config_without_validation_sets(runs, capsys, tmp_path, pattern_data):
    err = _fails(capsys, "eval", runs["config0"], "--checkpoint", tmp_path / "nowhere")
    assert "--checkpoint" in err and str(tmp_path / "nowhere") in err
    bare = write_config(tmp_path / "bare.json",
                        tiny_config(tmp_path / "run", [{"name": "a", "prefix": pattern_data["a"]}]))
    err = _fails(capsys, "eval", bare, "--checkpoint", runs["stage0"] / "checkpoints")
    assert "data.validation" in err and "--data" in err


@pytest.mark.launcher
@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_eval_under_the_launcher_equals_the_loops_evaluation(runs, tmp_path, layout):
    """TP 2: the resharded step-6 weights. DP 2: 5 samples in micro-batches of 2, dealt to two ranks (the
    second also runs a forward it does not count), give one process's numbers on the same 5 samples."""
    out = tmp_path / "eval.json"
    if layout == "tp2":
        assert main(["reshard", "--checkpoint", str(runs["stage0"] / "checkpoints"), "--tp", "2", "--output",
                     str(tmp_path / "tp2")]) == 0
        args = ["--checkpoint", str(tmp_path / "tp2"), "--set", "parallel.tensor=2"]
    else:
        args = ["--checkpoint", str(runs["stage0"] / "checkpoints" / "step00000003"), "--samples", "5"]
    assert_ok(deepspeed_launch(2, ["megacpt", "eval", runs["config0"], *args, "--json", str(out)]))
    results = json.loads(out.read_text())["results"]
    if layout == "tp2":
        expected = {name: {"loss": loss, "tokens": 64 * 64} for name, loss in _evals(runs["stage0"])[6].items()}
    else:
        assert main(["eval", runs["config0"], *args, "--json", str(tmp_path / "one.json")]) == 0
        expected = json.loads((tmp_path / "one.json").read_text())["results"]
    for name, result in results.items():
        assert result["loss"] == pytest.approx(expected[name]["loss"], rel=1e-5)
        assert result["tokens"] == expected[name]["tokens"]


# ------------------------------------------------------------------------------------ megacpt plot


def test_plot_draws_every_run_with_its_earlier_stages(runs):
    from megacpt.evaluation.plot_command import build_figure

    histories = {name: run_lineage(runs[name]).logged for name in ("stage0", "stage1")}
    assert [s.run_dir.resolve() for s in histories["stage1"]] == [runs["stage0"].resolve(), runs["stage1"].resolve()]
    lr_axis, *loss_axes = build_figure(histories).axes
    assert [ax.get_ylabel() for ax in loss_axes] == ["a_val loss", "b_val loss"]
    for ax in (lr_axis, *loss_axes):
        data = [line for line in ax.get_lines() if line.get_gid() == "run"]
        stages = [line for line in ax.get_lines() if line.get_gid() == "stage"]
        assert [line.get_label() for line in data] == ["stage0", "stage1"]
        assert len(stages) == 1 and stages[0].get_xdata()[0] == 6 * 4 * 64  # stage 1 begins after 1536 tokens
        assert data[0].get_color() != data[1].get_color()
    stage0_lr, stage1_lr = (line for line in lr_axis.get_lines() if line.get_gid() == "run")
    assert list(stage1_lr.get_xdata()) == [256 * s for s in range(1, 11)]  # 6 steps of stage 0, then 4 of stage 1
    assert list(stage1_lr.get_xdata()[:6]) == list(stage0_lr.get_xdata())
    _, stage1_b = (line for line in loss_axes[1].get_lines() if line.get_gid() == "run")
    evals0, evals1 = _evals(runs["stage0"]), _evals(runs["stage1"])
    assert list(stage1_b.get_ydata()) == [evals0[3]["b_val"], evals0[6]["b_val"], evals1[2]["b_val"],
                                          evals1[4]["b_val"]]


def test_plot_command_writes_a_png_and_the_table_of_final_losses(runs, tmp_path, capsys):
    import matplotlib.image

    png = tmp_path / "cpt.png"
    assert main(["plot", str(runs["stage0"]), str(runs["stage1"]), "--output", str(png), "--table"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(png).ndim == 3
    table = capsys.readouterr().out.splitlines()
    evals0, evals1 = _evals(runs["stage0"]), _evals(runs["stage1"])
    row = next(line for line in table if line.startswith("b_val")).split()
    assert row[1] == f"{evals0[6]['b_val']:.4f}"  # stage 0: final value, no earlier stage
    assert row[2:] == [f"{evals1[4]['b_val']:.4f}", f"({evals1[4]['b_val'] - evals0[6]['b_val']:+.4f})"]
    assert next(line for line in table if line.startswith("tokens")).split()[1:] == ["1,536", "2,560"]


def _fake_stage(run_dir: Path, init: Path | None, steps: int, tokens_before: int, history: list) -> None:
    """A run directory with metrics.jsonl (100 tokens per step, eval every 2 steps, step 2 logged twice as after
    a resume) and a checkpoint state at every even step; `history`: the stages before this one."""
    records = [{"step": 0, "event": "stage_start", "stage": len(history), "init": str(init) if init else None}]
    for step in range(1, steps + 1):
        records.append({"step": step, "lr": 0.1 * step, "loss": 1.0, "tokens": tokens_before + 100 * step})
        if step % 2 == 0:
            records.append({"step": step, "tokens": tokens_before + 100 * step,
                            "eval": {"x": float(len(history) * 10 + step)}})
    records.insert(2, {**records[2], "lr": -1.0})  # a first log of step 2, replaced by the later one
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for step in range(2, steps + 1, 2):
        entry = trained_stage(len(history), run_dir, step, steps, global_batch_size=10, seq_length=10)
        write_state(run_dir / "checkpoints" / f"step{step:08d}", step, tokens_before + 100 * step, history + [entry])


def test_plot_follows_a_three_stage_history_to_the_steps_each_next_stage_started_from(tmp_path):
    from megacpt.evaluation.forgetting import forgetting_table
    from megacpt.evaluation.plot_command import build_figure

    r0 = trained_stage(0, tmp_path / "r0", 4, global_batch_size=10, seq_length=10)
    r1 = trained_stage(1, tmp_path / "r1", 2, 4, global_batch_size=10, seq_length=10)
    _fake_stage(tmp_path / "r0", None, 4, 0, [])
    _fake_stage(tmp_path / "r1", tmp_path / "r0" / "checkpoints" / "step00000004", 4, 400, [r0])
    _fake_stage(tmp_path / "r2", tmp_path / "r1" / "checkpoints" / "step00000002", 2, 600, [r0, r1])
    history = run_lineage(tmp_path / "r2").logged
    assert [(s.run_dir.name, s.start_tokens) for s in history] == [("r0", 0), ("r1", 400), ("r2", 600)]
    lr_axis, x_axis = build_figure({"r2": history}).axes
    (lr,) = (line for line in lr_axis.get_lines() if line.get_gid() == "run")
    assert list(lr.get_xdata()) == [100, 200, 300, 400, 500, 600, 700, 800]
    assert list(lr.get_ydata()) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.1, 0.2, 0.1, 0.2])  # step 2's later record
    assert sorted(line.get_xdata()[0] for line in x_axis.get_lines() if line.get_gid() == "stage") == [400, 600]
    (loss,) = (line for line in x_axis.get_lines() if line.get_gid() == "run")
    assert list(loss.get_ydata()) == [2, 4, 12, 22]  # r1's eval at step 4 came after r2's start
    assert forgetting_table({"r2": history}).splitlines()[-1].split() == ["x", "22.0000", "(+10.0000)"]


def test_plot_stops_following_the_history_where_the_earlier_run_is_gone(runs, tmp_path):
    from megacpt.evaluation.plot_command import build_figure

    moved = tmp_path / "stage1"
    shutil.copytree(runs["stage1"], moved, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    lines = (moved / "metrics.jsonl").read_text().replace(str(runs["stage0"]), str(tmp_path / "gone"))
    (moved / "metrics.jsonl").write_text(lines)
    history = run_lineage(moved).logged
    assert [s.run_dir for s in history] == [moved] and history[0].start_tokens is None
    lr_axis = build_figure({"stage1": history}).axes[0]
    assert [line.get_gid() for line in lr_axis.get_lines()] == ["run"]


def test_plot_refuses_a_run_directory_without_metrics(runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _fails(capsys, "plot", runs["stage0"], tmp_path / "empty", "--output", tmp_path / "x.png")
    assert f"{tmp_path / 'empty'} holds no metrics.jsonl" in err
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------ TensorBoard


def _tensorboard(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_tensorboard_gets_the_metrics_scalars_and_a_text_event_at_each_stage_start(runs):
    for name, steps, eval_steps in (("stage0", range(1, 7), [3, 6]), ("stage1", range(1, 5), [2, 4])):
        events = _tensorboard(runs[name])
        records = read_metrics(runs[name])
        train = {r["step"]: r for r in records if "loss" in r}
        for tag in ("loss", "lr", "tokens"):  # evaluation records log `tokens` again at their steps
            scalars = events.Scalars(tag)
            assert sorted({s.step for s in scalars}) == list(steps)
            assert [s.value for s in scalars] == pytest.approx([train[s.step][tag] for s in scalars], rel=1e-6)
        for val in ("a_val", "b_val"):
            assert [s.step for s in events.Scalars(f"eval/{val}")] == eval_steps
        logged = [_evals(runs[name])[s]["b_val"] for s in eval_steps]
        assert [s.value for s in events.Scalars("eval/b_val")] == pytest.approx(logged)
        texts = [(t.step, json.loads(t.tensor_proto.string_val[0].decode()))
                 for t in events.Tensors("events/text_summary")]
        (step, start), *saves = texts
        assert step == 0 and start["event"] == "stage_start" and start["stage"] == int(name[-1])
        assert {event["event"] for _, event in saves} == {"checkpoint"}
        assert start["init"] == (None if name == "stage0" else str(runs["stage0"] / "checkpoints" / "step00000006"))
