"""The sample ledger (logging.sample_ledger -> RUN_DIR/samples.jsonl) and `megacpt data show`."""
import json
import os
import signal
import subprocess
import sys
from collections import Counter

import pytest

from megacpt.cli import main
from megacpt.data.datasets import SourceStream

from datagen import random_documents, read_metrics, tiny_config, train_recording, write_config, write_indexed
from launch import assert_ok, clean_env, deepspeed_launch, run_megacpt, wait_for_step

STEPS, BATCH = 16, 8


def _config(tmp_path, name, pattern_data, **train) -> dict:
    """A scheduled mix of two new sources and a replay source, the ledger on."""
    return tiny_config(tmp_path / name, [{"name": "a", "prefix": pattern_data["a"], "weight": [[0, 3.0], [1.0, 1.0]]},
                                         {"name": "noise", "prefix": pattern_data["noise"]}],
                       data={"replay": {"fraction": [[0, 0.5], [0.5, 0.125]],
                                        "sources": [{"name": "b", "prefix": pattern_data["b"]}]}},
                       logging={"sample_ledger": True},
                       train={"steps": STEPS, "global_batch_size": BATCH, "micro_batch_size": 2, "log_interval": 1,
                              "save_interval": 4, **train})


def _ledger(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, pattern_data):
    tmp_path = tmp_path_factory.mktemp("straight")
    assert_ok(run_megacpt(["train", write_config(tmp_path / "c.json", _config(tmp_path, "run", pattern_data))]))
    return tmp_path / "run"


def test_the_ledger_has_one_line_per_step_with_the_global_batch_at_the_scheduled_mix(uninterrupted):
    lines = _ledger(uninterrupted)
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    before = Counter()
    for line, record in zip(lines, [r for r in read_metrics(uninterrupted) if "loss" in r]):
        per_source = {name: len(ids) for name, ids in line["samples"].items()}
        assert sum(per_source.values()) == BATCH
        assert Counter(record["samples"]) - before == Counter(per_source)  # the counts metrics.jsonl logs
        before = Counter(record["samples"])
    for name in ("a", "noise", "b"):  # each source's ids run through its stream in order, none twice
        ids = [i for line in lines for i in line["samples"].get(name, [])]
        assert ids == list(range(len(ids))), name


