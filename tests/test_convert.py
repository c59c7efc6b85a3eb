"""Checkpoint tools on small random GPT-NeoX models built from a config (nothing is downloaded): conversion
both ways is exact and verified, converted checkpoints train as a new stage, generation matches Hugging
Face's greedy `generate` at any TP degree, resharding and merging keep the weights they promise, and bad
input fails with exit code 2 and leaves no output behind."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from megacpt.cli import main
from megacpt.config import TokenizerConfig
from megacpt.policy.stages import read_state
from megacpt.weights import checkpoint_io

from datagen import pattern_documents, read_metrics, tiny_config, write_config, write_indexed
from hfmodel import perturb_every_parameter
from launch import assert_ok, deepspeed_launch

MODEL = dict(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
             max_position_embeddings=128, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)
PROMPT = [5, 17, 42, 99, 3, 150, 7, 64]
NEW_TOKENS = 32


def save_hf(path: Path, seed: int, form: str = "safetensors", **overrides) -> Path:
    """A random GPTNeoXForCausalLM saved as one safetensors file (float32 or bfloat16), sharded safetensors or a
    .bin."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    # No bos/eos, so Hugging Face's generate never stops early; a wide init, so greedy choices are clear-cut;
    # every bias and LayerNorm distinct, so a mapping that mixes them up changes the logits.
    config = GPTNeoXConfig(**{**MODEL, **overrides}, initializer_range=0.1, bos_token_id=None, eos_token_id=None)
    model = perturb_every_parameter(GPTNeoXForCausalLM(config), seed)
    model = model.to(torch.bfloat16 if form == "bf16" else torch.float32)
    if form == "bin":
        path.mkdir(parents=True)
        config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    else:
        model.save_pretrained(path, max_shard_size="100KB" if form == "sharded" else "5GB")
    return path


def load_hf(path: Path):
    from transformers import GPTNeoXForCausalLM

    return GPTNeoXForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(path: Path, prompt: list[int] = PROMPT) -> list[int]:
    out = load_hf(path).generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(prompt):].tolist()


def cli(*args) -> int:
    return main([str(a) for a in args])


def generated_ids(capsys, checkpoint: Path, prompt: list[int] = PROMPT) -> list[int]:
    assert cli("generate", "--checkpoint", checkpoint, "--prompt-ids", ",".join(map(str, prompt)),
               "--max-new-tokens", NEW_TOKENS) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return save_hf(tmp_path_factory.mktemp("hf") / "model", seed=0)


@pytest.fixture(scope="module")
def hf_reference(hf_dir) -> list[int]:
    return hf_greedy(hf_dir)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, hf_dir) -> Path:
    out = tmp_path_factory.mktemp("converted") / "ckpt"
    assert cli("convert", "hf-to-megacpt", "--hf", hf_dir, "--output", out) == 0
    return out


# ------------------------------------------------------------------------------------ conversion


@pytest.mark.parametrize("form, tp", [("safetensors", 1), ("sharded", 2), ("bin", 1), ("bf16", 1)])
def test_hf_to_megacpt_to_hf_gives_back_every_tensor(tmp_path, capsys, form, tp):
    source = save_hf(tmp_path / "hf", seed=1, form=form)
    assert cli("convert", "hf-to-megacpt", "--hf", source, "--output", tmp_path / "ckpt", "--tp", tp) == 0
    assert "max |logit difference|" in capsys.readouterr().out

    tag = tmp_path / "ckpt" / (tmp_path / "ckpt" / "latest").read_text()
    assert sorted(p.name for p in tag.glob("mp_rank_*")) == [f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)]
    state = read_state(tag)
    assert state.has_optimizer is False and [s.origin for s in state.stages] == ["huggingface"]
    assert state.stages[0].path == str(source.resolve())
    assert (state.step, state.tokens, state.scheduler, state.data) == (0, 0, None, None)
    assert state.model.model_dump() == {"family": "neox", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                        "num_query_groups": 4, "ffn_hidden_size": 256, "padded_vocab_size": 256,
                                        "rotary_pct": 0.25, "parallel_residual": True, "tie_embeddings": False,
                                        "tensor_parallel": tp}

    assert cli("convert", "megacpt-to-hf", "--checkpoint", tmp_path / "ckpt", "--output", tmp_path / "back") == 0
    back = load_hf(tmp_path / "back")
    assert back.config.vocab_size == 200
    saved_dtype = json.loads((tmp_path / "back" / "config.json").read_text())["dtype"]
    assert saved_dtype == ("bfloat16" if form == "bf16" else "float32")
    assert_same_tensors(back.state_dict(), load_hf(source).state_dict())


