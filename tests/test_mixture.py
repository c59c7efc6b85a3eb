"""Mixture schedules: a source's weight and replay.fraction as [step, value] points over the stage.

The expected shares are computed here from the documented rule (piecewise linear between the points, constant
outside, an int step a step, a float step a fraction of train.steps), independently of megacpt.data.blend.
"""
import csv
import json
import math

import numpy as np
import pytest

from megacpt.cli import main
from megacpt.config import validate_config
from megacpt.data.datasets import build_blend

from datagen import read_metrics, tiny_config, write_config

STEPS, BATCH = 40, 20


def _linear(points: list[tuple[float, float]], t: float) -> float:
    """Piecewise linear through `points` (in steps), constant outside: written out, not np.interp."""
    if t <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if t <= x1:
            return y0 + (y1 - y0) * (t - x0) / (x1 - x0)
    return points[-1][1]


def _expected_quotas(t: int) -> dict[str, float]:
    """Samples each source is owed in step t of the mix `_scheduled_data` configures."""
    f = _linear([(0, 0.5), (STEPS, 0.1)], t)  # [[0, 0.5], [1.0, 0.1]]: 1.0 is the end of the stage
    w_code = _linear([(10, 1.0), (0.5 * STEPS, 3.0)], t)  # [[10, 1.0], [0.5, 3.0]]
    new = {"code": w_code, "docs": 1.0}
    replay = {"prose": 3.0, "wiki": 1.0}
    quotas = {k: (1 - f) * w / sum(new.values()) * BATCH for k, w in new.items()}
    quotas |= {k: f * w / sum(replay.values()) * BATCH for k, w in replay.items()}
    return quotas


def _scheduled_data(pattern_data) -> dict:
    return {"sources": [{"name": "code", "prefix": pattern_data["a"], "weight": [[10, 1.0], [0.5, 3.0]]},
                        {"name": "docs", "prefix": pattern_data["c"]}],
            "replay": {"fraction": [[0, 0.5], [1.0, 0.1]],
                       "sources": [{"name": "prose", "prefix": pattern_data["b"], "weight": 3.0},
                                   {"name": "wiki", "prefix": pattern_data["noise"], "weight": 1.0}]}}


def _scheduled_config(tmp_path, pattern_data, **train) -> dict:
    return tiny_config(tmp_path / "run", [], data=_scheduled_data(pattern_data),
                       train={"steps": STEPS, "global_batch_size": BATCH, "micro_batch_size": 10, **train})


def _within_one(count: int, quota: float) -> bool:
    return math.floor(quota + 1e-9) <= count <= math.ceil(quota - 1e-9)


def test_every_batch_holds_its_steps_scheduled_share_of_each_source_and_group(tmp_path, pattern_data):
    data = validate_config(_scheduled_config(tmp_path, pattern_data)).data
    blend, names = build_blend(data, STEPS, BATCH, STEPS * BATCH)
    assert names == ["code", "docs", "prose", "wiki"]
    for t in range(STEPS):
        quotas = _expected_quotas(t)
        counts = dict(zip(names, blend.counts[t].tolist()))
        assert sum(counts.values()) == BATCH
        assert all(_within_one(counts[n], quotas[n]) for n in names), (t, counts, quotas)
        assert _within_one(counts["prose"] + counts["wiki"], quotas["prose"] + quotas["wiki"]), (t, counts)
    # the schedule moves the mix: half the first batch is replay, a tenth of the last
    assert blend.counts[0, 2:].sum() == 10 and blend.counts[-1, 2:].sum() in (2, 3)
    assert np.abs(blend.before[-1] - [sum(_expected_quotas(t)[n] for t in range(STEPS)) for n in names]).max() < 2


