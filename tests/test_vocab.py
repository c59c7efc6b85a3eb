"""Vocabulary extension: `megacpt tokenizer extend` of SentencePiece models and of BPE tokenizer.json files
(old ids untouched, appended pieces reachable, tokens per byte) and bad input (exit 2 naming the file, nothing
written). Fast: tiny tokenizers, no torch."""
import json
import random

import pytest
import sentencepiece
from sentencepiece import sentencepiece_model_pb2

from megacpt.cli import main as cli_main
from megacpt.data.vocab_extension import extend_tokenizer

CODE = ("def f(x):\n    return x + 1\n", "for i in range(10):\n    print(i)\n", "import os\nimport sys\n",
        "class A:\n    def __init__(self):\n        self.x = 0\n")


@pytest.fixture(scope="module")
def code_corpus(tmp_path_factory, write_jsonl) -> str:
    rng = random.Random(1)
    texts = ["".join(rng.choice(CODE) for _ in range(5)) for _ in range(200)]
    return write_jsonl(tmp_path_factory.mktemp("code") / "code.jsonl", texts)


@pytest.fixture(scope="module")
def extended(sp_model, code_corpus, tmp_path_factory):
    return extend_tokenizer(sp_model, [code_corpus], 40, str(tmp_path_factory.mktemp("ext") / "ext"))


def proto(path) -> sentencepiece_model_pb2.ModelProto:
    return sentencepiece_model_pb2.ModelProto.FromString(open(path, "rb").read())


def test_extension_keeps_every_base_id_and_appends_new_pieces_scored_below_the_base(sp_model, extended):
    base, ext = proto(sp_model), proto(extended.model)
    added = extended.added  # at most 40: a piece that needs a new character too may not fit in the last place
    assert extended.base_size == 300 and 35 <= added <= 40 and len(ext.pieces) == 300 + added
    for old, new in zip(base.pieces, ext.pieces):
        assert (old.piece, old.score, old.type) == (new.piece, new.score, new.type)
    appended = ext.pieces[300:]
    base_pieces = {p.piece for p in base.pieces}
    assert len({p.piece for p in appended}) == added and not base_pieces & {p.piece for p in appended}
    scores = [p.score for p in appended]
    assert max(scores) < min(p.score for p in base.pieces)
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == added


def test_every_appended_piece_joins_two_symbols_that_exist_before_it(sp_model, extended):
    """SentencePiece's BPE encoder only forms a piece by joining two symbols it can already form; Hugging Face's
    BPE needs both to be pieces."""
    known = {p.piece for p in proto(sp_model).pieces}
    for piece in [p.piece for p in proto(extended.model).pieces[300:]]:
        assert len(piece) == 1 or any(piece[:k] in known and piece[k:] in known for k in range(1, len(piece))), piece
        known.add(piece)


def test_extended_tokenizer_encodes_code_in_fewer_tokens_and_decodes_the_same(sp_model, extended, code_corpus):
    base = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    ext = sentencepiece.SentencePieceProcessor(model_file=extended.model)
    texts = [json.loads(line)["text"] for line in open(code_corpus)]
    size = sum(len(t.encode()) for t in texts)
    assert extended.tokens_per_byte_before == pytest.approx(sum(len(base.encode(t)) for t in texts) / size)
    assert extended.tokens_per_byte_after == pytest.approx(sum(len(ext.encode(t)) for t in texts) / size)
    assert extended.tokens_per_byte_after < 0.6 * extended.tokens_per_byte_before
    assert max(ext.encode(texts[0])) >= 300  # the new pieces are used
    for text in texts[:20] + ["warmup and decay of the café"]:
        assert ext.decode(ext.encode(text)) == base.decode(base.encode(text))
    prose = "warmup and decay of the model"
    assert ext.encode(prose) == base.encode(prose)  # text the new pieces do not cover encodes as before


def test_extend_command_prints_the_count_and_tokens_per_byte(sp_model, code_corpus, tmp_path, capsys):
    assert cli_main(["tokenizer", "extend", "--base", sp_model, "--input", code_corpus, "--add", "5",
                     "--output", str(tmp_path / "ext")]) == 0
    out = capsys.readouterr().out
    assert "5 pieces added (300 -> 305" in out and "tokens per byte" in out
    assert len((tmp_path / "ext.vocab").read_text(encoding="utf-8").splitlines()) == 305


