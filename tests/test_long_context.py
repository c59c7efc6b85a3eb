"""A stage that lengthens the context: stage 0 at 64 tokens, stage 1 at 128 from its checkpoint, evaluated by
position (train.eval_position_bucket), `megacpt eval --position-bucket` and `megacpt plot --by-position`."""
import json

import pytest

from megacpt.cli import main
from megacpt.evaluation.lineage import run_lineage

from datagen import read_metrics, tiny_config, write_config


def _config(root, name: str, pattern_data: dict, seq: int, batch: int, **sections) -> dict:
    return tiny_config(root / name, [{"name": "a", "prefix": pattern_data["a"]}],
                       model={"preset": "tiny", "seq_length": seq},
                       data={"validation": [{"name": "a_val", "prefix": pattern_data["a_val"]}]},
                       train={"steps": 4, "global_batch_size": batch, "micro_batch_size": 2, "log_interval": 1,
                              "eval_interval": 2, "eval_samples": 6, "eval_position_bucket": 32},
                       **sections)


@pytest.fixture(scope="module")
def stages(tmp_path_factory, pattern_data) -> dict:
    """Stage 0 at 64 tokens (batch 4), stage 1 at 128 (batch 2: the same tokens per step) from its checkpoint."""
    root = tmp_path_factory.mktemp("longctx")
    config0 = write_config(root / "s0.json", _config(root, "stage0", pattern_data, 64, 4))
    assert main(["train", config0]) == 0
    config1 = write_config(root / "s1.json", _config(
        root, "stage1", pattern_data, 128, 2, init={"checkpoint": str(root / "stage0" / "checkpoints"),
                                                   "mode": "new_stage"}))
    assert main(["train", config1]) == 0
    return {"root": root, "config0": config0, "config1": config1}


def _evals(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "eval" in r]


def test_evaluation_records_carry_the_loss_of_each_position_bucket(stages):
    for run, buckets in (("stage0", ["0-31", "32-63"]), ("stage1", ["0-31", "32-63", "64-95", "96-127"])):
        records = _evals(stages["root"] / run)
        assert [r["step"] for r in records] == [2, 4]
        for record in records:
            by_position = record["eval_by_position"]["a_val"]
            assert list(by_position) == buckets
            # every bucket scores as many tokens, so the overall loss is their plain mean
            assert record["eval"]["a_val"] == pytest.approx(sum(by_position.values()) / len(buckets), rel=1e-6)


def test_eval_command_gives_the_loops_position_buckets(stages, capsys, tmp_path):
    out = tmp_path / "eval.json"
    checkpoint = stages["root"] / "stage1" / "checkpoints"
    assert main(["eval", stages["config1"], "--checkpoint", str(checkpoint), "--json", str(out)]) == 0
    result = json.loads(out.read_text())["results"]["a_val"]["by_position"]
    for bucket, loss in _evals(stages["root"] / "stage1")[-1]["eval_by_position"]["a_val"].items():
        assert result[bucket] == pytest.approx(loss, rel=1e-5)
    assert "loss by position" in capsys.readouterr().out
    assert main(["eval", stages["config1"], "--checkpoint", str(checkpoint), "--position-bucket", "0", "--json",
                 str(tmp_path / "none.json")]) == 0
    assert "by_position" not in json.loads((tmp_path / "none.json").read_text())["results"]["a_val"]


def test_plot_by_position_draws_each_stages_last_evaluation(stages, tmp_path, capsys):
    from megacpt.evaluation.plot_command import position_curves, position_figure

    histories = {"s1": run_lineage(stages["root"] / "stage1").logged}
    curves = position_curves(histories)
    assert [label.split(" (")[1] for label in curves] == ["stage 0, step 4)", "stage 1, step 4)"]
    (ax,) = position_figure(curves).axes
    before, after = (line for line in ax.get_lines() if line.get_gid() == "curve")
    assert list(before.get_xdata()) == [15.5, 47.5] and list(after.get_xdata()) == [15.5, 47.5, 79.5, 111.5]
    last = _evals(stages["root"] / "stage1")[-1]["eval_by_position"]["a_val"]
    assert list(after.get_ydata()) == list(last.values())
    png = tmp_path / "pos.png"
    assert main(["plot", str(stages["root"] / "stage1"), "--by-position", "--output", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_plot_by_position_without_buckets_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "stage": 0, "tokens": 10, "eval": {"x": 1.0}}) + "\n")
    assert main(["plot", str(run), "--by-position", "--output", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "eval_position_bucket" in err and "Traceback" not in err and not (tmp_path / "p.png").exists()