def test_tokenizer_files_travel_with_the_checkpoint(tmp_path, capsys, hf_dir, hf_tokenizer_json):
    from transformers import AutoTokenizer

    source = tmp_path / "hf"
    shutil.copytree(hf_dir, source)
    shutil.copy(hf_tokenizer_json, source / "tokenizer.json")
    assert cli("convert", "hf-to-megacpt", "--hf", source, "--output", tmp_path / "ckpt", "--no-verify") == 0
    shutil.rmtree(source)  # the checkpoint keeps its own copy
    state = read_state(tmp_path / "ckpt" / "step00000000")
    copied = tmp_path / "ckpt" / "step00000000" / "tokenizer" / "tokenizer.json"
    assert state.tokenizer == TokenizerConfig(type="hf", path=str(copied))

    assert cli("convert", "megacpt-to-hf", "--checkpoint", tmp_path / "ckpt", "--output", tmp_path / "back",
               "--no-verify") == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "back")
    assert tokenizer.decode(tokenizer("model data")["input_ids"]) == "model data"
    eod = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == eod


def test_a_conversion_that_changes_the_logits_fails_verification(tmp_path, capsys, monkeypatch, hf_dir):
    from megacpt.model import hf_mapping

    original = hf_mapping.hf_to_megatron

    def off_by_a_little(*args):
        state = original(*args)
        state["decoder.final_layernorm.bias"] = state["decoder.final_layernorm.bias"] + 1e-2
        return state

    monkeypatch.setattr(hf_mapping, "hf_to_megatron", off_by_a_little)
    assert cli("convert", "hf-to-megacpt", "--hf", hf_dir, "--output", tmp_path / "ckpt") == 1
    err = capsys.readouterr().err
    assert "verification failed" in err and "max |logit difference|" in err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ training on converted weights


@pytest.fixture(scope="module")
def trained(tmp_path_factory, converted) -> Path:
    """A new stage of 4 steps with ZeRO 1 on the converted weights."""
    folder = tmp_path_factory.mktemp("train")
    data = write_indexed(folder / "a", pattern_documents(11, 3, 60, 100, vocab=200))
    config = tiny_config(folder / "run", [{"name": "a", "prefix": data}],
                         model={"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 256,
                                "seq_length": 64, "vocab_size": 200},
                         schedule={"style": "constant", "max_lr": 1e-4, "min_lr": 0.0, "warmup": 0},
                         train={"steps": 4, "global_batch_size": 2, "micro_batch_size": 1},
                         init={"checkpoint": str(converted)},
                         deepspeed={"zero_optimization": {"stage": 1}})
    assert cli("train", write_config(folder / "c.json", config)) == 0
    return folder / "run"


def test_converted_checkpoint_trains_as_the_next_stage(trained, converted):
    start = [r for r in read_metrics(trained) if r.get("event") == "stage_start"][0]
    assert start["stage"] == 1
    before = checkpoint_io.load(converted).weights
    after = checkpoint_io.load(trained / "checkpoints").weights
    moved = max((after[n] - before[n]).abs().max().item() for n in before)
    assert 0 < moved < 2e-3  # four Adam steps of lr 1e-4 from the converted weights, not from a fresh init


def test_seen_only_replay_from_a_converted_model_says_no_stage_trained_on_the_source(tmp_path, capsys, converted):
    """An imported stage has no data megacpt could replay: the intended message, not a KeyError."""
    new, old = (write_indexed(tmp_path / name, pattern_documents(11, k, 20, 100, vocab=200))
                for k, name in ((3, "a"), (5, "b")))
    config = tiny_config(tmp_path / "run", [{"name": "a", "prefix": new}],
                         model={"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 256,
                                "seq_length": 64, "vocab_size": 200},
                         data={"replay": {"fraction": 0.5, "seen_only": True,
                                          "sources": [{"name": "old", "prefix": old}]}},
                         train={"steps": 3, "global_batch_size": 2, "micro_batch_size": 1},
                         init={"checkpoint": str(converted)})
    assert cli("train", write_config(tmp_path / "c.json", config)) == 2
    err = capsys.readouterr().err
    assert "data.replay.seen_only: no earlier stage in the checkpoint's stage history trained on 'old'" in err
    assert "Traceback" not in err and not (tmp_path / "run" / "checkpoints").exists()


