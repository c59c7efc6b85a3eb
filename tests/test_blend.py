"""Compute-equivalent replay blending, per-source sample counts, validation sets and data checks."""

import math
from pathlib import Path

import numpy as np
import pytest

from megacpt.cli import main
from megacpt.config import validate_config
from megacpt.data.blend import Blend, batch_counts, batch_shares
from megacpt.data.datasets import build_train_dataset
from megacpt.data.loader import BatchStream
from megacpt.policy.stages import read_state

from datagen import read_metrics, samples_trained, tiny_config, train_recording, write_config, write_indexed


def _data(pattern_data, fraction, new_weight=1.0):
    return {
        "sources": [{"name": "new", "prefix": pattern_data["a"], "weight": new_weight}],
        "replay": {"fraction": fraction, "sources": [{"name": "old1", "prefix": pattern_data["b"], "weight": 3.0},
                                                     {"name": "old2", "prefix": pattern_data["c"], "weight": 1.0}]},
    }


def _config(tmp_path, pattern_data, fraction, **train):
    return tiny_config(tmp_path / "run", [], data=_data(pattern_data, fraction),
                       train={"steps": 10, "global_batch_size": 20, "micro_batch_size": 10, **train})


@pytest.mark.parametrize("fraction", [0.05, 0.25])
def test_new_sources_share_one_minus_fraction_and_replay_shares_fraction(tmp_path, pattern_data, fraction):
    data = validate_config(_config(tmp_path, pattern_data, fraction)).data
    shares = batch_shares(data.replay.fraction, [s.weight for s in data.sources],
                          [s.weight for s in data.replay.sources], 10, 3)
    assert shares == pytest.approx(np.array([[1 - fraction, fraction * 0.75, fraction * 0.25]] * 3), abs=1e-12)


def _constant(groups: list[list[float]], batch_size: int, num_batches: int) -> np.ndarray:
    """batch_counts of a mix that does not change: every batch the same shares."""
    shares = np.tile([s for g in groups for s in g], (num_batches, 1))
    return batch_counts(shares, [len(g) for g in groups], batch_size)


def _assert_every_batch_is_apportioned(counts: np.ndarray, groups: list[list[float]], batch_size: int) -> None:
    """Each source and each group: floor or ceiling of its quota in every batch; totals on target over batches."""
    shares = np.array([s for g in groups for s in g])
    quotas = shares * batch_size
    assert (counts.sum(axis=1) == batch_size).all()
    assert ((counts == np.floor(quotas + 1e-9)) | (counts == np.ceil(quotas - 1e-9))).all(), counts
    start = 0
    for group in groups:
        total, quota = counts[:, start:start + len(group)].sum(axis=1), sum(group) * batch_size
        assert ((total == math.floor(quota + 1e-9)) | (total == math.ceil(quota - 1e-9))).all(), total
        start += len(group)
    batches = np.arange(1, len(counts) + 1)[:, None]
    assert np.abs(np.cumsum(counts, axis=0) - batches * quotas).max() < 1  # carried remainders: on target


@pytest.mark.parametrize("groups, batch_size", [
    ([[0.9 * w for w in (0.5, 0.3, 0.2)], [0.1 * w for w in (0.4, 0.3, 0.2, 0.1)]], 8),  # 3 new + 4 replay at 10%
    ([[0.95], [0.05]], 20),
    ([[0.75], [0.75 * 0.25, 0.25 * 0.25]], 20),
    ([[1 / 3, 1 / 3, 1 / 3], []], 7),
    ([[0.6, 0.15], [0.25]], 4),  # integer quotas in the new group
])
def test_every_batch_holds_each_source_and_group_share_within_one_sample(groups, batch_size):
    _assert_every_batch_is_apportioned(_constant(groups, batch_size, 500), groups, batch_size)


def test_three_new_and_four_replay_sources_at_ten_percent_put_0_or_1_replay_samples_in_every_batch_of_8():
    groups = [[0.9 / 3] * 3, [0.1 / 4] * 4]
    counts = _constant(groups, 8, 400)
    replay = counts[:, 3:].sum(axis=1)
    assert set(replay.tolist()) == {0, 1} and replay.sum() == round(0.1 * 8 * 400)
    assert set(counts[:, :3].sum(axis=1).tolist()) == {7, 8}
    assert (counts[:, :3] >= 2).all() and (counts[:, :3] <= 3).all()


def test_a_longer_stream_keeps_every_earlier_batch():
    groups = [[0.9 / 3] * 3, [0.1 / 4] * 4]
    short, long = Blend(_constant(groups, 8, 10), 8), Blend(_constant(groups, 8, 100), 8)
    assert [short.locate(p) for p in range(80)] == [long.locate(p) for p in range(80)]


