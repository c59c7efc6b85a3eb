"""Tokenizers: each type's EOD and vocabulary, encode/decode, bad model files, and `megacpt tokenizer train`.

Fast: tiny models trained in the session fixtures (tests/conftest.py); nothing here imports torch.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megacpt.cli import main as cli_main
from megacpt.config import TokenizerConfig
from megacpt.data.tokenizers import build_tokenizer
from megacpt.errors import ConfigError

TEXT = "warmup and decay of the café über alles ☃ 中文"  # the last words are outside the training corpus


def test_byte_tokenizer_is_utf8_bytes_with_eod_256():
    tokenizer = build_tokenizer(TokenizerConfig(type="byte"))
    assert (tokenizer.vocab_size, tokenizer.eod_id) == (257, 256)
    assert tokenizer.encode("é!") == [0xC3, 0xA9, ord("!")]
    assert tokenizer.decode(tokenizer.encode(TEXT) + [tokenizer.eod_id]) == TEXT


def test_sentencepiece_eod_is_the_eos_piece_and_byte_fallback_round_trips_unseen_text(sp_model):
    tokenizer = build_tokenizer(TokenizerConfig(type="sentencepiece", model=sp_model))
    assert tokenizer.vocab_size == 300
    assert tokenizer.eod_id == 1
    ids = tokenizer.encode(TEXT)
    assert 0 not in ids  # byte fallback: no unk
    assert tokenizer.decode(ids) == TEXT
    assert "sentencepiece" in tokenizer.describe() and sp_model in tokenizer.describe()


def test_hf_eod_is_endoftext_and_vocab_counts_added_tokens(hf_tokenizer_json, tmp_path):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(hf_tokenizer_json)
    raw.add_tokens(["<extra_token>"])
    raw.save(str(tmp_path / "tokenizer.json"))
    tokenizer = build_tokenizer(TokenizerConfig(type="hf", path=str(tmp_path / "tokenizer.json")))
    assert tokenizer.eod_id == raw.token_to_id("<|endoftext|>")
    assert tokenizer.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    assert tokenizer.vocab_size == raw.get_vocab_size(with_added_tokens=False) + 1
    assert tokenizer.decode(tokenizer.encode(TEXT)) == TEXT


def test_hf_path_may_be_the_folder_holding_tokenizer_json(hf_tokenizer_json):
    tokenizer = build_tokenizer(TokenizerConfig(type="hf", path=str(Path(hf_tokenizer_json).parent)))
    assert tokenizer.encode(TEXT) == build_tokenizer(TokenizerConfig(type="hf", path=hf_tokenizer_json)).encode(TEXT)


def test_hf_without_endoftext_uses_the_eos_token_of_tokenizer_config(make_hf_tokenizer, tmp_path):
    path = make_hf_tokenizer(tmp_path / "tokenizer.json", ["<unk>", "</s>"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    tokenizer = build_tokenizer(TokenizerConfig(type="hf", path=path))
    assert tokenizer.eod_id == 1


def test_hf_eod_is_the_eos_token_of_tokenizer_config_even_when_endoftext_exists(make_hf_tokenizer, tmp_path):
    """Llama 3 declares <|end_of_text|>, an instruct Qwen2 <|im_end|> next to its <|endoftext|>: the tokenizer's
    own config says which token ends a document."""
    path = make_hf_tokenizer(tmp_path / "tokenizer.json", ["<|endoftext|>", "<|end_of_text|>"])
    assert build_tokenizer(TokenizerConfig(type="hf", path=path)).eod_id == 0
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    assert build_tokenizer(TokenizerConfig(type="hf", path=path)).eod_id == 1


def test_hf_without_any_end_of_document_token_is_an_error(make_hf_tokenizer, tmp_path):
    path = make_hf_tokenizer(tmp_path / "tokenizer.json", ["<unk>"])
    with pytest.raises(ConfigError, match="tokenizer.path.*<\\|endoftext\\|>.*tokenizer_config.json"):
        build_tokenizer(TokenizerConfig(type="hf", path=path))


@pytest.mark.parametrize("kind, key", [("sentencepiece", "model"), ("hf", "path")])
@pytest.mark.parametrize("problem", ["missing", "garbage"])
def test_bad_tokenizer_file_names_the_path_and_the_key(kind, key, problem, tmp_path):
    path = tmp_path / "tok.bin"
    if problem == "garbage":
        path.write_bytes(b"\x00not a model")
    with pytest.raises(ConfigError) as caught:
        build_tokenizer(TokenizerConfig(type=kind, **{key: str(path)}))
    assert caught.value.key == f"tokenizer.{key}"
    assert str(path) in str(caught.value)


def test_tokenizer_train_is_reproducible_and_writes_model_and_vocab(tmp_path, corpus, write_jsonl, capsys):
    corpus_file = write_jsonl(tmp_path / "c.jsonl", corpus)
    for name in ("a", "b"):
        assert cli_main(["tokenizer", "train", "--input", corpus_file, "--vocab-size", "290", "--output",
                         str(tmp_path / name)]) == 0
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert (tmp_path / "a.vocab").read_text().splitlines()[:2] == ["<unk>\t0", "</s>\t0"]
    assert "a.model" in capsys.readouterr().out


CODE = 'class A:\n    def f(self, x):\n        if x:\n            return [1,  2]\n\n        return "a  b"\n\tpass\n'


@pytest.fixture(scope="module")
def code_corpus(tmp_path_factory, write_jsonl) -> str:
    """The source of a few standard-library modules: indented code with blank lines."""
    import json as json_module

    folder = Path(json_module.__file__).parent
    texts = [path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.py"))]
    return write_jsonl(tmp_path_factory.mktemp("code") / "code.jsonl", texts)


def test_keep_whitespace_tokenizer_round_trips_newlines_and_indentation(tmp_path, code_corpus):
    assert cli_main(["tokenizer", "train", "--input", code_corpus, "--vocab-size", "400", "--keep-whitespace",
                     "--output", str(tmp_path / "tok")]) == 0
    tokenizer = build_tokenizer(TokenizerConfig(type="sentencepiece", model=str(tmp_path / "tok.model")))
    ids = tokenizer.encode(CODE)
    assert tokenizer.decode(ids) == CODE
    assert tokenizer.decode(ids + tokenizer.encode(CODE)) == CODE + CODE  # no space invented between documents
    assert len(tokenizer.encode(" " * 8)) <= 2  # runs of spaces are pieces, not a token per space


def test_tokenizer_train_keeps_existing_output_unless_overwrite(tmp_path, corpus, write_jsonl, capsys):
    corpus_file = write_jsonl(tmp_path / "c.jsonl", corpus)
    (tmp_path / "tok.model").write_text("precious")
    args = ["tokenizer", "train", "--input", corpus_file, "--vocab-size", "290", "--output", str(tmp_path / "tok")]
    assert cli_main(args) == 2
    assert "tok.model already exists" in capsys.readouterr().err
    assert (tmp_path / "tok.model").read_text() == "precious"
    assert cli_main(args + ["--overwrite"]) == 0
    assert (tmp_path / "tok.model").read_bytes() != b"precious"


@pytest.mark.parametrize("vocab_size, texts, message", [
    (5000, None, "Vocabulary size too high"),
    (290, [], "no text to train a tokenizer on"),
    (290, ["   ", ""], "no text to train a tokenizer on"),
])
def test_tokenizer_train_bad_input_exits_2_and_writes_nothing(vocab_size, texts, message, tmp_path, corpus, write_jsonl,
                                                              capsys):
    corpus_file = write_jsonl(tmp_path / "c.jsonl", corpus if texts is None else texts)
    assert cli_main(["tokenizer", "train", "--input", corpus_file, "--vocab-size", str(vocab_size), "--output",
                     str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err
    assert message in err and "c.jsonl" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_tokenizer_modules_do_not_import_torch():
    code = "import sys, megacpt.data.tokenizers, megacpt.data.preprocess_command; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_tokenizer_train_reports_a_bad_input_line_not_a_sentencepiece_error(tmp_path, corpus, write_jsonl, capsys):
    corpus_file = write_jsonl(tmp_path / "c.jsonl", corpus)
    with open(corpus_file, "a") as f:
        f.write('{"text": oops}\n')
    assert cli_main(["tokenizer", "train", "--input", corpus_file, "--vocab-size", "290", "--output",
                     str(tmp_path / "tok")]) == 2
    assert f"c.jsonl, line {len(corpus) + 1}: not valid JSON" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]