@pytest.mark.parametrize("case", ["wordlevel-json", "not-a-model", "missing-base", "add-zero", "missing-input",
                                  "exists"])
def test_extend_bad_input_exits_2_naming_the_file_and_writes_nothing(case, sp_model, code_corpus,
                                                                      hf_tokenizer_json, tmp_path, capsys):
    base, inputs, add = sp_model, [code_corpus], "3"
    if case == "wordlevel-json":  # tokenizer.json bases are extended only when they are BPE
        from tokenizers import Tokenizer, models

        base = str(tmp_path / "wordlevel.json")
        Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(base)
    elif case == "not-a-model":
        base = str(tmp_path / "junk.model")
        (tmp_path / "junk.model").write_bytes(b"\xff\x00junk" * 10)
    elif case == "missing-base":
        base = str(tmp_path / "none.model")
    elif case == "add-zero":
        add = "0"
    elif case == "missing-input":
        inputs = [str(tmp_path / "none.jsonl")]
    elif case == "exists":
        (tmp_path / "out.model").write_bytes(b"keep")
    before = sorted(p.name for p in tmp_path.iterdir())
    code = cli_main(["tokenizer", "extend", "--base", base, "--input", *inputs, "--add", add,
                     "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    named = {"wordlevel-json": base, "not-a-model": base, "missing-base": base, "add-zero": "--add 0",
             "missing-input": inputs[0], "exists": str(tmp_path / "out.model")}[case]
    assert named in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "exists":
        assert (tmp_path / "out.model").read_bytes() == b"keep"


# ------------------------------------------------------------------------------------ BPE tokenizer.json


@pytest.fixture(scope="module")
def bpe_base(tmp_path_factory, make_hf_tokenizer) -> str:
    """A byte-level BPE tokenizer.json laid out as Llama 3's: two special tokens added after the BPE vocabulary
    (in added_tokens only), and a tokenizer_config.json naming the eos."""
    from tokenizers import Tokenizer

    folder = tmp_path_factory.mktemp("bpe")
    path = make_hf_tokenizer(folder / "tokenizer.json", [])
    tokenizer = Tokenizer.from_file(path)
    tokenizer.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    tokenizer.save(path)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    return path


def test_bpe_extension_keeps_every_id_and_appends_reachable_tokens(bpe_base, code_corpus, tmp_path, capsys):
    from tokenizers import Tokenizer

    from megacpt.config import TokenizerConfig
    from megacpt.data.bpe_extension import read_bpe, vocabulary
    from megacpt.data.tokenizers import build_tokenizer

    out = tmp_path / "ext" / "tokenizer.json"
    assert cli_main(["tokenizer", "extend", "--base", bpe_base, "--input", code_corpus, "--add", "30",
                     "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    base, extended = read_bpe(bpe_base, "base"), read_bpe(out, "out")
    old, new = vocabulary(base), vocabulary(extended)
    assert all(new[token] == i for token, i in old.items())  # special tokens included
    loaded = Tokenizer.from_file(str(out))  # and as the library reads the file back
    assert all(loaded.token_to_id(token) == i for token, i in new.items())
    appended = sorted((i, t) for t, i in new.items() if t not in old)
    assert [i for i, _ in appended] == list(range(len(old), len(old) + 30))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in extended["model"]["merges"]]
    assert merges[:len(base["model"]["merges"])] == [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
                                                     for m in base["model"]["merges"]]
    made = {token: position for position, (_, token) in enumerate(appended)}
    for position, (_, token) in enumerate(appended):  # the join of two tokens that exist before it
        left, right = merges[len(base["model"]["merges"]) + position]
        assert left + right == token and all(old.get(x) is not None or made.get(x, 1e9) < position
                                             for x in (left, right))
    text = "".join(CODE)
    before = Tokenizer.from_file(bpe_base).encode(text).ids
    after = build_tokenizer(TokenizerConfig(type="hf", path=str(out)))
    assert len(after.encode(text)) < len(before) and after.decode(after.encode(text)) == text
    assert after.eod_id == old["<|end_of_text|>"]  # tokenizer_config.json came along
    assert "30 tokens added" in printed and "tokens per byte" in printed
