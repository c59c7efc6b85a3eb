"""The same global batch gives the same loss trajectory whatever the parallel layout, under the real
`deepspeed` launcher on CPU: data parallel 1 vs 2, tensor parallel 1 vs 2, ZeRO 0 vs 1 vs 2; and the
model computes what Hugging Face's GPT-NeoX computes at TP 1 and TP 2."""
import json
from pathlib import Path

import pytest

from datagen import read_metrics, samples_trained, tiny_config, write_config
from launch import assert_ok, deepspeed_launch, run_megacpt, run_python

STEPS = 10
PARITY_SCRIPT = str(Path(__file__).parent / "scripts" / "hf_parity.py")


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def _config(tmp_path, name, pattern_data, zero=0, tensor=1) -> str:
    config = tiny_config(tmp_path / name, [{"name": "a", "prefix": pattern_data["a"]},
                                           {"name": "noise", "prefix": pattern_data["noise"]}],
                         train={"steps": STEPS, "global_batch_size": 8, "micro_batch_size": 2},
                         parallel={"tensor": tensor},
                         deepspeed={"zero_optimization": {"stage": zero}})
    return write_config(tmp_path / f"{name}.json", config)


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory, pattern_data):
    tmp_path = tmp_path_factory.mktemp("reference")
    assert_ok(run_megacpt(["train", _config(tmp_path, "dp1", pattern_data)]))
    losses = _losses(tmp_path / "dp1")
    assert len(losses) == STEPS
    return losses, samples_trained(tmp_path / "dp1")


@pytest.mark.launcher
@pytest.mark.parametrize("name, zero, tensor", [
    ("dp2_zero0", 0, 1), ("dp2_zero1", 1, 1), ("dp2_zero2", 2, 1), ("tp2", 0, 2),
])
def test_loss_trajectory_matches_one_process(tmp_path, pattern_data, reference_losses, name, zero, tensor):
    result = deepspeed_launch(2, ["megacpt", "train", _config(tmp_path, name, pattern_data, zero, tensor)])
    assert_ok(result)
    losses = _losses(tmp_path / name)
    assert len(losses) == STEPS
    reference, reference_samples = reference_losses
    worst = max(abs(a - b) for a, b in zip(losses, reference))
    assert worst <= 1e-4, (losses, reference)
    assert samples_trained(tmp_path / name) == reference_samples


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from hfmodel import assert_all_distinct, random_gpt_neox

    model = random_gpt_neox(0, vocab_size=200, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=256, rotary_pct=0.25, max_position_embeddings=128,
                            use_parallel_residual=True, tie_word_embeddings=False)
    assert_all_distinct(model)
    path = tmp_path_factory.mktemp("hf") / "model"
    model.save_pretrained(path)
    return path


def test_logits_match_hugging_face_at_tp1(tmp_path, hf_dir):
    result = run_python([PARITY_SCRIPT, str(hf_dir), "1", str(tmp_path / "out.json")])
    assert_ok(result)
    assert json.loads((tmp_path / "out.json").read_text())["max_abs_diff"] <= 1e-4


@pytest.mark.launcher
def test_logits_match_hugging_face_at_tp2(tmp_path, hf_dir):
    result = deepspeed_launch(2, [PARITY_SCRIPT, str(hf_dir), "2", str(tmp_path / "out.json")], module=False)
    assert_ok(result)
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["tp"] == 2 and out["max_abs_diff"] <= 1e-4

