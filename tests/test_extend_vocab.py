"""`megacpt extend-vocab`: a checkpoint grown for an extended tokenizer keeps every old-id logit (fp32, 1e-6),
starts new rows as the mean of the base tokenizer's split, records the stage, exports to Hugging Face, and
refuses a tokenizer that does not extend the checkpoint's (exit 2, nothing written). Tiny random models."""
import json
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece
import torch

from megacpt.checkpoint import manifest
from megacpt.cli import main
from megacpt.config import TokenizerConfig, padded_vocab_size
from megacpt.data.sentencepiece_training import train_sentencepiece
from megacpt.data.vocab_extension import extend_tokenizer
from megacpt.model.hf_mapping import VOCAB_ROWS, hf_to_megatron
from megacpt.policy.stages import VocabExtendedStage, read_state, write_state
from megacpt.weights import checkpoint_io

from datagen import tiny_config, write_config
from hfmodel import random_gpt_neox

NAMES = "alpha beta gamma delta value index count items result total buffer offset config".split()
KEYWORDS = ("def {a}({b}):\n    return {a} + {b}\n", "for {a} in range({b}):\n    print({a})\n",
            "import {a}\n", "class {A}:\n    def __init__(self):\n        self.{a} = {b}\n", "{a} = [{b}, {a}]\n")


def cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def code_corpus(tmp_path_factory, write_jsonl) -> str:
    rng = random.Random(2)

    def snippet():
        a, b = rng.choice(NAMES), rng.choice(NAMES)
        return rng.choice(KEYWORDS).format(a=a, b=b, A=a.title())

    texts = ["".join(snippet() for _ in range(6)) for _ in range(300)]
    return write_jsonl(tmp_path_factory.mktemp("code") / "code.jsonl", texts)


@pytest.fixture(scope="module")
def new_tokenizer(sp_model, code_corpus, tmp_path_factory) -> str:
    """The 300-piece test tokenizer extended by 100 code pieces: 400, padded 512 at TP 1 (was 384)."""
    result = extend_tokenizer(sp_model, [code_corpus], 100, str(tmp_path_factory.mktemp("ext") / "ext"))
    assert result.added == 100
    return result.model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, sp_model) -> dict:
    """TP degree -> a random GPT-NeoX (vocab 300, every parameter perturbed) as a megacpt checkpoint using
    the test tokenizer; made once per degree."""
    from megacpt.weights.convert_command import import_state, model_config_from_hf

    folder = tmp_path_factory.mktemp("ckpt")
    hf = random_gpt_neox(0, vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=256, max_position_embeddings=64, tie_word_embeddings=False)
    model = model_config_from_hf(hf.config.to_dict(), folder)
    made = {}
    for tp in (1, 2):
        weights = hf_to_megatron(hf.state_dict(), model, padded_vocab_size(300, tp))
        state = import_state(folder, model, tp).model_copy(
            update={"tokenizer": TokenizerConfig(type="sentencepiece", model=sp_model)})
        checkpoint_io.write(folder / f"tp{tp}", weights, state, folder / f"tp{tp}")
        made[tp] = folder / f"tp{tp}"
    return made


@torch.no_grad()
def logits(weights: dict, model) -> torch.Tensor:
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    gpt = checkpoint_io.build_model(model, weights, 1, 0, torch.device("cpu"))
    return gpt(ids, torch.arange(48).unsqueeze(0).expand_as(ids), None)[..., :300]


@pytest.mark.parametrize("tp", [1, 2])
def test_grown_checkpoint_keeps_old_logits_and_rows_and_records_the_stage(tmp_path, checkpoints, new_tokenizer,
                                                                          world, tp):
    ckpt = checkpoints[tp]
    assert cli("extend-vocab", "--checkpoint", ckpt, "--tokenizer", new_tokenizer, "--output", tmp_path / "out") == 0
    before, after = checkpoint_io.load(ckpt), checkpoint_io.load(tmp_path / "out")
    assert after.tensor_parallel == tp and after.model.vocab_size == 400 and after.padded_vocab_size == 512
    for name, tensor in before.weights.items():
        grown = after.weights[name]
        if name in VOCAB_ROWS:
            assert torch.equal(grown[:300], tensor[:300]) and torch.count_nonzero(grown[400:]) == 0, name
        else:
            assert torch.equal(grown, tensor), name
    assert (logits(after.weights, after.model) - logits(before.weights, before.model)).abs().max() <= 1e-6

    stage = after.state.stages[-1]
    assert isinstance(stage, VocabExtendedStage) and len(after.state.stages) == len(before.state.stages) + 1
    assert (stage.index, stage.base_vocab_size, stage.vocab_size, stage.init) == (1, 300, 400, "mean")
    assert after.state.has_optimizer is False and after.state.model.padded_vocab_size == 512
    copied = Path(after.state.tokenizer.model)
    assert copied.parent.parent == after.tag_dir and copied.read_bytes() == Path(new_tokenizer).read_bytes()


