"""The training loop in one process: it learns, it logs its records to metrics.jsonl, it refuses bad input."""
import json
from pathlib import Path

import pytest

from megacpt.cli import main

from datagen import read_metrics, tiny_config, write_config
from launch import assert_ok, run_megacpt


def test_training_on_a_repeated_pattern_brings_the_loss_down(tmp_path, pattern_data):
    config = tiny_config(tmp_path / "run", [{"name": "a", "prefix": pattern_data["a"]}],
                         data={"validation": [{"name": "a_val", "prefix": pattern_data["a_val"]}]},
                         train={"steps": 30, "log_interval": 5})
    assert main(["train", write_config(tmp_path / "c.json", config)]) == 0

    records = read_metrics(tmp_path / "run")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    assert train[0]["loss"] > 3.0 and train[-1]["loss"] < 1.5, [r["loss"] for r in train]
    last = train[-1]
    assert set(last) >= {"step", "stage", "lr", "loss", "grad_norm", "tokens", "samples", "tokens_per_s"}
    assert all(r["grad_norm"] > 0 for r in train)
    assert last["tokens"] == 30 * 4 * 64 and last["samples"] == {"a": 30 * 4}
    evals = [r for r in records if "eval" in r]
    assert evals and evals[-1]["step"] == 30 and evals[-1]["eval"]["a_val"] < 1.5
    assert evals[-1]["eval_tokens"] == {"a_val": 64 * 64}  # train.eval_samples' default of 64 sequences of 64
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert resolved["model"]["num_layers"] == 2  # preset expanded
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step00000030"


def _bad(tmp_path, capsys, raw_text: str, *extra) -> str:
    path = tmp_path / "bad.json"
    path.write_text(raw_text)
    assert main(["train", str(path), *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _good(tmp_path, pattern_data) -> dict:
    return tiny_config(tmp_path / "run", [{"name": "a", "prefix": pattern_data["a"]}])


def test_malformed_json_names_the_file_and_line(tmp_path, capsys):
    err = _bad(tmp_path, capsys, '{"run_dir": "x",\n "model": }')
    assert "bad.json" in err and "line 2" in err


def test_unknown_key_suggests_the_right_one(tmp_path, capsys, pattern_data):
    config = _good(tmp_path, pattern_data)
    config["train"]["global_batch"] = 4
    err = _bad(tmp_path, capsys, json.dumps(config))
    assert "train.global_batch" in err and "did you mean 'global_batch_size'" in err


def test_wrong_type_names_the_key(tmp_path, capsys, pattern_data):
    config = _good(tmp_path, pattern_data)
    config["train"]["steps"] = "many"
    err = _bad(tmp_path, capsys, json.dumps(config))
    assert "train.steps" in err and "integer" in err


def test_inconsistent_batch_sizes(tmp_path, capsys, pattern_data):
    config = _good(tmp_path, pattern_data)
    config["train"].update(global_batch_size=6, micro_batch_size=4)
    err = _bad(tmp_path, capsys, json.dumps(config))
    assert "train.global_batch_size" in err and "micro_batch_size" in err


def test_missing_dataset_prefix_names_the_file(tmp_path, capsys, pattern_data):
    config = _good(tmp_path, pattern_data)
    config["data"]["sources"][0]["prefix"] = str(tmp_path / "nowhere" / "data")
    err = _bad(tmp_path, capsys, json.dumps(config))
    assert "data.sources[0]" in err and str(tmp_path / "nowhere" / "data") in err


@pytest.mark.parametrize("model, parallel, words", [
    ({"preset": "tiny", "hidden_size": 66}, {}, ["hidden_size 66", "num_attention_heads 4"]),
    ({"preset": "tiny", "num_attention_heads": 3, "hidden_size": 96}, {"tensor": 2},
     ["num_attention_heads 3", "parallel.tensor 2"]),
])
def test_dimensions_that_do_not_divide(tmp_path, capsys, pattern_data, model, parallel, words):
    config = _good(tmp_path, pattern_data)
    config["model"], config["parallel"] = model, parallel
    err = _bad(tmp_path, capsys, json.dumps(config))
    for word in words:
        assert word in err


def test_set_override_reaches_the_config(tmp_path, capsys, pattern_data):
    path = write_config(tmp_path / "c.json", _good(tmp_path, pattern_data))
    err = _bad(tmp_path, capsys, Path(path).read_text(), "--set", "train.micro_batch_size=3")
    assert "train.global_batch_size" in err


def test_activation_checkpointing_gives_the_same_losses(tmp_path, pattern_data):
    losses = {}
    for recompute in (False, True):
        name = f"recompute_{recompute}"
        config = tiny_config(tmp_path / name, [{"name": "a", "prefix": pattern_data["a"]}],
                             model={"preset": "tiny", "dropout": 0.1},
                             train={"steps": 5, "activation_checkpointing": recompute})
        assert main(["train", write_config(tmp_path / f"{name}.json", config)]) == 0
        losses[recompute] = [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r]
    assert len(losses[True]) == 5
    assert max(abs(a - b) for a, b in zip(losses[False], losses[True])) <= 1e-6, losses


def test_a_run_compiles_nothing(tmp_path, pattern_data):
    """DeepSpeed JIT-builds ops into TORCH_EXTENSIONS_DIR under a lock; a CPU run must start without any build."""
    extensions = tmp_path / "torch_extensions"
    config = tiny_config(tmp_path / "run", [{"name": "a", "prefix": pattern_data["a"]}], train={"steps": 3})
    result = run_megacpt(["train", write_config(tmp_path / "c.json", config)],
                         extra_env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert_ok(result)
    assert not extensions.exists(), sorted(p.name for p in extensions.rglob("*"))
