"""Llama, Mistral and Qwen2 models: megacpt's megatron-core model of each computes Hugging Face's logits, the
conversion is exact both ways at TP 1 and 2, generation matches, and what a family cannot be is refused.

The Hugging Face models are tiny, random and have every parameter perturbed (norm weights and Qwen2's q/k/v
biases included), so a swapped or dropped tensor shows in the logits (tests/hfmodel.py)."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from megacpt.cli import main
from megacpt.config import ModelConfig, validate_config
from megacpt.errors import ConfigError
from megacpt.model import hf_mapping
from megacpt.policy.stages import ModelSignature, read_state
from megacpt.weights import checkpoint_io

from datagen import tiny_config
from hfmodel import FAMILY_MODELS, random_family_model
from launch import assert_ok, deepspeed_launch

PROMPT = [5, 17, 42, 99, 3, 150, 7, 64]
NEW_TOKENS = 32
THREE = ("llama-gqa", "llama-tied-llama3", "qwen2-bias")
PARITY_SCRIPT = str(Path(__file__).parent / "scripts" / "hf_parity.py")


def cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each of FAMILY_MODELS saved as sharded safetensors (with its index), seed 0."""
    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for name in FAMILY_MODELS:
        random_family_model(name, seed=0).save_pretrained(root / name, max_shard_size="60KB")
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory) -> dict[tuple[str, int], Path]:
    """hf-to-megacpt of each model at TP 1 and TP 2 (the converter's own logit check is on)."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name in THREE + ("mistral", "qwen2-yarn"):
        for tp in (1, 2):
            out[name, tp] = root / f"{name}-tp{tp}"
            assert cli("convert", "hf-to-megacpt", "--hf", hf_dirs[name], "--output", out[name, tp], "--tp", tp) == 0
    return out


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


def hf_greedy(path: Path) -> list[int]:
    model, _ = load_hf(path)
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(PROMPT):].tolist()


def test_every_hf_parameter_is_perturbed_and_mapped(hf_dirs):
    """Norm weights are not 1, biases are not 0, and the mapping reads every parameter the model has."""
    for name in FAMILY_MODELS:
        model, _ = load_hf(hf_dirs[name])
        params = dict(model.named_parameters())
        for pname, param in params.items():
            assert not torch.all(param == 1) and not torch.all(param == 0), (name, pname)
        config = ModelConfig(**hf_mapping.model_fields_from_hf(model.config.to_dict()))
        assert hf_mapping.hf_names(config) == set(params), name
    assert any(name.endswith("q_proj.bias") for name, _ in load_hf(hf_dirs["qwen2-bias"])[0].named_parameters())


def test_fused_qkv_rows_are_megatrons_per_group_layout():
    """Rows of megatron's fused QKV, group by group: the group's H/G query heads, its key head, its value head."""
    heads, groups, d = 6, 2, 3
    q = torch.arange(heads * d).repeat_interleave(1).float().unsqueeze(1)  # head i holds rows i*d .. i*d+d-1
    k = 100 + torch.arange(groups * d).float().unsqueeze(1)
    v = 200 + torch.arange(groups * d).float().unsqueeze(1)
    fused = hf_mapping.fuse_qkv(q, k, v, groups).squeeze(1)
    expected = []
    for g in range(groups):
        for h in range(g * heads // groups, (g + 1) * heads // groups):
            expected += list(range(h * d, h * d + d))
        expected += [100 + g * d + i for i in range(d)] + [200 + g * d + i for i in range(d)]
    assert fused.tolist() == expected
    assert all(torch.equal(a, b) for a, b in zip(hf_mapping.split_qkv(fused.unsqueeze(1), heads, groups), (q, k, v)))


def test_gated_fc1_splits_gate_and_up_per_rank():
    """Under TP a SwiGLU fc1 rank holds [its gate rows; its up rows], and merging gives [gate; up] back."""
    gate, up = torch.arange(8.0).unsqueeze(1), 100 + torch.arange(8.0).unsqueeze(1)
    full = {"decoder.layers.0.mlp.linear_fc1.weight": torch.cat([gate, up])}
    shards = [hf_mapping.split_for_rank(full, 2, r, gated_mlp=True) for r in range(2)]
    assert shards[1]["decoder.layers.0.mlp.linear_fc1.weight"].squeeze(1).tolist() == [4, 5, 6, 7, 104, 105, 106, 107]
    assert torch.equal(hf_mapping.merge_shards(shards, gated_mlp=True)["decoder.layers.0.mlp.linear_fc1.weight"],
                       full["decoder.layers.0.mlp.linear_fc1.weight"])


@pytest.mark.parametrize("name", THREE + ("mistral", "qwen2-yarn"))
@pytest.mark.parametrize("tp", [1, 2])
def test_hf_to_megacpt_to_hf_gives_back_every_tensor_and_config_key(tmp_path, capsys, hf_dirs, converted, name, tp):
    out = tmp_path / "hf"
    assert cli("convert", "megacpt-to-hf", "--checkpoint", converted[name, tp], "--output", out) == 0
    # (the import was verified too: the converter exits 1 above the threshold)
    verified = [line for line in capsys.readouterr().out.splitlines() if line.startswith("verification:")]
    assert len(verified) == 1 and float(verified[0].split()[4]) <= 1e-4
    original, _ = load_hf(hf_dirs[name])
    exported, info = load_hf(out)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(exported) is type(original)
    theirs, ours = original.state_dict(), exported.state_dict()
    assert theirs.keys() == ours.keys()
    for key in theirs:
        assert torch.equal(theirs[key], ours[key]), key
    written, source = (json.loads((d / "config.json").read_text()) for d in (out, hf_dirs[name]))
    for key in ("num_key_value_heads", "tie_word_embeddings", "rms_norm_eps", "num_attention_heads",
                "intermediate_size", "vocab_size", "sliding_window"):
        assert written.get(key) == source.get(key), key
    assert written["rope_parameters"] == source["rope_parameters"]
    assert written["rope_theta"] == source["rope_parameters"]["rope_theta"]
    scaling = {k: v for k, v in source["rope_parameters"].items() if k != "rope_theta"}
    assert written["rope_scaling"] == (None if scaling["rope_type"] == "default" else scaling)
    assert exported.config.rope_parameters == original.config.rope_parameters  # transformers reads them back


@pytest.mark.parametrize("name", THREE + ("qwen2-yarn",))
def test_greedy_generation_matches_hugging_face(capsys, hf_dirs, converted, name):
    assert cli("generate", "--checkpoint", converted[name, 2], "--prompt-ids", ",".join(map(str, PROMPT)),
               "--max-new-tokens", NEW_TOKENS) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ours == hf_greedy(hf_dirs[name])


@pytest.mark.launcher
@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias"])
def test_logits_and_generation_at_tp2_under_the_launcher_match_hugging_face(tmp_path, hf_dirs, converted, name):
    """Two tensor-parallel ranks, one key/value group each."""
    out = tmp_path / "parity.json"
    assert_ok(deepspeed_launch(2, [PARITY_SCRIPT, str(hf_dirs[name]), "2", str(out)], module=False))
    assert json.loads(out.read_text())["max_abs_diff"] <= 1e-4
    result = deepspeed_launch(2, ["megacpt", "generate", "--checkpoint", str(converted[name, 2]), "--prompt-ids",
                                  ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW_TOKENS)])
    assert_ok(result)
    lines = [line for line in result.stdout.splitlines() if line.startswith("[") and line.endswith("]")]
    assert json.loads(lines[-1]) == hf_greedy(hf_dirs[name])


def test_converted_state_records_the_family(converted):
    state = read_state(checkpoint_io.load(converted["qwen2-bias", 2]).tag_dir)
    assert state.model.family == "qwen2" and state.model.num_query_groups == 2 and not state.model.tie_embeddings
    model = state.config.model
    assert (model.rotary_base, model.rotary_pct, model.parallel_residual, model.layernorm_eps) == (1000000, 1.0, False,
                                                                                                    1e-3)
    tied = read_state(checkpoint_io.load(converted["llama-tied-llama3", 1]).tag_dir).config.model
    assert tied.tie_embeddings and tied.rope_scaling.factor == 8.0


def test_a_tp_degree_that_does_not_divide_the_key_value_groups_is_refused(tmp_path, capsys, hf_dirs):
    """4 heads but 2 key/value groups: TP 4 would split a group."""
    assert cli("convert", "hf-to-megacpt", "--hf", hf_dirs["llama-gqa"], "--output", tmp_path / "out", "--tp", 4) == 2
    assert "num_query_groups 2 is not divisible by tensor parallel 4" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    raw = tiny_config(tmp_path / "run", [{"name": "a", "prefix": "a"}], model={
        "family": "llama", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
        "seq_length": 64, "vocab_size": 256}, parallel={"tensor": 4})
    with pytest.raises(ConfigError, match="num_query_groups 2 is not divisible by parallel.tensor 4"):
        validate_config(raw)


@pytest.mark.parametrize("change, message", [
    ({"attention_factor": 1.5}, "yarn's attention_factor 1.5 is not supported; megacpt's YaRN scales attention by "
                                "0.1 ln(factor) + 1 = 1.13863"),
    ({"mscale": 1.0, "mscale_all_dim": 0.707}, "yarn's mscale 1.0 and mscale_all_dim 0.707 are not supported"),
    ({"truncate": False}, "yarn's truncate False is not supported"),
])
def test_a_yarn_that_scales_attention_otherwise_is_refused(tmp_path, capsys, hf_dirs, change, message):
    """Hugging Face's YaRN keys that megatron-core's YaRN cannot compute; an attention_factor equal to the
    default (0.1 ln 4 + 1) is taken."""
    folder = tmp_path / "hf"
    shutil.copytree(hf_dirs["qwen2-yarn"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] |= change
    (folder / "config.json").write_text(json.dumps(config))
    assert cli("convert", "hf-to-megacpt", "--hf", folder, "--output", tmp_path / "out") == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()
    config["rope_parameters"] = {k: v for k, v in config["rope_parameters"].items() if k not in change} | {
        "attention_factor": 0.1 * math.log(4) + 1}
    (folder / "config.json").write_text(json.dumps(config))
    assert cli("convert", "hf-to-megacpt", "--hf", folder, "--output", tmp_path / "out") == 0


def test_mistral_refuses_a_sample_longer_than_its_sliding_window(tmp_path, hf_dirs):
    with pytest.raises(ValueError, match="exceeds the sliding_window 4096"):
        ModelConfig(family="mistral", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    seq_length=8192, vocab_size=256, sliding_window=4096)
    fields = hf_mapping.model_fields_from_hf({**json.loads((hf_dirs["mistral"] / "config.json").read_text()),
                                              "max_position_embeddings": 32768})
    assert fields["seq_length"] == 128  # the import's length is the window, not the 32K positions


@pytest.mark.parametrize("fields, message", [
    (dict(family="llama", rotary_pct=0.25), "rotary_pct 0.25 is not possible for family 'llama'"),
    (dict(family="qwen2", parallel_residual=True), "parallel_residual True is not possible"),
    (dict(num_query_groups=2), "num_query_groups 2 is not possible for family 'neox'"),
    (dict(tie_embeddings=True), "tie_embeddings True is not possible for family 'neox'"),
    (dict(family="llama", num_query_groups=3), "num_attention_heads 4 is not divisible by num_query_groups 3"),
    (dict(family="llama", sliding_window=64), "sliding_window is Mistral's"),
    (dict(family="llama", rope_scaling={"rope_type": "llama3", "factor": 8, "original_max_position_embeddings": 4096}),
     "original_max_position_embeddings 4096 is not supported"),
])
def test_what_a_family_cannot_be_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64,
                       "vocab_size": 256, **fields})


def test_a_signature_saved_before_the_families_is_a_multi_head_neox():
    old = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 256,
           "padded_vocab_size": 256, "rotary_pct": 0.25, "parallel_residual": True, "tensor_parallel": 1}
    assert ModelSignature.model_validate(old) == ModelSignature.of(ModelConfig(preset="tiny"), 1)


def test_neox_defaults_are_unchanged_and_llama_defaults_are_llamas():
    neox = ModelConfig(preset="tiny")
    assert (neox.family, neox.rotary_pct, neox.parallel_residual, neox.num_query_groups, neox.tie_embeddings) == \
        ("neox", 0.25, True, 4, False)
    llama = ModelConfig(preset="tiny", family="llama")
    assert (llama.rotary_pct, llama.parallel_residual, llama.num_query_groups) == (1.0, False, 4)


# ------------------------------------------------------------------------------------ vocabulary extension


@pytest.mark.parametrize("name", ["llama-tied-llama3", "qwen2-bias"])
def test_extend_vocab_grows_a_converted_model_with_its_hugging_face_tokenizer(tmp_path, capsys, make_hf_tokenizer,
                                                                             corpus, write_jsonl, name):
    """The converted checkpoint remembers the folder's tokenizer.json; `tokenizer extend` appends BPE tokens and
    `extend-vocab` grows the embedding (tied: the one matrix) with the mean of each new token's base split."""
    from megacpt.data.bpe_extension import bpe_base_splits

    hf = tmp_path / "hf"
    hf_model = random_family_model(name, seed=3)
    hf_model.resize_token_embeddings(320)  # the tokenizer's 320 ids; the new rows random too
    with torch.no_grad():
        for param in (hf_model.get_input_embeddings().weight, hf_model.get_output_embeddings().weight):
            param[200:] = torch.randn(120, param.shape[1], generator=torch.Generator().manual_seed(1)) * 0.1
    hf_model.save_pretrained(hf)
    make_hf_tokenizer(hf / "tokenizer.json", ["<|begin_of_text|>", "<|end_of_text|>"])
    (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    assert cli("convert", "hf-to-megacpt", "--hf", hf, "--output", tmp_path / "ckpt") == 0
    source = checkpoint_io.load(tmp_path / "ckpt")
    assert source.state.tokenizer.type == "hf"
    code = write_jsonl(tmp_path / "code.jsonl", ["def f(x):\n    return x + 1\n" * 3] * 50)
    assert cli("tokenizer", "extend", "--base", source.state.tokenizer.path, "--input", code, "--add", "12",
               "--output", tmp_path / "ext" / "tokenizer.json") == 0
    assert cli("extend-vocab", "--checkpoint", tmp_path / "ckpt", "--tokenizer", tmp_path / "ext" / "tokenizer.json",
               "--output", tmp_path / "grown") == 0
    grown_ckpt = checkpoint_io.load(tmp_path / "grown")
    tied = grown_ckpt.model.tie_embeddings
    assert ("output_layer.weight" in grown_ckpt.weights) is not tied
    assert grown_ckpt.model.vocab_size == 332 and grown_ckpt.state.tokenizer.type == "hf"
    splits = bpe_base_splits(source.state.tokenizer.path, tmp_path / "ext" / "tokenizer.json", 320, 12)
    for key in [k for k in hf_mapping.VOCAB_ROWS if k in source.weights]:
        before, after = source.weights[key], grown_ckpt.weights[key]
        assert torch.equal(after[:320], before[:320]), key
        for k, split in enumerate(splits):
            assert torch.allclose(after[320 + k], before[split].mean(0)), (key, k)
    for key in source.weights:
        if key not in hf_mapping.VOCAB_ROWS:
            assert torch.equal(source.weights[key], grown_ckpt.weights[key]), key
    assert cli("convert", "megacpt-to-hf", "--checkpoint", tmp_path / "grown", "--output", tmp_path / "back") == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["vocab_size"] == 332


# ------------------------------------------------------------------------------------ a CPT stage on a converted model


@pytest.mark.parametrize("name", ["llama-tied-llama3", "qwen2-bias"])
def test_a_converted_model_trains_a_stage_with_replay_reshards_merges_evaluates_and_exports(tmp_path, capsys,
                                                                                             converted, name):
    """A new stage (replay, validation) on the converted weights; the stage's checkpoint resharded to TP 2 and
    back gives every tensor back; merged 1:0 with the import it is itself; `megacpt eval` gives the loop's
    final validation loss; the export is verified on logits (the converter exits 1 otherwise)."""
    from datagen import pattern_documents, read_metrics, write_config, write_indexed

    model = read_state(checkpoint_io.load(converted[name, 1]).tag_dir).config.model.model_dump(mode="json")
    new, old, val = (write_indexed(tmp_path / n, pattern_documents(p, o, 40, 100, vocab=200))
                     for n, p, o in (("new", 11, 3), ("old", 5, 100), ("val", 11, 7)))
    config = tiny_config(tmp_path / "run", [{"name": "new", "prefix": new}],
                         model={**model, "seq_length": 64},
                         data={"sources": [{"name": "new", "prefix": new}], "cache_dir": str(tmp_path / "cache"),
                               "replay": {"fraction": 0.5, "sources": [{"name": "old", "prefix": old}]},
                               "validation": [{"name": "val", "prefix": val}]},
                         schedule={"style": "cosine", "max_lr": 1e-3, "min_lr": 1e-4, "warmup": 1},
                         train={"steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "eval_samples": 4},
                         init={"checkpoint": str(converted[name, 1])})
    path = write_config(tmp_path / "c.json", config)
    assert cli("train", path) == 0
    records = read_metrics(tmp_path / "run")
    assert [r for r in records if "loss" in r][-1]["samples"] == {"new": 8, "old": 8}
    before, after = checkpoint_io.load(converted[name, 1]).weights, checkpoint_io.load(tmp_path / "run" /
                                                                                        "checkpoints").weights
    assert before.keys() == after.keys() and 0 < max((after[k] - before[k]).abs().max().item() for k in before)
    ckpt = tmp_path / "run" / "checkpoints"
    assert cli("reshard", "--checkpoint", ckpt, "--tp", 2, "--output", tmp_path / "tp2", "--weights-only") == 0
    assert cli("reshard", "--checkpoint", tmp_path / "tp2", "--tp", 1, "--output", tmp_path / "tp1") == 0
    back = checkpoint_io.load(tmp_path / "tp1").weights
    assert all(torch.equal(back[k], after[k]) for k in after)
    assert cli("merge", "--checkpoints", ckpt, converted[name, 1], "--weights", 1, 0, "--output", tmp_path / "m") == 0
    assert all(torch.equal(checkpoint_io.load(tmp_path / "m").weights[k], after[k]) for k in after)
    capsys.readouterr()
    assert cli("eval", path, "--checkpoint", ckpt, "--json", tmp_path / "eval.json") == 0
    final = [r for r in records if "eval" in r][-1]["eval"]["val"]
    assert json.loads((tmp_path / "eval.json").read_text())["results"]["val"]["loss"] == pytest.approx(final, abs=1e-6)
    assert cli("convert", "megacpt-to-hf", "--checkpoint", ckpt, "--output", tmp_path / "hf") == 0
    assert load_hf(tmp_path / "hf")[0].config.model_type == FAMILY_MODELS[name][0].lower()
