"""The rows of a vocabulary extension in training, ZeRO 0 and 1: `train.freeze` trains only them for its first
K steps (every other weight and every frozen Adam moment bit-identical, then everything trains), and a new
stage that keeps the optimizer of the checkpoint the extension grew keeps the old rows' moments exactly and
starts the new rows' at zero. Moments are read back through DeepSpeed's universal form (elastic.py), not
through the code under test."""
import json
from pathlib import Path

import pytest
import torch
from test_extend_vocab import checkpoints, cli, code_corpus, new_tokenizer  # noqa: F401 (fixtures)

from megacpt.checkpoint import elastic
from megacpt.checkpoint.tags import resolve_tag
from megacpt.model.hf_mapping import VOCAB_ROWS

from datagen import random_documents, read_metrics, tiny_config, write_config, write_indexed
from launch import assert_ok, deepspeed_launch

NEW = slice(300, 400)  # the ids the 100-piece extension added (the base has 300; padded 384, then 512)
MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 256, "seq_length": 64}
MOMENTS = ("exp_avg", "exp_avg_sq")


@pytest.fixture(scope="module")
def code_ids(tmp_path_factory) -> str:
    """Token ids over the extended vocabulary (new ids included), as the new stage's data."""
    return write_indexed(tmp_path_factory.mktemp("ids") / "code", random_documents(3, 60, 100, vocab=400))


@pytest.fixture(scope="module", params=[0, 1], ids=["zero0", "zero1"])
def grown(request, tmp_path_factory, checkpoints, new_tokenizer, pattern_data, sp_model) -> dict:  # noqa: F811
    """A 3-step stage 0 (vocab 300, with its optimizer) at ZeRO 0 or 1, then `megacpt extend-vocab` of it."""
    zero = request.param
    folder = tmp_path_factory.mktemp(f"zero{zero}")
    config = tiny_config(folder / "stage0", [{"name": "a", "prefix": pattern_data["a"]}],
                         model={**MODEL, "vocab_size": 300}, tokenizer={"type": "sentencepiece", "model": sp_model},
                         init={"checkpoint": str(checkpoints[1])}, train={"steps": 3},
                         deepspeed={"zero_optimization": {"stage": zero}})
    assert cli("train", write_config(folder / "stage0.json", config)) == 0
    assert cli("extend-vocab", "--checkpoint", folder / "stage0" / "checkpoints", "--tokenizer", new_tokenizer,
               "--output", folder / "grown") == 0
    return {"zero": zero, "stage0": folder / "stage0" / "checkpoints" / "step00000003",
            "grown": resolve_tag(folder / "grown"), "tokenizer": new_tokenizer}


def stage_config(tmp_path: Path, grown: dict, code_ids: str, **train) -> dict:
    return tiny_config(tmp_path / "run", [{"name": "code", "prefix": code_ids}], model={**MODEL, "vocab_size": 400},
                       tokenizer={"type": "sentencepiece", "model": grown["tokenizer"]},
                       init={"checkpoint": str(grown["grown"]), "load_optimizer": train.pop("load_optimizer")},
                       train={"steps": 3, **train}, deepspeed={"zero_optimization": {"stage": grown["zero"]}})


def weights(tag: Path) -> dict[str, torch.Tensor]:
    saved = torch.load(tag / elastic.MODEL_STATES.format(0), map_location="cpu", weights_only=False)["module"]
    return {n: t for n, t in saved.items() if not n.endswith("._extra_state")}