def test_the_ledger_is_identical_after_kill_9_and_resume(tmp_path, pattern_data, uninterrupted):
    cfg = write_config(tmp_path / "c.json", _config(tmp_path, "run", pattern_data))
    proc = subprocess.Popen([sys.executable, "-m", "megacpt", "train", cfg], env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    killed_at = wait_for_step(tmp_path / "run", 6, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed_at < STEPS and len(_ledger(tmp_path / "run")) >= 6  # lines past the step-4 checkpoint
    assert_ok(run_megacpt(["train", cfg]))
    assert (tmp_path / "run" / "samples.jsonl").read_bytes() == (uninterrupted / "samples.jsonl").read_bytes()


# A rank of `deepspeed ... RECORD_ROWS CONFIG OUT`: `megacpt train CONFIG`, and the token rows of every micro-batch
# this rank fed its model, in order, to OUT.RANK.json.
RECORD_ROWS = """
import json, os, sys
from megacpt.cli import main
from megacpt.train import loop

rows, real = [], loop.micro_batch_loss

def recording(model, mb):
    rows.extend(mb["tokens"].tolist())
    return real(model, mb)

loop.micro_batch_loss = recording
code = main(["train", sys.argv[-2]])  # after the launcher's --local_rank
json.dump(rows, open(f"{sys.argv[-1]}.{os.environ['RANK']}.json", "w"))
sys.exit(code)
"""


@pytest.mark.launcher
def test_two_data_parallel_ranks_write_the_ledger_of_the_rows_they_trained_on(tmp_path, pattern_data, uninterrupted):
    """Data-parallel 2: each step's ledger line names exactly the token rows the two ranks fed their models
    (each rank 2 micro-batches of 2), and the ledger equals one process's."""
    config = write_config(tmp_path / "c.json", _config(tmp_path, "dp2", pattern_data))
    (tmp_path / "record_rows.py").write_text(RECORD_ROWS)
    assert_ok(deepspeed_launch(2, [str(tmp_path / "record_rows.py"), config, str(tmp_path / "rows")], module=False))
    assert (tmp_path / "dp2" / "samples.jsonl").read_bytes() == (uninterrupted / "samples.jsonl").read_bytes()
    per_rank = [json.loads((tmp_path / f"rows.{rank}.json").read_text()) for rank in (0, 1)]
    share = BATCH // 2  # rows per rank and step
    assert [len(rows) for rows in per_rank] == [STEPS * share] * 2
    cache = str(tmp_path / "cache")
    streams = {name: SourceStream(pattern_data[name], 1, 64, 1234, cache, 256, -1) for name in ("a", "noise", "b")}
    for s, line in enumerate(_ledger(tmp_path / "dp2")):
        named = [tuple(streams[name].sample(i)["tokens"].tolist()) for name, ids in line["samples"].items()
                 for i in ids]
        trained = [tuple(row) for rows in per_rank for row in rows[share * s:share * (s + 1)]]
        assert Counter(named) == Counter(trained), line["step"]


def test_the_ledger_names_what_the_loop_trained_on_across_a_continued_stage(tmp_path, pattern_data, world,
                                                                           monkeypatch):
    """Every step's token rows are exactly the samples its ledger line names, in a stage that continues a
    source (ids go on from the earlier stage's) and replays another seen-only."""
    small = write_indexed(tmp_path / "small", random_documents(3, 10, 100))
    stage0 = tiny_config(tmp_path / "s0", [{"name": "x", "prefix": small}, {"name": "b", "prefix": pattern_data["b"]}],
                         train={"steps": 3})
    assert main(["train", write_config(tmp_path / "s0.json", stage0)]) == 0
    stage1 = tiny_config(tmp_path / "s1", [{"name": "x", "prefix": small}, {"name": "a", "prefix": pattern_data["a"]}],
                         data={"continue_sources": True,
                               "replay": {"fraction": 0.25, "seen_only": True,
                                          "sources": [{"name": "old", "prefix": pattern_data["b"]}]}},
                         init={"checkpoint": str(tmp_path / "s0" / "checkpoints")}, logging={"sample_ledger": True},
                         train={"steps": 5, "global_batch_size": 8, "micro_batch_size": 4})
    rows = train_recording(monkeypatch, write_config(tmp_path / "s1.json", stage1))
    cache = str(tmp_path / "cache")
    streams = {"x": SourceStream(small, 1, 64, 1234, cache, 256, -1), "a": SourceStream(pattern_data["a"], 1, 64, 1234,
                                                                                        cache, 256, -1),
               "old": SourceStream(pattern_data["b"], 1, 64, 1234, cache, 256, -1)}
    lines = _ledger(tmp_path / "s1")
    assert len(lines) == 5 and min(lines[0]["samples"]["x"]) == 6  # stage 0 read x's samples 0..5
    for line, step_rows in zip(lines, [rows[8 * s:8 * s + 8] for s in range(5)]):
        named = [tuple(streams[name].sample(i)["tokens"].tolist()) for name, ids in line["samples"].items()
                 for i in ids]
        assert Counter(named) == Counter(step_rows), line["step"]
    assert {i for line in lines for i in line["samples"]["old"]} <= set(range(6))  # seen by stage 0


def test_data_show_prints_the_text_of_a_steps_samples(tmp_path, write_jsonl, capsys):
    texts = [f"document {i}: the quick brown fox number {i} jumps over the lazy dog " * 3 for i in range(40)]
    prefix = str(tmp_path / "docs")
    assert main(["preprocess", "--input", write_jsonl(tmp_path / "docs.jsonl", texts), "--tokenizer-type", "byte",
                 "--output-prefix", prefix, "--append-eod"]) == 0
    config = tiny_config(tmp_path / "run", [{"name": "docs", "prefix": prefix}], tokenizer={"type": "byte"},
                         model={"preset": "tiny", "vocab_size": 257}, logging={"sample_ledger": True},
                         train={"steps": 3})
    assert main(["train", write_config(tmp_path / "c.json", config)]) == 0
    capsys.readouterr()
    assert main(["data", "show", str(tmp_path / "run"), "--step", "2"]) == 0
    out = capsys.readouterr().out
    ids = _ledger(tmp_path / "run")[1]["samples"]["docs"]
    assert [f"=== step 2, docs, sample {i} (65 tokens)" in out for i in ids] == [True] * len(ids)
    assert "quick brown fox" in out
    assert main(["data", "show", str(tmp_path / "run"), "--step", "2", "--ids"]) == 0
    assert "quick" not in capsys.readouterr().out
    assert main(["data", "show", str(tmp_path / "run"), "--step", "9"]) == 2
    assert "no line for step 9" in capsys.readouterr().err
