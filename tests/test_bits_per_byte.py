"""Bits per byte: `megacpt preprocess` records each document's UTF-8 bytes, validation samples (windows across
documents) count bytes per label token, and the loop's eval records, `megacpt eval` and `megacpt plot --table`
report loss x tokens / (ln 2 x bytes). Tiny data and one short training run."""
import json
import math

import numpy as np
import pytest

from megacpt.cli import main
from megacpt.config import DataConfig, TokenizerConfig
from megacpt.data.datasets import build_validation_datasets, validation_bytes
from megacpt.data.preprocess_command import preprocess

from datagen import read_metrics, tiny_config, write_config, write_indexed

SEQ = 64


def test_preprocess_records_the_utf8_bytes_of_each_written_document(tmp_path, sp_model, write_jsonl):
    texts = ["warmup and decay", "", "café über naïve ☃ 中文", "the model"]  # the empty one is not written
    inputs = write_jsonl(tmp_path / "in.jsonl", texts)
    result = preprocess([inputs], TokenizerConfig(type="sentencepiece", model=sp_model), str(tmp_path / "out"),
                        append_eod=True)
    assert result.documents == 3 and str(tmp_path / "out.bytes.npy") in result.files
    sizes = np.load(tmp_path / "out.bytes.npy")
    assert sizes.dtype == np.int64 and sizes.tolist() == [16, len("café über naïve ☃ 中文".encode()), 9]


@pytest.fixture(scope="module")
def weighted_data(tmp_path_factory):
    """Documents whose tokens all name their document (doc d = [d] * n_d), and bytes per token w_d = d % 5 + 1:
    the bytes of any window are the sum of w over its label tokens, whatever documents it crosses."""
    folder = tmp_path_factory.mktemp("bpb")
    lengths = [30 + (17 * d) % 90 for d in range(60)]
    prefix = write_indexed(folder / "val", [[d] * n for d, n in enumerate(lengths)])
    weights = np.array([d % 5 + 1 for d in range(60)])
    np.save(prefix + ".bytes.npy", np.array(lengths) * weights)
    return {"prefix": prefix, "weights": weights, "folder": folder}


def test_validation_bytes_count_each_label_token_at_its_documents_bytes_per_token(weighted_data, world):
    data = DataConfig(sources=[{"name": "v", "prefix": weighted_data["prefix"]}], allow_validation_overlap=True,
                      validation=[{"name": "v", "prefix": weighted_data["prefix"]}])
    dataset = build_validation_datasets(data, 12, SEQ, str(weighted_data["folder"] / "cache"), 256, None)["v"]
    labels = [np.asarray(dataset[i]["labels"]) for i in range(12)]
    assert sum(len(set(x.tolist())) > 1 for x in labels) >= 3  # windows that cross documents are covered
    tokens, size = validation_bytes(dataset, 12)
    assert tokens == 12 * SEQ
    assert size == pytest.approx(sum(weighted_data["weights"][x].sum() for x in labels), rel=1e-12)


def test_data_without_a_bytes_file_has_no_bits_per_byte(tmp_path, world):
    prefix = write_indexed(tmp_path / "old", [[1] * 100] * 5)
    data = DataConfig(sources=[{"name": "v", "prefix": prefix}], validation=[{"name": "v", "prefix": prefix}],
                      allow_validation_overlap=True)
    assert validation_bytes(build_validation_datasets(data, 2, SEQ, str(tmp_path / "c"), 256, None)["v"], 2) is None


def test_loop_eval_and_plot_report_bits_per_byte(tmp_path, weighted_data, pattern_data, capsys):
    config = tiny_config(tmp_path / "run", [{"name": "a", "prefix": pattern_data["a"]}],
                         data={"validation": [{"name": "w", "prefix": weighted_data["prefix"]},
                                              {"name": "a_val", "prefix": pattern_data["a_val"]}]},
                         train={"steps": 3, "eval_interval": 3, "save_interval": 3, "eval_samples": 4})
    path = write_config(tmp_path / "config.json", config)
    assert main(["train", path]) == 0
    record = [r for r in read_metrics(tmp_path / "run") if "eval" in r][-1]
    assert set(record["eval_bpb"]) == {"w"}  # a_val's data has no bytes file

    # the same 4 samples (train.eval_samples), their bytes from the labels, independently of the code
    from megacpt.data.datasets import build_validation_datasets as build

    data = DataConfig(sources=[{"name": "v", "prefix": weighted_data["prefix"]}], allow_validation_overlap=True,
                      validation=[{"name": "w", "prefix": weighted_data["prefix"]}], cache_dir=str(tmp_path / "c2"))
    dataset = build(data, 4, SEQ, data.cache_dir, 256, None)["w"]
    size = sum(weighted_data["weights"][np.asarray(dataset[i]["labels"])].sum() for i in range(4))
    assert record["eval_bpb"]["w"] == pytest.approx(record["eval"]["w"] * 4 * SEQ / (math.log(2) * size), rel=1e-9)

    out = tmp_path / "eval.json"
    assert main(["eval", path, "--checkpoint", str(tmp_path / "run" / "checkpoints"), "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert results["w"]["bpb"] == pytest.approx(record["eval_bpb"]["w"], rel=1e-6) and "bpb" not in results["a_val"]
    assert "bits/byte" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "run"), "--output", str(tmp_path / "p.png"), "--table"]) == 0
    table = capsys.readouterr().out
    assert "w bits/byte" in table and f"{record['eval_bpb']['w']:.4f}" in table and "a_val bits/byte" not in table