def moments(tag: Path, rows: int, folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Adam's moments of every parameter of `tag`, full size, its vocabulary cut or zero-padded to `rows`."""
    folder.mkdir()
    elastic.write_universal(tag, elastic.saved_layout(tag, 1), rows, folder / "universal")
    zero = folder / "universal" / "zero"
    return {d.name: {k: torch.load(d / f"{k}.pt", weights_only=False)["param"] for k in MOMENTS}
            for d in zero.iterdir() if d.is_dir()}


def started_moments(grown: dict, load_optimizer: bool, folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """What the new stage's moments must be before its first step: stage 0's, new rows zero; or all zero."""
    kept = moments(grown["stage0"], 512, folder)
    assert kept["output_layer.weight"]["exp_avg_sq"][NEW].abs().sum() > 0  # the softmax trained rows 300-383
    for name in VOCAB_ROWS:
        for key in MOMENTS:
            kept[name][key][NEW] = 0
    if not load_optimizer:
        kept = {n: {k: torch.zeros_like(t) for k, t in m.items()} for n, m in kept.items()}
    return kept


def old_rows(tensor: torch.Tensor) -> torch.Tensor:
    return torch.cat([tensor[:NEW.start], tensor[NEW.stop:]])


@pytest.mark.parametrize("load_optimizer", [False, True], ids=["fresh-moments", "kept-moments"])
def test_freeze_trains_only_the_new_rows_for_k_steps_then_everything(tmp_path, grown, code_ids, load_optimizer):
    config = stage_config(tmp_path, grown, code_ids, load_optimizer=load_optimizer, save_interval=1,
                          freeze={"steps": 2})
    assert cli("train", write_config(tmp_path / "config.json", config)) == 0
    tags = tmp_path / "run" / "checkpoints"
    start, frozen, free = weights(grown["grown"]), weights(tags / "step00000002"), weights(tags / "step00000003")
    assert start.keys() == frozen.keys() == free.keys()
    for name in start:
        if name in VOCAB_ROWS:
            assert torch.equal(old_rows(frozen[name]), old_rows(start[name])), name
            assert (frozen[name][NEW] != start[name][NEW]).any(dim=1).all(), name  # every new row moved
        else:
            assert torch.equal(frozen[name], start[name]), name
        assert (free[name] != frozen[name]).any(), name  # step 3: everything trains
    expected = started_moments(grown, load_optimizer, tmp_path / "start")
    after = moments(tags / "step00000002", 512, tmp_path / "after")
    for name, keys in expected.items():
        for key, before in keys.items():
            now = after[name][key]
            if name in VOCAB_ROWS:
                assert torch.equal(old_rows(now), old_rows(before)), (name, key)
                assert (now[NEW] != 0).any(dim=1).all() if name == "output_layer.weight" else (now[NEW] != 0).any()
            else:
                assert torch.equal(now, before), (name, key)
    if not load_optimizer:  # step 1 from zero moments: exp_avg = (1 - beta1) x the applied (clipped) gradient
        first = moments(tags / "step00000001", 512, tmp_path / "first")
        applied = torch.cat([first[name]["exp_avg"][NEW].flatten() for name in VOCAB_ROWS]).norm() / (1 - 0.9)
        logged = next(r["grad_norm"] for r in read_metrics(tmp_path / "run") if r["step"] == 1 and "loss" in r)
        # the norm that clipping and the log see is the new rows' gradient alone
        assert applied.item() == pytest.approx(min(logged, 1.0), rel=1e-4)


def test_kept_optimizer_of_a_grown_checkpoint_keeps_old_moments_and_zeroes_new_ones(tmp_path, grown, code_ids,
                                                                                      world):
    """After loading, before any step: the grown checkpoint's weights (fp32 master too), stage 0's moments."""
    import deepspeed

    from megacpt.checkpoint import load as checkpoint
    from megacpt.checkpoint.elastic import Layout
    from megacpt.config import validate_config
    from megacpt.runtime.engine import build_engine
    from megacpt.train.trainer import preflight

    config = validate_config(stage_config(tmp_path, grown, code_ids, load_optimizer=True))
    plan = preflight(config, 1)
    assert plan.optimizer_tag == grown["stage0"]
    checkpoint.follow_layout(plan, Layout(1, 1, grown["zero"]), config.padded_vocab_size, True)
    engine, _, _ = build_engine(config, world, load_universal=bool(plan.universal and grown["zero"]))
    checkpoint.load_into_engine(engine, plan, world)
    expected, start = started_moments(grown, True, tmp_path / "start"), weights(grown["grown"])
    for name, param in engine.module.named_parameters():
        if grown["zero"]:
            master = deepspeed.utils.safe_get_full_fp32_param(param)
            loaded = {k: deepspeed.utils.safe_get_full_optimizer_state(param, k) for k in MOMENTS}
        else:
            master, loaded = param.detach(), engine.basic_optimizer.state[param]
        assert torch.equal(param.detach(), start[name]) and torch.equal(master, start[name]), name
        for key in MOMENTS:
            assert torch.equal(loaded[key], expected[name][key]), (name, key)


def test_freeze_without_an_extension_or_with_too_few_or_many_steps_exits_2(
        tmp_path, checkpoints, pattern_data, capsys, sp_model):  # noqa: F811
    base = tiny_config(tmp_path / "run", [{"name": "a", "prefix": pattern_data["a"]}],
                       model={**MODEL, "vocab_size": 300}, tokenizer={"type": "sentencepiece", "model": sp_model},
                       init={"checkpoint": str(checkpoints[1])}, train={"steps": 3, "freeze": {"steps": 1}})
    for config, key in ((base, "'train.freeze'"), ({**base, "init": {}}, "'train.freeze'"),
                        ({**base, "train": {**base["train"], "freeze": {"steps": -1}}}, "'train.freeze.steps'"),
                        ({**base, "train": {**base["train"], "freeze": {"steps": 4}}}, "'train.freeze.steps'")):
        assert cli("train", write_config(tmp_path / "config.json", config)) == 2
        assert key in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.launcher
def test_freeze_at_tensor_parallel_2_trains_only_each_ranks_share_of_the_new_rows(
        tmp_path, checkpoints, code_ids, new_tokenizer):  # noqa: F811
    """The vocabulary is split by rows over the two ranks (256 each of 512): ids 300-399 are rank 1's rows 44-143."""
    assert cli("extend-vocab", "--checkpoint", checkpoints[2], "--tokenizer", new_tokenizer,
               "--output", tmp_path / "grown") == 0
    grown = {"zero": 0, "grown": resolve_tag(tmp_path / "grown"), "tokenizer": new_tokenizer}
    config = stage_config(tmp_path, grown, code_ids, load_optimizer=False, save_interval=1, freeze={"steps": 2})
    config["parallel"] = {"tensor": 2}
    assert_ok(deepspeed_launch(2, ["megacpt", "train", write_config(tmp_path / "config.json", config)]))
    frozen_tag = tmp_path / "run" / "checkpoints" / "step00000002"
    for rank, new in ((0, slice(0, 0)), (1, slice(44, 144))):
        start, frozen = (torch.load(tag / elastic.MODEL_STATES.format(rank), map_location="cpu",
                                    weights_only=False)["module"] for tag in (grown["grown"], frozen_tag))
        for name, before in start.items():
            if name.endswith("._extra_state"):
                continue
            kept = torch.ones(before.shape[0], dtype=torch.bool)
            if name in VOCAB_ROWS:
                kept[new] = False
                assert (frozen[name][new] != before[new]).any(dim=1).all(), (rank, name)
            assert torch.equal(frozen[name][kept], before[kept]), (rank, name)


def test_dry_run_says_where_the_moments_come_from_and_what_is_frozen(tmp_path, grown, code_ids, capsys):
    config = stage_config(tmp_path, grown, code_ids, load_optimizer=True, freeze={"steps": 2})
    assert cli("train", write_config(tmp_path / "config.json", config), "--dry-run", "--json") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["optimizer_from"] == str(grown["stage0"])
    assert summary["freeze"] == {"until_step": 2, "first_id": 300, "last_id": 399}
    assert not (tmp_path / "run").exists()
