"""Preprocessing: megatron-core's own IndexedDataset reads back exactly the tokenizer's tokens of every document
(+ EOD), for each tokenizer type and worker count; compressed and text inputs; bad input exits 2 and leaves
no output behind. The tokenizers are the tiny session fixtures of tests/conftest.py.
"""
import gzip
import io
import json

import numpy as np
import pytest

from megacpt.cli import main as cli_main
from megacpt.data import preprocess_command as preprocess_module
from megacpt.data.preprocess_command import preprocess, tokenizer_config
from megacpt.data.tokenizers import build_tokenizer


def read_back(prefix: str) -> tuple[list[list[int]], type]:
    """Each document's tokens as megatron-core reads them, and the file's dtype."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    assert list(dataset.document_indices) == list(range(len(dataset) + 1))  # one sequence per document
    return [dataset[i].tolist() for i in range(len(dataset))], dataset.index.dtype


@pytest.fixture
def tokenizer_flags(sp_model, hf_tokenizer_json):
    """kind -> (CLI flags, TokenizerConfig) for the three tokenizer types."""
    models = {"sentencepiece": sp_model, "hf": hf_tokenizer_json, "byte": None}

    def flags(kind: str):
        model = models[kind]
        flags = ["--tokenizer-type", kind] + (["--tokenizer-model", model] if model else [])
        return flags, tokenizer_config(kind, model)

    return flags


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind", ["sentencepiece", "hf", "byte"])
def test_indexed_dataset_holds_each_documents_tokens_then_eod_in_input_order(kind, workers, tokenizer_flags, corpus,
                                                                             write_jsonl, tmp_path, capsys):
    documents = corpus[:150] + ["a document\nover two lines ☃ 中文"]  # more than two chunks: the order is tested
    flags, config = tokenizer_flags(kind)
    prefix = str(tmp_path / "out")
    args = ["preprocess", "--input", write_jsonl(tmp_path / "in.jsonl", documents), *flags,
            "--output-prefix", prefix, "--workers", str(workers), "--append-eod"]
    assert cli_main(args) == 0
    tokenizer = build_tokenizer(config)
    tokens, dtype = read_back(prefix)
    assert tokens == [tokenizer.encode(text) + [tokenizer.eod_id] for text in documents]
    assert dtype == np.uint16
    summary = capsys.readouterr().out
    assert f"wrote {len(documents)} documents, {sum(map(len, tokens)):,} tokens" in summary and "out.idx" in summary


def test_txt_gz_and_zst_inputs_are_read_in_the_order_given(tmp_path, corpus):
    import zstandard

    def jsonl(texts) -> bytes:
        return "".join(json.dumps({"body": text}) + "\n" for text in texts).encode()

    (tmp_path / "a.txt").write_text("a text file\n\nis one document\n", encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write(jsonl(corpus[:10]))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(corpus[10:20])))
    prefix = str(tmp_path / "out")
    inputs = [str(tmp_path / name) for name in ("a.txt", "b.jsonl.gz", "c.jsonl.zst")]
    assert cli_main(["preprocess", "--input", *inputs, "--tokenizer-type", "byte", "--json-key", "body",
                     "--output-prefix", prefix]) == 0
    expected = ["a text file\n\nis one document\n"] + corpus[:20]
    assert read_back(prefix)[0] == [list(text.encode()) for text in expected]  # no --append-eod: no EOD


def test_documents_without_tokens_are_skipped_and_counted(tmp_path, write_jsonl, capsys):
    prefix = str(tmp_path / "out")
    args = ["preprocess", "--input", write_jsonl(tmp_path / "in.jsonl", ["ab", "", "c"]), "--tokenizer-type", "byte",
            "--output-prefix", prefix, "--append-eod"]
    assert cli_main(args) == 0
    assert read_back(prefix)[0] == [[97, 98, 256], [99, 256]]
    assert "skipped 1 empty documents" in capsys.readouterr().out


def test_vocabulary_of_65500_or_more_is_written_as_int32(tmp_path, write_jsonl):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1} | {f"w{i}": i + 2 for i in range(65_600)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    prefix = str(tmp_path / "out")
    args = ["preprocess", "--input", write_jsonl(tmp_path / "in.jsonl", ["w65599 w0", "w70000"]),
            "--tokenizer-type", "hf", "--tokenizer-model", str(tmp_path / "tokenizer.json"), "--output-prefix", prefix,
            "--append-eod"]
    assert cli_main(args) == 0
    assert read_back(prefix) == ([[65_601, 2, 0], [1, 0]], np.int32)


def test_parquet_rows_are_documents_in_order_from_the_named_column(tmp_path, write_jsonl, capsys):
    """A FineWeb-style Parquet file (text column by name, several row groups, a null row) gives the same dataset
    as the jsonl of its texts; a missing column exits 2 naming it and the columns there are."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["first doc", None, "zweites Dokument", "third", "über"]
    pq.write_table(pa.table({"id": list(range(5)), "text": texts}), tmp_path / "in.parquet", row_group_size=2)
    for name, source in (("parquet", tmp_path / "in.parquet"),
                         ("jsonl", write_jsonl(tmp_path / "in.jsonl", [t for t in texts if t is not None]))):
        assert cli_main(["preprocess", "--input", str(source), "--tokenizer-type", "byte", "--output-prefix",
                         str(tmp_path / name), "--append-eod"]) == 0
    assert read_back(str(tmp_path / "parquet")) == read_back(str(tmp_path / "jsonl"))
    assert len(read_back(str(tmp_path / "parquet"))[0]) == 4
    capsys.readouterr()
    assert cli_main(["preprocess", "--input", str(tmp_path / "in.parquet"), "--tokenizer-type", "byte",
                     "--output-prefix", str(tmp_path / "bad"), "--json-key", "content"]) == 2
    assert "no column 'content' (its columns: id, text)" in capsys.readouterr().err
    assert not list(tmp_path.glob("bad*"))