def test_new_rows_are_the_mean_of_the_base_tokenizers_split(tmp_path, checkpoints, sp_model, new_tokenizer, world):
    ckpt = checkpoints[1]
    assert cli("extend-vocab", "--checkpoint", ckpt, "--tokenizer", new_tokenizer, "--output", tmp_path / "out") == 0
    weights = checkpoint_io.load(tmp_path / "out").weights
    base = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    new = sentencepiece.SentencePieceProcessor(model_file=new_tokenizer)
    checked = 0
    for i in range(300, 400):
        piece = new.id_to_piece(i)
        if piece.startswith("▁") and "▁" not in piece[1:] and len(piece) > 1:
            split = base.encode(piece[1:])  # the base's own encoding of the word, with its "▁" prefix
            for name in VOCAB_ROWS:
                torch.testing.assert_close(weights[name][i], weights[name][split].mean(dim=0), rtol=0, atol=1e-6)
            checked += 1
    assert checked >= 10


def test_random_init_draws_new_rows_and_keeps_old_ones(tmp_path, checkpoints, new_tokenizer):
    ckpt = checkpoints[1]
    assert cli("extend-vocab", "--checkpoint", ckpt, "--tokenizer", new_tokenizer, "--init", "random",
               "--output", tmp_path / "out") == 0
    before, after = checkpoint_io.load(ckpt), checkpoint_io.load(tmp_path / "out")
    for name in VOCAB_ROWS:
        assert torch.equal(after.weights[name][:300], before.weights[name][:300])
        assert abs(after.weights[name][300:400].std().item() - 0.02) < 0.002
    assert after.state.stages[-1].init == "random"


@pytest.mark.parametrize("grown", [False, True])
def test_hf_export_loads_with_auto_classes_and_gives_megacpts_ids_and_logits(tmp_path, checkpoints, sp_model,
                                                                            new_tokenizer, code_corpus, world,
                                                                            capsys, grown):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, tokenizer = checkpoints[1], sp_model
    if grown:
        assert cli("extend-vocab", "--checkpoint", ckpt, "--tokenizer", new_tokenizer, "--output", tmp_path / "g") == 0
        ckpt, tokenizer = tmp_path / "g", new_tokenizer
    assert cli("convert", "megacpt-to-hf", "--checkpoint", ckpt, "--output", tmp_path / "hf-out") == 0
    assert "verified" in capsys.readouterr().out
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf-out")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf-out", dtype=torch.float32).eval()
    processor = sentencepiece.SentencePieceProcessor(model_file=tokenizer)
    texts = [json.loads(line)["text"] for line in open(code_corpus)][:5]
    texts += ["warmup and decay of the café über alles ☃ 中文", "  two  spaces\n\n\tand a tab  "]
    for text in texts:
        assert hf_tokenizer.encode(text, add_special_tokens=False) == processor.encode(text), text
    ids = torch.tensor([processor.encode(texts[0])[:48]])
    assert (ids.max() >= 300) == grown
    source = checkpoint_io.load(ckpt)
    with torch.no_grad():
        gpt = checkpoint_io.build_model(source.model, source.weights, 1, 0, torch.device("cpu"))
        ours = gpt(ids, torch.arange(ids.shape[1]).unsqueeze(0), None)[..., :source.model.vocab_size]
        theirs = hf_model(ids).logits
    assert theirs.shape[-1] == (400 if grown else 300)
    assert (ours - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("case", ["other-tokenizer", "same-tokenizer", "not-a-model", "no-tokenizer"])
def test_a_tokenizer_that_does_not_extend_the_checkpoints_exits_2_and_writes_nothing(
        case, tmp_path, checkpoints, sp_model, code_corpus, capsys):
    ckpt = checkpoints[1]
    tokenizer = tmp_path / "other.model"
    if case == "other-tokenizer":
        train_sentencepiece([code_corpus], 320, str(tmp_path / "other"))
    elif case == "same-tokenizer":
        tokenizer = Path(sp_model)
    elif case == "not-a-model":
        tokenizer.write_text("not a model")
    else:
        ckpt = Path(shutil.copytree(ckpt, tmp_path / "ckpt"))
        tag = checkpoint_io.load(ckpt).tag_dir
        write_state(tag, read_state(tag).model_copy(update={"tokenizer": None}))
        manifest.write_manifest(tag, manifest.describe(tag, manifest.tag_files(tag)))  # edited on purpose
        tokenizer = Path(sp_model)
    capsys.readouterr()
    assert cli("extend-vocab", "--checkpoint", ckpt, "--tokenizer", tokenizer, "--output", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert (str(checkpoint_io.load(ckpt).tag_dir) if case == "no-tokenizer" else str(tokenizer)) in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_new_stage_trains_from_the_grown_checkpoint_with_the_new_tokenizer(tmp_path, checkpoints, new_tokenizer,
                                                                             pattern_data):
    assert cli("extend-vocab", "--checkpoint", checkpoints[1], "--tokenizer", new_tokenizer,
               "--output", tmp_path / "grown") == 0
    model = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 256, "seq_length": 64,
             "vocab_size": 400}
    config = tiny_config(tmp_path / "run", [{"name": "a", "prefix": pattern_data["a"]}], model=model,
                         tokenizer={"type": "sentencepiece", "model": new_tokenizer},
                         init={"checkpoint": str(tmp_path / "grown"), "mode": "new_stage"},
                         train={"steps": 3, "save_interval": 3})
    assert cli("train", write_config(tmp_path / "config.json", config)) == 0
    state = checkpoint_io.load(tmp_path / "run" / "checkpoints").state
    assert [s.origin for s in state.stages] == ["huggingface", "extend-vocab", "megacpt"]
    assert state.stages[-1].index == 2 and state.model.padded_vocab_size == 512