def test_training_follows_the_schedule_and_megacpt_schedule_prints_the_same_samples(tmp_path, pattern_data, capsys):
    config = _scheduled_config(tmp_path, pattern_data, log_interval=1)
    path = write_config(tmp_path / "c.json", config)
    assert main(["schedule", path, "--csv", str(tmp_path / "mix.csv"), "--plot", str(tmp_path / "mix.png")]) == 0
    assert "prose" in capsys.readouterr().out
    with open(tmp_path / "mix.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    planned = [{n: int(r[f"samples:{n}"]) for n in ("code", "docs", "prose", "wiki")} for r in rows]
    assert len(planned) == STEPS and (tmp_path / "mix.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["train", path]) == 0
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    before = dict.fromkeys(planned[0], 0)
    for r, plan in zip(records, planned):
        trained = {n: r["samples"][n] - before[n] for n in plan}
        assert trained == plan, r["step"]
        assert all(_within_one(trained[n], _expected_quotas(r["step"] - 1)[n]) for n in plan)
        before = r["samples"]


@pytest.mark.parametrize("key, value, message", [
    ("data.replay.fraction", [[20, 0.5], [10, 0.1]], "must increase"),
    ("data.replay.fraction", [[0, 0.5], [0.0, 0.1]], "must increase"),  # step 0 and the fraction 0.0 coincide
    ("data.replay.fraction", [[0, 0.5], [1.5, 0.1]], "fraction of train.steps"),
    ("data.replay.fraction", [[0, 1.2]], "[0, 1)"),
    ("data.replay.fraction", [[0, -0.1]], "[0, 1)"),
    ("data.replay.fraction", [], "at least one point"),
    ("data.sources.0.weight", [[0, 1.0], [5, -1.0]], ">= 0"),
    ("data.sources.0.weight", [[-3, 1.0]], "negative"),
    ("data.sources", [[0, 1.0], [5, 0.0]], "sum to 0 at step 5"),  # the only new source's weight reaches 0
])
def test_bad_schedules_exit_2_naming_the_key(tmp_path, pattern_data, capsys, key, value, message):
    config = tiny_config(tmp_path / "run", [{"name": "a", "prefix": pattern_data["a"]}],
                         data={"replay": {"fraction": 0.25, "sources": [{"name": "b", "prefix": pattern_data["b"]}]}})
    if key == "data.replay.fraction":
        config["data"]["replay"]["fraction"] = value
    else:
        config["data"]["sources"][0]["weight"] = value
    assert main(["train", write_config(tmp_path / "c.json", config)]) == 2
    err = capsys.readouterr().err
    assert f"'{key}'" in err and message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_resume_may_not_change_the_length_of_a_stage_whose_schedule_is_in_fractions(tmp_path, pattern_data, capsys):
    config = _scheduled_config(tmp_path, pattern_data, steps=3)
    config["data"]["sources"][0]["weight"] = 1.0
    path = write_config(tmp_path / "c.json", config)
    assert main(["train", path]) == 0
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", path, "--set", "train.steps=5"]) == 2
    err = capsys.readouterr().err
    assert "'train.steps'" in err and "data.replay.fraction" in err and "fractions" in err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    config["data"]["replay"]["fraction"] = [[0, 0.5], [STEPS, 0.1]]  # int steps: a longer stage keeps the mix
    data = validate_config(config).data
    short, _ = build_blend(data, 2, BATCH, 2 * BATCH)
    long, _ = build_blend(data, 4, BATCH, 4 * BATCH)
    assert (long.counts[:2] == short.counts).all()


def test_a_continued_data_position_refuses_a_mixture_schedule(tmp_path, pattern_data, capsys):
    source = {"name": "a", "prefix": pattern_data["a"], "weight": [[0, 1.0]]}
    first = tiny_config(tmp_path / "s0", [source], train={"steps": 3})
    assert main(["train", write_config(tmp_path / "s0.json", first)]) == 0
    second = tiny_config(tmp_path / "s1", [source],
                         init={"checkpoint": str(tmp_path / "s0" / "checkpoints"), "load_data_position": True})
    capsys.readouterr()
    assert main(["train", write_config(tmp_path / "s1.json", second)]) == 2
    assert "'init.load_data_position'" in capsys.readouterr().err


def test_schedule_points_survive_the_saved_config(tmp_path, pattern_data):
    config = validate_config(_scheduled_config(tmp_path, pattern_data))
    again = validate_config(json.loads(json.dumps(config.model_dump(mode="json"))))
    assert again.data == config.data
    assert isinstance(again.data.replay.fraction[1][0], float) and isinstance(again.data.sources[0].weight[0][0], int)