def test_zero1_checkpoint_converts_to_hf_and_back(tmp_path, capsys, trained):
    assert cli("convert", "megacpt-to-hf", "--checkpoint", trained / "checkpoints", "--output", tmp_path / "hf") == 0
    assert "max |logit difference|" in capsys.readouterr().out  # verified against the megacpt model
    assert cli("convert", "hf-to-megacpt", "--hf", tmp_path / "hf", "--output", tmp_path / "again") == 0

    original = checkpoint_io.load(trained / "checkpoints").weights
    again = checkpoint_io.load(tmp_path / "again").weights
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        # Hugging Face holds no padding rows: the real rows come back, the padding comes back as zeros.
        assert torch.equal(again[name][:200], original[name][:200]) and not again[name][200:].any()
        original[name], again[name] = original[name][:200], again[name][:200]
    assert_same_tensors(again, original)


# ------------------------------------------------------------------------------------ generation and resharding


def test_greedy_generation_matches_hugging_face(capsys, converted, hf_reference):
    assert generated_ids(capsys, converted) == hf_reference


def test_reshard_2_to_1_keeps_every_tensor_and_the_generation(tmp_path, capsys, hf_dir, converted, hf_reference):
    assert cli("convert", "hf-to-megacpt", "--hf", hf_dir, "--output", tmp_path / "tp2", "--tp", 2) == 0
    assert cli("reshard", "--checkpoint", tmp_path / "tp2", "--tp", 1, "--output", tmp_path / "tp1") == 0
    resharded = checkpoint_io.load(tmp_path / "tp1")
    assert resharded.tensor_parallel == 1 and resharded.state.has_optimizer is False
    assert_same_tensors(resharded.weights, checkpoint_io.load(converted).weights)
    capsys.readouterr()
    assert generated_ids(capsys, tmp_path / "tp1") == hf_reference


def test_reshard_repads_the_vocabulary(tmp_path, converted):
    assert cli("reshard", "--checkpoint", converted, "--tp", 4, "--output", tmp_path / "tp4") == 0
    tp4 = checkpoint_io.load(tmp_path / "tp4")
    assert tp4.state.model.padded_vocab_size == 512 == tp4.padded_vocab_size
    assert cli("reshard", "--checkpoint", tmp_path / "tp4", "--tp", 1, "--output", tmp_path / "tp1") == 0
    assert_same_tensors(checkpoint_io.load(tmp_path / "tp1").weights, checkpoint_io.load(converted).weights)


