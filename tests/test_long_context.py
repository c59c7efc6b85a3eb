"""A stage that lengthens the context: stage 0 at 64 tokens, stage 1 at 128 from its checkpoint, evaluated by
position (train.eval_position_bucket), `megacpt eval --position-bucket` and `megacpt plot --by-position`."""
import json

import pytest

from megacpt.cli import main
from megacpt.evaluation.lineage import run_lineage

from datagen import read_metrics, tiny_config, write_config

# stage 1's context: twice the length, adjusted base frequency and position interpolation by 2
LONG = {"seq_length": 128, "rotary_base": 500000, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}


def _config(root, name: str, pattern_data: dict, seq: int, batch: int, **sections) -> dict:
    return tiny_config(root / name, [{"name": "a", "prefix": pattern_data["a"]}],
                       model=sections.pop("model", {"preset": "tiny", "seq_length": seq}),
                       data={"validation": [{"name": "a_val", "prefix": pattern_data["a_val"]}]},
                       train={"steps": 4, "global_batch_size": batch, "micro_batch_size": 2, "log_interval": 1,
                              "eval_interval": 2, "eval_samples": 6, "eval_position_bucket": 32},
                       **sections)


@pytest.fixture(scope="module")
def stages(tmp_path_factory, pattern_data) -> dict:
    """Stage 0 at 64 tokens (batch 4), stage 1 at 128 (batch 2: the same tokens per step) with base 500,000 and
    linear interpolation by 2, from stage 0's checkpoint."""
    root = tmp_path_factory.mktemp("longctx")
    config0 = write_config(root / "s0.json", _config(root, "stage0", pattern_data, 64, 4))
    assert main(["train", config0]) == 0
    config1 = write_config(root / "s1.json", _config(
        root, "stage1", pattern_data, 128, 2, init={"checkpoint": str(root / "stage0" / "checkpoints"),
                                                   "mode": "new_stage"},
        model={"preset": "tiny", **LONG}))
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


def test_the_stage_record_keeps_each_stages_length_and_rope(stages):
    from megacpt.policy.stages import read_state

    checkpoints = stages["root"] / "stage1" / "checkpoints"
    state = read_state(checkpoints / (checkpoints / "latest").read_text())
    first, second = state.stages
    assert (first.seq_length, first.rotary_base, first.rope_scaling) == (64, 10000, None)
    assert (second.seq_length, second.rotary_base, second.rope_scaling.hf_dict()) == \
        (128, 500000, {"rope_type": "linear", "factor": 2.0})
    assert first.tokens == second.tokens == 4 * 4 * 64  # fewer, longer samples: the same tokens


def test_dry_run_shows_the_checkpoints_context_and_the_new_one(stages, capsys, tmp_path):
    assert main(["train", stages["config1"], "--set", f"run_dir={tmp_path / 'again'}", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["mode"] == "new_stage"
    assert plan["context"] == {"checkpoint": {"seq_length": 64, "rotary_base": 10000, "rope_scaling": None},
                               "stage": {"seq_length": 128, "rotary_base": 500000,
                                         "rope_scaling": {"rope_type": "linear", "factor": 2.0}}}
    assert plan["samples"] == {"a": 8} and plan["tokens"] == {"a": 8 * 128}


@pytest.mark.parametrize("key, value", [("model.seq_length", "64"), ("model.rotary_base", "10000"),
                                        ("model.rope_scaling.factor", "4")])
def test_a_resume_refuses_another_length_or_rope(stages, capsys, key, value):
    assert main(["train", stages["config1"], "--set", f"{key}={value}", "--set", "train.steps=6"]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err


def _export_matches_past_the_old_length(checkpoints, out, rope_parameters: dict) -> None:
    """megacpt-to-hf writes the final context; the exported model's logits at positions 64-127 equal megacpt's
    (to 1e-5), and are far from those of the same weights with plain RoPE: the scaling is what matches."""
    import torch
    from transformers import AutoModelForCausalLM

    from megacpt.runtime.distributed import setup_world
    from megacpt.weights import checkpoint_io

    assert main(["convert", "megacpt-to-hf", "--checkpoint", str(checkpoints), "--output", str(out)]) == 0
    written = json.loads((out / "config.json").read_text())
    assert written["max_position_embeddings"] == 128
    assert written["rope_parameters"] == rope_parameters
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    source = checkpoint_io.load(checkpoints)
    world = setup_world(1, seed=0)
    ours = checkpoint_io.build_model(source.model, source.weights, 1, 0, world.device)
    ids = torch.randint(0, 256, (1, 128), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = hf(ids).logits[0, 64:]
        mine = ours(ids, torch.arange(128)[None], None)[0, 64:, :256]
    matched = (theirs - mine).abs().max().item()
    assert matched < 1e-5
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, rope_parameters={
        "rope_type": "default", "rope_theta": rope_parameters["rope_theta"], "partial_rotary_factor": 0.25}).eval()
    with torch.no_grad():
        assert (plain(ids).logits[0, 64:] - mine).abs().max().item() > 20 * matched


def test_hugging_face_export_writes_the_final_context_and_matches_past_the_old_length(stages, tmp_path):
    _export_matches_past_the_old_length(stages["root"] / "stage1" / "checkpoints", tmp_path / "hf", {
        "rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0, "partial_rotary_factor": 0.25})


def test_a_yarn_stage_trains_and_exports_exactly(stages, pattern_data, tmp_path):
    """YaRN by 2 from stage 0's 64 tokens, on NeoX's partial rotary (a quarter of each head): the frequencies
    and the attention factor (0.1 ln 2 + 1) equal Hugging Face's "yarn" past the old length."""
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}
    config = write_config(tmp_path / "yarn.json", _config(
        tmp_path, "yarn", pattern_data, 128, 2, model={"preset": "tiny", "seq_length": 128, "rope_scaling": yarn},
        init={"checkpoint": str(stages["root"] / "stage0" / "checkpoints"), "mode": "new_stage"}))
    assert main(["train", config]) == 0
    _export_matches_past_the_old_length(tmp_path / "yarn" / "checkpoints", tmp_path / "hf", {
        **yarn, "beta_fast": 32.0, "beta_slow": 1.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