def test_stream_of_seven_sources_matches_the_apportionment_and_megatrons_order_per_source(tmp_path, world,
                                                                                         pattern_data):
    new = [{"name": f"new{i}", "prefix": pattern_data[k], "weight": w}
           for i, (k, w) in enumerate(zip("abc", (5, 3, 2)))]
    replay = [{"name": f"old{i}", "prefix": pattern_data[k], "weight": 1}
              for i, k in enumerate(("noise", "a_val", "b_val", "noise_val"))]
    data = validate_config(tiny_config(tmp_path / "run", new,
                                       data={"replay": {"fraction": 0.1, "sources": replay}})).data
    cache = str(tmp_path / "cache")
    stream = build_train_dataset(data, 400, 8, 64, cache, 256, -1)
    expected = _constant([[0.9 * w for w in (0.5, 0.3, 0.2)], [0.1 / 4] * 4], 8, 50)
    names = [s["name"] for s in new + replay]
    for b in range(50):
        in_batch = [stream.source_of(p) for p in range(8 * b, 8 * b + 8)]
        assert [in_batch.count(n) for n in names] == expected[b].tolist()
        assert stream.samples_per_source(8 * (b + 1)) == dict(zip(names, expected[: b + 1].sum(axis=0).tolist()))
    # the n-th sample a source contributes is sample n of megatron's one-epoch GPTDataset of that prefix
    alone_config = validate_config(tiny_config(tmp_path / "r2", [new[1]]))
    alone = build_train_dataset(alone_config.data, 200, 8, 64, cache, 256, -1)
    from_b = [stream[p]["tokens"].tolist() for p in range(400) if stream.source_of(p) == "new1"]
    assert from_b == [alone[n]["tokens"].tolist() for n in range(len(from_b))]


def test_training_logs_cumulative_samples_per_source_at_the_configured_shares(tmp_path, pattern_data):
    config = _config(tmp_path, pattern_data, 0.25, log_interval=1)
    assert main(["train", write_config(tmp_path / "c.json", config)]) == 0
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 11))
    for r in records:
        consumed = r["step"] * 20
        assert sum(r["samples"].values()) == consumed
        assert abs(r["samples"]["new"] - 0.75 * consumed) <= 1
        assert abs(r["samples"]["old1"] - 0.1875 * consumed) <= 1
        assert abs(r["samples"]["old2"] - 0.0625 * consumed) <= 1


def test_no_replay_sample_appears_with_fraction_zero(tmp_path, world, pattern_data):
    config = validate_config(_config(tmp_path, pattern_data, 0.0))
    dataset = build_train_dataset(config.data, 200, 20, 64, str(tmp_path / "cache"), 256, -1)
    assert dataset.samples_per_source(200) == {"new": 200}
    new_only = {tuple(dataset[i]["tokens"][:8].tolist()) for i in range(200)}
    a_config = validate_config(tiny_config(tmp_path / "r2", [{"name": "new", "prefix": pattern_data["a"]}]))
    a_only = build_train_dataset(a_config.data, 200, 20, 64, str(tmp_path / "cache"), 256, -1)
    assert new_only == {tuple(a_only[i]["tokens"][:8].tolist()) for i in range(200)}


@pytest.mark.parametrize("data_size", [2, 4])
def test_data_parallel_ranks_read_disjoint_samples_whose_union_is_the_global_batch(data_size):
    one = BatchStream(range(10**6), 16, 2, 0, 1, device=None)
    expected = [list(one.micro_batch_indices(m)) for m in range(one.accumulation_steps)]
    expected = sorted(i for batch in expected for i in batch)
    ranks = [BatchStream(range(10**6), 16, 2, r, data_size, device=None) for r in range(data_size)]
    seen = [i for s in ranks for m in range(s.accumulation_steps) for i in s.micro_batch_indices(m)]
    assert sorted(seen) == expected == list(range(16)) and len(set(seen)) == len(seen)


def test_validation_sets_are_reported_separately(tmp_path, pattern_data):
    config = tiny_config(tmp_path / "run", [{"name": "a", "prefix": pattern_data["a"]}],
                         data={"validation": [{"name": "a", "prefix": pattern_data["a_val"]},
                                              {"name": "noise", "prefix": pattern_data["noise_val"]}]},
                         train={"steps": 20, "eval_interval": 10, "log_interval": 10})
    assert main(["train", write_config(tmp_path / "c.json", config)]) == 0
    evals = [r for r in read_metrics(tmp_path / "run") if "eval" in r]
    assert [r["step"] for r in evals] == [10, 20]
    final = evals[-1]["eval"]
    assert set(final) == {"a", "noise"}
    assert final["noise"] > final["a"] + 2.0  # the learnt pattern vs random tokens


