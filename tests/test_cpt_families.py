"""The CPT policy on every model family: a tiny random Hugging Face model of each (every parameter perturbed,
tests/hfmodel.py), converted to megacpt and trained for one stage, goes through a new stage with a re-warm,
replay and the optimizer state kept; a kill -9 and rerun of that stage is bit-exact; a resume of it on two
data-parallel ranks continues it; and its export to Hugging Face computes megacpt's logits.

The families: GPT-NeoX, Llama with grouped-query attention (untied), Llama with tied embeddings and llama3 RoPE
scaling, and Qwen2 with q/k/v biases."""
import sys

import pytest
import torch

from megacpt.cli import main
from megacpt.policy.stages import read_state
from megacpt.weights import checkpoint_io

from datagen import optimizer_file_state, pattern_documents, per_step, tiny_config, write_config, write_indexed
from hfmodel import random_family_model, random_gpt_neox
from launch import assert_ok, deepspeed_launch, kill_9_after, run_megacpt

NEOX = dict(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
            max_position_embeddings=128, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
            initializer_range=0.1, bos_token_id=None, eos_token_id=None)
FAMILIES = ("neox", "llama-gqa", "llama-tied-llama3", "qwen2-bias")
STAGE1_STEPS = 3  # the converted model's first megacpt stage, on "old", which the stage under test replays
STEPS, SAVE, KILL_AFTER = 12, 4, 5  # the stage under test: 12 steps, saved every 4, killed after step 5
BATCH, REPLAY = 4, 0.25  # one replayed sample in every batch of 4
MAX_LR, WARMUP = 1e-3, 3


def cli(*args) -> int:
    return main([str(a) for a in args])


def _stage_config(root, name: str, model: dict, init: str, steps: int, sources: list, keep_optimizer: bool = False,
                  **sections) -> str:
    config = tiny_config(root / name, sources, model=model,
                         train={"steps": steps, "global_batch_size": BATCH, "micro_batch_size": 2,
                                "save_interval": SAVE, "log_interval": 1},
                         schedule={"style": "cosine", "max_lr": MAX_LR, "min_lr": MAX_LR / 10,
                                   "warmup": min(WARMUP, steps - 1)},
                         deepspeed={"zero_optimization": {"stage": 1}},
                         init={"checkpoint": init, "mode": "new_stage", "load_optimizer": keep_optimizer}, **sections)
    return write_config(root / f"{name}.json", config)


@pytest.fixture(scope="module", params=FAMILIES)
def stage(request, tmp_path_factory):
    """The family's HF model converted; stage 1 on "old" from it; the stage under test (new data, 25% replay of
    "old", re-warmed, Adam's state of stage 1 kept) trained uninterrupted in a process of its own."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    hf = random_gpt_neox(0, **NEOX) if family == "neox" else random_family_model(family, seed=0)
    hf.save_pretrained(root / "hf")
    assert cli("convert", "hf-to-megacpt", "--hf", root / "hf", "--output", root / "converted") == 0
    model = {**read_state(checkpoint_io.load(root / "converted").tag_dir).config.model.model_dump(mode="json"),
             "seq_length": 64}
    new, old = (write_indexed(root / name, pattern_documents(period, offset, 40, 100, vocab=200))
                for name, period, offset in (("new", 11, 3), ("old", 5, 100)))
    stage1 = _stage_config(root, "stage1", model, str(root / "converted"), STAGE1_STEPS,
                           [{"name": "old", "prefix": old}])
    assert cli("train", stage1) == 0
    config = _stage_config(root, "straight", model, str(root / "stage1" / "checkpoints"), STEPS,
                           [{"name": "new", "prefix": new}], keep_optimizer=True,
                           data={"replay": {"fraction": REPLAY, "sources": [{"name": "old", "prefix": old}]}})
    assert_ok(run_megacpt(["train", config]))
    return {"family": family, "root": root, "hf": root / "hf", "config": config,
            "records": per_step(root / "straight"), "checkpoints": root / "straight" / "checkpoints"}


def _same_stage_elsewhere(stage, name: str, **init) -> str:
    """The stage under test's config with RUN_DIR `name` (and `init` changed)."""
    import json

    config = json.loads(open(stage["config"]).read())
    config["run_dir"] = str(stage["root"] / name)
    config["init"] = {**config["init"], **init}
    return write_config(stage["root"] / f"{name}.json", config)


