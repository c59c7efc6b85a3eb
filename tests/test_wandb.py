"""Weights & Biases logging, offline: the run files W&B writes hold the metrics.jsonl series at their steps.

The local `.wandb` file of an offline run is read back with a few lines of LevelDB-log framing and W&B's own
protobuf `Record` type, so the test checks what `wandb sync` would upload, not what megacpt meant to send.
"""
import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import wandb  # noqa: F401  (the dev install has the wandb extra; a missing package fails here, not as a skip)

from megacpt.cli import main

from datagen import read_metrics, tiny_config, write_config
from launch import clean_env, wait_for_step


def wandb_records(path: Path):
    """The protobuf records of one `run-ID.wandb` file (LevelDB log format behind a 7-byte W&B header)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # full record, last fragment
            yield wandb_internal_pb2.Record.FromString(pending + chunk)
            pending = b""
        else:  # first and middle fragments
            pending += chunk


def complete_records(path: Path, timeout: float = 60.0) -> list:
    """The records of a run file once W&B's service has written its `exit` record (it flushes asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def offline_runs(run_dir: Path) -> list[dict]:
    """Each offline W&B run under RUN_DIR (oldest first): its id, group, tags, config and history rows."""
    runs = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        run = {"history": [], "config": {}}
        for record in complete_records(next(folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(id=record.run.run_id, group=record.run.run_group, tags=list(record.run.tags))
                run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                run["history"].append({k: v for k, v in row.items() if not k.startswith("_")})
        runs.append(run)
    return runs


def series(run: dict, key: str) -> dict[int, object]:
    return {row["step"]: row[key] for row in run["history"] if key in row}


def _flat(record: dict, prefix: str = "") -> dict[str, object]:
    """A metrics.jsonl record's values by their W&B names (nested keys joined by '/'), without `step`."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}/"))
        elif prefix or key != "step":
            flat[prefix + key] = value
    return flat


def _config(tmp_path, pattern_data, run_dir, **train):
    return tiny_config(tmp_path / run_dir, [{"name": "a", "prefix": pattern_data["a"]}],
                       data={"validation": [{"name": "b_val", "prefix": pattern_data["b"]}]},
                       train={"steps": 4, "eval_interval": 2, "save_interval": 2, **train},
                       logging={"wandb": {"project": "megacpt-test", "mode": "offline", "tags": ["t"]}})


def test_offline_run_holds_every_metrics_series_and_a_resume_continues_it(tmp_path, pattern_data):
    config = _config(tmp_path, pattern_data, "pre", steps=40, eval_interval=10, save_interval=10)
    config = write_config(tmp_path / "c.json", config)
    run_dir = tmp_path / "pre"
    proc = subprocess.Popen([sys.executable, "-m", "megacpt", "train", config], env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)  # the loop saves at the step it is on and exits 0
    assert proc.wait(timeout=300) == 0
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step"))
    assert 3 <= stopped_at < 40
    assert main(["train", config]) == 0  # resumes at stopped_at and trains to the end

    first, resumed = offline_runs(run_dir)
    run_id = (run_dir / "wandb_run_id").read_text()
    assert first["id"] == resumed["id"] == run_id
    assert first["group"] == "pre" and set(first["tags"]) == {"t", "stage0"}
    assert first["config"]["stage_index"] == 0 and first["config"]["stages"][0]["name"] == "pre"
    assert first["config"]["config"]["train"]["steps"] == 40

    records = read_metrics(run_dir)
    logged = {**series(first, "loss"), **series(resumed, "loss")}
    assert sorted(logged) == list(range(1, 41))
    assert sorted(series(resumed, "loss")) == list(range(stopped_at + 1, 41))  # appended, not started over
    assert {**series(first, "samples/a"), **series(resumed, "samples/a")} == {s: 4 * s for s in range(1, 41)}
    # Every series metrics.jsonl holds (nested keys joined by '/'), at every step it has them, is in W&B: the
    # steps the resumed run trained again replace the first run's (metrics.jsonl dropped those records).
    expected: dict[str, dict[int, object]] = {}
    for record in records:
        for key, value in _flat(record).items():
            expected.setdefault(key, {})[record["step"]] = value
    assert {"lr", "grad_norm", "tokens", "tokens_per_s", "skipped_steps", "eval_tokens/b_val"} <= set(expected)
    for key, values in expected.items():
        assert {**series(first, key), **series(resumed, key)} == values, key
    checkpoints = {**series(first, "checkpoint"), **series(resumed, "checkpoint")}
    saved = sorted({10, 20, 30, 40, stopped_at})
    assert checkpoints == {s: str(run_dir / "checkpoints" / f"step{s:08d}") for s in saved}


def test_a_new_stage_is_a_new_run_in_the_chains_group(tmp_path, pattern_data):
    assert main(["train", write_config(tmp_path / "c0.json", _config(tmp_path, pattern_data, "pre", steps=3))]) == 0
    stage1 = _config(tmp_path, pattern_data, "cpt", steps=3)
    stage1["init"] = {"checkpoint": str(tmp_path / "pre" / "checkpoints")}
    assert main(["train", write_config(tmp_path / "c1.json", stage1)]) == 0

    (pre,), (cpt,) = offline_runs(tmp_path / "pre"), offline_runs(tmp_path / "cpt")
    assert cpt["id"] != pre["id"]
    assert cpt["group"] == pre["group"] == "pre"  # the first stage's name
    assert "stage1" in cpt["tags"] and cpt["config"]["stage_index"] == 1
    assert [s["name"] for s in cpt["config"]["stages"]] == ["pre", "cpt"]


def test_online_without_a_login_is_refused_before_anything_is_written(tmp_path, pattern_data, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    config = _config(tmp_path, pattern_data, "run")
    config["logging"]["wandb"]["mode"] = "online"
    assert main(["train", write_config(tmp_path / "c.json", config)]) == 2
    err = capsys.readouterr().err
    assert "logging.wandb.mode" in err and "WANDB_API_KEY" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_missing_wandb_package_is_a_config_error(tmp_path, pattern_data, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # `import wandb` now raises ImportError
    assert main(["train", write_config(tmp_path / "c.json", _config(tmp_path, pattern_data, "run"))]) == 2
    err = capsys.readouterr().err
    assert "logging.wandb" in err and "pip install 'megacpt[wandb]'" in err
    assert not (tmp_path / "run").exists()