def test_progress_reports_documents_tokens_and_rate(tmp_path, write_jsonl, monkeypatch):
    monkeypatch.setattr(preprocess_module, "PROGRESS_SECONDS", 0.0)
    log = io.StringIO()
    result = preprocess([write_jsonl(tmp_path / "in.jsonl", ["abc", "de"])], tokenizer_config("byte", None),
                        str(tmp_path / "out"), log=log)
    assert (result.documents, result.tokens) == (2, 5)
    lines = log.getvalue().splitlines()
    assert "byte: vocab 257, EOD 256" in lines[0]
    assert lines[-1].startswith("preprocess: 2 documents, 5 tokens, ") and lines[-1].endswith(" tokens/s")


BAD_INPUTS = {
    "invalid_json": ("in.jsonl", b'{"text": "fine"}\n' * 200 + b'{"text": "cut\n',
                     "in.jsonl, line 201: not valid JSON"),
    "missing_key": ("in.jsonl", b'{"text": "a"}\n{"content": '
                                b'"b"}\n', "in.jsonl, line 2: no key 'text' (its keys: 'content')"),
    "not_a_string": ("in.jsonl", b'{"text": ["a"]}\n', "in.jsonl, line 1: 'text' holds [\"a\"], expected a string"),
    "bad_utf8_jsonl": ("in.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n', "in.jsonl, line 2: not valid UTF-8"),
    "bad_utf8_txt": ("in.txt", b"fine\n\xc3(\n", "in.txt, line 2: not valid UTF-8"),
    "empty": ("in.jsonl", b"\n\n", "no documents in"),
    "not_gzip": ("in.jsonl.gz", b"not gzip at all", "cannot read input file"),
    "corrupt_gzip": ("in.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 100)[:10] + b"\xff" * 40,
                     "cannot read input file"),
    "corrupt_zst": ("in.jsonl.zst", b"\x28\xb5\x2f\xfd" + b"\xff" * 40, "cannot read input file"),
    "unknown_suffix": ("in.csv", b"text\n", "unsupported name"),
}


# The reader runs in the parent either way; with workers its errors must still surface in order, mid-stream.
@pytest.mark.parametrize("case, workers", [(case, 1) for case in BAD_INPUTS] + [("invalid_json", 2), ("empty", 2)])
def test_bad_input_exits_2_naming_file_and_line_and_leaves_no_output(case, workers, tmp_path, capsys):
    name, content, message = BAD_INPUTS[case]
    (tmp_path / name).write_bytes(content)
    args = ["preprocess", "--input", str(tmp_path / name), "--tokenizer-type", "byte", "--output-prefix",
            str(tmp_path / "out"), "--workers", str(workers)]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert message in err and str(tmp_path / name) in err
    assert [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("flags, message", [
    (["--input", "{tmp}/missing.jsonl", "--tokenizer-type", "byte"], "input file {tmp}/missing.jsonl does not exist"),
    (["--input", "{tmp}/in.jsonl", "--tokenizer-type", "sentencepiece"],
     "--tokenizer-type sentencepiece needs --tokenizer-model"),
    (["--input", "{tmp}/in.jsonl", "--tokenizer-type", "byte", "--tokenizer-model", "x"],
     "byte needs no --tokenizer-model"),
    (["--input", "{tmp}/in.jsonl", "--tokenizer-type", "sentencepiece", "--tokenizer-model", "{tmp}/nope.model"],
     "'tokenizer.model': tokenizer file {tmp}/nope.model does not exist"),
    (["--input", "{tmp}/in.jsonl", "--tokenizer-type", "hf", "--tokenizer-model", "{tmp}/in.jsonl"],
     "'tokenizer.path': cannot load Hugging Face tokenizer {tmp}/in.jsonl"),
])
def test_bad_arguments_exit_2_before_any_output(flags, message, tmp_path, write_jsonl, capsys):
    write_jsonl(tmp_path / "in.jsonl", ["a"])
    args = ["preprocess", *(flag.format(tmp=tmp_path) for flag in flags), "--output-prefix", str(tmp_path / "out")]
    assert cli_main(args) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_existing_output_is_kept_unless_overwrite(suffix, tmp_path, write_jsonl, capsys):
    existing = tmp_path / f"out{suffix}"
    existing.write_text("precious")
    args = ["preprocess", "--input", write_jsonl(tmp_path / "in.jsonl", ["a"]), "--tokenizer-type", "byte",
            "--output-prefix", str(tmp_path / "out")]
    assert cli_main(args) == 2
    assert f"output {existing} already exists; choose another path or pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", existing.name]
    assert existing.read_text() == "precious"
    assert cli_main(args + ["--overwrite"]) == 0
    assert read_back(str(tmp_path / "out"))[0] == [[97]]