def test_the_new_stage_rewarms_replays_and_keeps_adams_state(stage):
    records = stage["records"]
    assert sorted(records) == list(range(1, STEPS + 1))
    assert [records[s]["lr"] for s in range(1, WARMUP + 1)] == pytest.approx(
        [MAX_LR * s / WARMUP for s in range(1, WARMUP + 1)], rel=1e-12)  # warmed up again from 0, as a new stage
    assert all(records[s]["stage"] == 2 for s in records)
    for s in records:  # compute-equivalent replay: one "old" sample in every batch of 4
        assert records[s]["samples"] == {"new": 3 * s, "old": s}, s
    tag = stage["checkpoints"] / f"step{STEPS:08d}"
    _, groups = optimizer_file_state(tag, zero=1)
    assert {step for *_, step in groups} == {STAGE1_STEPS + STEPS}  # Adam's step counts on from stage 1
    assert read_state(tag).has_optimizer


def test_kill_9_and_rerun_of_the_new_stage_is_bit_exact(stage):
    config = _same_stage_elsewhere(stage, "killed")
    killed_at = kill_9_after(stage["root"] / "killed", KILL_AFTER, [sys.executable, "-m", "megacpt", "train", config])
    assert killed_at < STEPS
    assert_ok(run_megacpt(["train", config]))
    resumed, straight = per_step(stage["root"] / "killed"), stage["records"]
    assert sorted(resumed) == sorted(straight)
    for s in straight:
        assert (resumed[s]["loss"], resumed[s]["lr"], resumed[s]["samples"]) == \
            (straight[s]["loss"], straight[s]["lr"], straight[s]["samples"]), s


@pytest.mark.launcher
def test_the_new_stage_resumes_on_two_data_parallel_ranks(stage):
    """The one-rank ZeRO-1 checkpoint of step 4 resumed by two ranks (through its universal form): steps 5-12
    train the same samples at the same LR, to the losses of the one-rank run (summed in another order)."""
    config = _same_stage_elsewhere(stage, "elastic", mode="resume",
                                   checkpoint=str(stage["checkpoints"] / f"step{SAVE:08d}"))
    result = deepspeed_launch(2, ["megacpt", "train", config])
    assert_ok(result)
    assert "this run is tensor 1 x data 2, ZeRO 1: converted it to DeepSpeed's universal form" in result.stderr
    resumed, straight = per_step(stage["root"] / "elastic"), stage["records"]
    assert sorted(resumed) == list(range(SAVE + 1, STEPS + 1))
    for s in resumed:
        assert (resumed[s]["lr"], resumed[s]["samples"]) == (straight[s]["lr"], straight[s]["samples"]), s
        assert resumed[s]["loss"] == pytest.approx(straight[s]["loss"], abs=1e-5), s


def test_the_stage_exports_to_hugging_face_with_megacpts_logits(stage):
    """The exported folder loads strictly in transformers and computes the logits of megacpt's own model of
    the trained weights (computed here, not by the converter's check)."""
    from transformers import AutoModelForCausalLM

    from megacpt.runtime.distributed import setup_world

    out = stage["root"] / "exported"
    assert cli("convert", "megacpt-to-hf", "--checkpoint", stage["checkpoints"], "--output", out) == 0
    hf, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    trained = checkpoint_io.load(stage["checkpoints"])
    setup_world(1, seed=0)
    ours = checkpoint_io.build_model(trained.model, trained.weights, 1, 0, torch.device("cpu")).eval()
    ids = torch.randint(0, 200, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf.eval()(ids).logits
        logits = ours(ids, torch.arange(64).expand_as(ids), None)[..., :200]
    assert (logits - theirs).abs().max().item() <= 1e-4
    before = checkpoint_io.load(stage["root"] / "converted").weights
    assert max((trained.weights[k] - before[k]).abs().max().item() for k in before) > 0  # the stages trained it