@pytest.mark.launcher
def test_greedy_generation_at_tp2_under_the_launcher_matches_hugging_face(tmp_path, hf_dir, hf_reference):
    assert cli("convert", "hf-to-megacpt", "--hf", hf_dir, "--output", tmp_path / "tp2", "--tp", 2) == 0
    result = deepspeed_launch(2, ["megacpt", "generate", "--checkpoint", str(tmp_path / "tp2"),
                                  "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW_TOKENS)])
    assert_ok(result)
    lines = [line for line in result.stdout.splitlines() if line.startswith("[") and line.endswith("]")]
    assert json.loads(lines[-1]) == hf_reference


def test_generate_prints_the_text_when_the_checkpoint_has_a_tokenizer(tmp_path, capsys, hf_tokenizer_json):
    from megacpt.data.tokenizers import HFTokenizer

    tokenizer = HFTokenizer(hf_tokenizer_json)
    source = save_hf(tmp_path / "hf", seed=2, vocab_size=tokenizer.vocab_size)
    shutil.copy(hf_tokenizer_json, source / "tokenizer.json")
    assert cli("convert", "hf-to-megacpt", "--hf", source, "--output", tmp_path / "ckpt", "--no-verify") == 0
    capsys.readouterr()
    assert cli("generate", "--checkpoint", tmp_path / "ckpt", "--prompt", "the model", "--max-new-tokens", 5) == 0
    text, ids = capsys.readouterr().out.strip().splitlines()[-2:]
    new = json.loads(ids)
    assert len(new) == 5 and text == tokenizer.decode(tokenizer.encode("the model") + new)


# ------------------------------------------------------------------------------------ merging


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, converted) -> tuple[Path, Path]:
    """The converted model (TP 1) and another random model of the same architecture (TP 2)."""
    folder = tmp_path_factory.mktemp("merge")
    other = save_hf(folder / "hf_b", seed=3)
    assert cli("convert", "hf-to-megacpt", "--hf", other, "--output", folder / "b", "--tp", 2, "--no-verify") == 0
    return converted, folder / "b"


def test_merge_with_weights_1_0_is_model_a(tmp_path, two_models):
    a, b = two_models
    assert cli("merge", "--checkpoints", a, b, "--weights", 1, 0, "--output", tmp_path / "m") == 0
    merged = checkpoint_io.load(tmp_path / "m")
    assert merged.tensor_parallel == 1 and merged.state.merge[1].weight == 0
    assert_same_tensors(merged.weights, checkpoint_io.load(a).weights)


def test_merge_with_weights_half_half_is_the_mean(tmp_path, two_models):
    a, b = (checkpoint_io.load(p).weights for p in two_models)
    assert cli("merge", "--checkpoints", *two_models, "--weights", 0.5, 0.5, "--output", tmp_path / "m") == 0
    assert_same_tensors(checkpoint_io.load(tmp_path / "m").weights, {n: (a[n] + b[n]) / 2 for n in a})


# ------------------------------------------------------------------------------------ bad input


def fails_cleanly(capsys, tmp_path: Path, *args) -> str:
    """Exit code 2, a message without a traceback, and nothing left at --output or beside it."""
    before = set(tmp_path.iterdir())
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert set(tmp_path.iterdir()) == before
    return err


def test_a_non_gpt_neox_config_is_refused(tmp_path, capsys, hf_dir):
    source = tmp_path / "llama"
    shutil.copytree(hf_dir, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    err = fails_cleanly(capsys, tmp_path, "convert", "hf-to-megacpt", "--hf", source, "--output", tmp_path / "out")
    assert "llama" in err and "gpt_neox" in err


def test_missing_weight_files_are_refused(tmp_path, capsys, hf_dir):
    source = tmp_path / "config_only"
    source.mkdir()
    shutil.copy(hf_dir / "config.json", source)
    err = fails_cleanly(capsys, tmp_path, "convert", "hf-to-megacpt", "--hf", source, "--output", tmp_path / "out")
    assert str(source) in err


def test_a_folder_without_megacpt_state_is_refused(tmp_path, capsys, hf_dir):
    for command in (["convert", "megacpt-to-hf", "--checkpoint", hf_dir],
                    ["reshard", "--checkpoint", hf_dir, "--tp", 2],
                    ["generate", "--checkpoint", hf_dir, "--prompt-ids", "1", "--max-new-tokens", 1]):
        err = fails_cleanly(capsys, tmp_path, *command,
                            *(["--output", tmp_path / "out"] if command[0] != "generate" else []))
        assert "megacpt_state.json" in err


def test_merging_different_architectures_is_refused(tmp_path, capsys, converted):
    other = save_hf(tmp_path / "hf_wide", seed=4, hidden_size=128)
    assert cli("convert", "hf-to-megacpt", "--hf", other, "--output", tmp_path / "wide", "--no-verify") == 0
    err = fails_cleanly(capsys, tmp_path, "merge", "--checkpoints", converted, tmp_path / "wide",
                        "--weights", 0.5, 0.5, "--output", tmp_path / "m")
    assert "hidden_size 128 vs 64" in err


def test_merge_weights_must_be_one_per_checkpoint_and_sum_to_one(tmp_path, capsys, converted):
    err = fails_cleanly(capsys, tmp_path, "merge", "--checkpoints", converted, converted, "--weights", 0.5, 0.6,
                        "--output", tmp_path / "m")
    assert "sum to 1.1" in err
    err = fails_cleanly(capsys, tmp_path, "merge", "--checkpoints", converted, converted, "--weights", 1, "--output",
                        tmp_path / "m")
    assert "1 weights for 2 checkpoints" in err


def test_an_existing_output_is_kept_unless_overwrite(tmp_path, capsys, converted):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious").write_text("keep me")
    err = fails_cleanly(capsys, tmp_path, "reshard", "--checkpoint", converted, "--tp", 2, "--output", out)
    assert "--overwrite" in err and (out / "precious").read_text() == "keep me"
    assert cli("reshard", "--checkpoint", converted, "--tp", 2, "--output", out, "--overwrite") == 0
    assert checkpoint_io.load(out).tensor_parallel == 2 and not (out / "precious").exists()


def test_generate_refuses_text_without_a_tokenizer_and_ids_outside_the_vocabulary(tmp_path, capsys, converted):
    err = fails_cleanly(capsys, tmp_path, "generate", "--checkpoint", converted, "--prompt", "hi", "--max-new-tokens",
                        4)
    assert "--prompt-ids" in err
    err = fails_cleanly(capsys, tmp_path, "generate", "--checkpoint", converted, "--prompt-ids", "1,200",
                        "--max-new-tokens", 4)
    assert "[200]" in err