def _bad_run(tmp_path, capsys, config) -> str:
    assert main(["train", write_config(tmp_path / "bad.json", config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not (tmp_path / "run" / "metrics.jsonl").exists()
    return err


def test_truncated_bin_is_refused_before_training(tmp_path, capsys):
    prefix = write_indexed(tmp_path / "t", [[1, 2, 3] * 50] * 10)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(100)
    err = _bad_run(tmp_path, capsys, tiny_config(tmp_path / "run", [{"name": "t", "prefix": prefix}]))
    assert "t.bin is truncated" in err


def test_token_id_beyond_the_vocabulary_is_refused(tmp_path, capsys):
    prefix = write_indexed(tmp_path / "big", [[1, 2, 300, 4] * 40] * 10)
    err = _bad_run(tmp_path, capsys, tiny_config(tmp_path / "run", [{"name": "big", "prefix": prefix}]))
    assert "token id 300" in err and "vocab_size is 256" in err and "big.bin" in err


@pytest.mark.parametrize("weights", [[-1.0], [0.0]])
def test_negative_or_zero_weights_are_refused(tmp_path, capsys, pattern_data, weights):
    config = tiny_config(tmp_path / "run", [{"name": "a", "prefix": pattern_data["a"], "weight": weights[0]}])
    err = _bad_run(tmp_path, capsys, config)
    assert "data" in err and "weights" in err


def test_corrupt_index_is_refused(tmp_path, capsys):
    prefix = write_indexed(tmp_path / "x", [[1, 2, 3] * 50] * 4)
    (tmp_path / "x.idx").write_bytes(b"garbage" * 10)
    err = _bad_run(tmp_path, capsys, tiny_config(tmp_path / "run", [{"name": "x", "prefix": prefix}]))
    assert "x.idx" in err


def _is_pattern(row: tuple[int, ...], period: int, offset: int) -> bool:
    return set(row) <= {(offset + 7 * i) % 256 for i in range(period)}  # a pattern cycles through these tokens


def test_seen_only_replays_only_samples_the_earlier_stage_trained_on(tmp_path, pattern_data, world, monkeypatch):
    """What stage 0 trained on is what its loop fed the model (recorded here, and counted in its metrics and
    stage record); stage 1's loop replays exactly those samples, each once per pass."""
    from megacpt.checkpoint import tags as checkpoint
    from megacpt.config import load_config

    stage0 = tiny_config(tmp_path / "stage0", [{"name": "old", "prefix": pattern_data["noise"]},
                                                {"name": "b", "prefix": pattern_data["b"]}], train={"steps": 3})
    rows = train_recording(monkeypatch, write_config(tmp_path / "s0.json", stage0))
    trained_on = [row for row in rows if not _is_pattern(row, 5, 100)]  # the blend's 'old' samples
    history = read_state(checkpoint.resolve_tag(tmp_path / "stage0" / "checkpoints")).stages
    assert len(rows) == 12 and len(trained_on) == len(set(trained_on)) == 6 == history[-1].samples["old"]
    assert samples_trained(tmp_path / "stage0") == {"old": 6, "b": 6}

    stage1 = tiny_config(tmp_path / "stage1", [{"name": "new", "prefix": pattern_data["a"]}],
                         data={"replay": {"fraction": 0.5, "seen_only": True,
                                          "sources": [{"name": "old", "prefix": pattern_data["noise"]}]}},
                         init={"checkpoint": str(tmp_path / "stage0" / "checkpoints")}, train={"steps": 3})
    path = write_config(tmp_path / "s1.json", stage1)
    consumed = train_recording(monkeypatch, path)
    replayed = [row for row in consumed if not _is_pattern(row, 11, 3)]
    assert len(consumed) == 12 and len(replayed) == 6 == samples_trained(tmp_path / "stage1")["old"]
    assert sorted(replayed) == sorted(trained_on)  # the 6 seen samples, each once in the first pass

    config = load_config(path)  # control: without seen_only the same replay source brings unseen samples
    config.data.replay.seen_only = False
    anything = build_train_dataset(config.data, 200, 4, 64, str(tmp_path / "cache"), 256, -1, history)
    unseen = {tuple(anything[i]["tokens"].tolist()) for i in range(200) if anything.source_of(i) == "old"}
    assert not unseen <= set(trained_on)


def test_seen_only_without_a_history_that_says_is_an_error(tmp_path, pattern_data, capsys):
    config = tiny_config(tmp_path / "run", [{"name": "new", "prefix": pattern_data["a"]}],
                         data={"replay": {"fraction": 0.25, "seen_only": True,
                                          "sources": [{"name": "old", "prefix": pattern_data["b"]}]}})
    assert main(["train", write_config(tmp_path / "c.json", config)]) == 2
    assert "seen_only" in capsys.readouterr().err


@pytest.mark.parametrize("group", ["sources", "replay"])
def test_a_validation_set_that_is_training_data_is_refused_unless_the_overlap_is_intended(tmp_path, capsys,
                                                                                          pattern_data, group):
    replay = {"fraction": 0.25, "sources": [{"name": "old", "prefix": pattern_data["b"]}]}
    trained = pattern_data["a"] if group == "sources" else pattern_data["b"]
    config = tiny_config(tmp_path / "run", [{"name": "new", "prefix": pattern_data["a"]}],
                         data={"replay": replay,
                               "validation": [{"name": "val", "prefix": trained + "/../" + Path(trained).name}]})
    err = _bad_run(tmp_path, capsys, config)
    assert "data.validation" in err and "data.allow_validation_overlap" in err and ("'new'" in err or "'old'" in err)
    config["data"]["allow_validation_overlap"] = True
    assert validate_config(config).data.validation[0].name == "val"
