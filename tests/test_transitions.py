"""Every link between stages, one case each: what the new run inherits from the checkpoint and what starts afresh.

A tiny model in this process. Each case asserts the observable that proves its link: losses bit for bit equal
to an uninterrupted run's, the LR of the first steps against the schedule's formula, Adam's moments against the
checkpoint's or a fresh Adam's, the samples per source, and what `megacpt train --dry-run --json` says.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from megacpt.cli import main
from megacpt.train.loop import TrainingLoop

from datagen import optimizer_file_state, read_metrics, tiny_config, write_config

CONST = {"style": "constant", "max_lr": 2e-3, "warmup": 0}
ETA_MAX, ETA_MIN, ETA_CONST = 3e-3, 3e-4, 1e-3
# cooldown over the whole first stage (W = 2, C = T = 6), then no anneal: later stages continue at ETA_CONST
INF = {"style": "infinite_cosine", "max_lr": ETA_MAX, "min_lr": ETA_MIN, "const_lr": ETA_CONST, "warmup": 2,
       "cooldown_end": 1.0, "constant_end": 1.0}
CONTINUE = {**INF, "warmup": 0, "rewarm": False}
BETA1, BETA2 = 0.9, 0.95
ALL = ("weights", "optimizer_moments", "optimizer_step", "schedule_position", "data_position", "rng")


def _config(root: Path, pattern_data, name: str, steps: int, schedule: dict, save_interval: int = 0,
            sources=None, **sections) -> str:
    sources = sources or [{"name": "a", "prefix": pattern_data["a"], "weight": 3},
                          {"name": "noise", "prefix": pattern_data["noise"]}]
    train = {"steps": steps, "global_batch_size": 4, "micro_batch_size": 2, "log_interval": 1,
             "save_interval": save_interval, **sections.pop("train", {})}
    config = tiny_config(root / name, sources, schedule=schedule, train=train, **sections)
    return write_config(root / f"{name}.json", config)


def _train(path: str, *extra: str) -> dict[int, dict]:
    """Train; the last training record of each step of the run dir."""
    assert main(["train", path, *extra]) == 0
    run_dir = json.loads(Path(path).read_text())["run_dir"]
    return {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}


def _inf_lr(t: int, steps: int = 6, warmup: int = 2) -> float:
    """INF by hand: linear warmup to ETA_MAX, cosine cooldown to ETA_CONST at step T."""
    if t < warmup:
        return ETA_MAX * (t + 1) / warmup
    return ETA_CONST + (ETA_MAX - ETA_CONST) * (1 + math.cos(math.pi * (t - warmup) / (steps - warmup))) / 2


def _tag(run: Path, step: int) -> str:
    return str(run / "checkpoints" / f"step{step:08d}")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("transitions")


@pytest.fixture(scope="module")
def straight(root, pattern_data) -> dict[int, dict]:
    """The reference: 12 steps at a constant LR in one go, checkpoints every 4."""
    return _train(_config(root, pattern_data, "straight", 12, CONST, save_interval=4))


@pytest.fixture(scope="module")
def inf0(root, pattern_data) -> dict[int, dict]:
    """Stage 0 with an infinite schedule: warmup, cooldown to ETA_CONST over 6 steps, checkpoints at 3 and 6."""
    return _train(_config(root, pattern_data, "inf0", 6, INF, save_interval=3))


@pytest.fixture(scope="module")
def inf1(root, pattern_data, inf0) -> dict[int, dict]:
    """Stage 1 continues stage 0's constant phase without a re-warm."""
    return _train(_config(root, pattern_data, "inf1", 3, CONTINUE, init={"checkpoint": _tag(root / "inf0", 6)}))


class Case:
    """What a case needs: a fresh folder, the data, the reference runs and the dry run."""

    def __init__(self, tmp_path, pattern_data, capsys, monkeypatch, root, straight, inf1):
        self.tmp, self.data, self.capsys, self.monkeypatch = tmp_path, pattern_data, capsys, monkeypatch
        self.root, self.straight, self.inf1 = root, straight, inf1

    def config(self, name: str, steps: int, schedule: dict, **kwargs) -> str:
        return _config(self.tmp, self.data, name, steps, schedule, **kwargs)

    def dry(self, path: str, *extra: str) -> dict:
        """`megacpt train PATH --dry-run --json`, checking that it wrote nothing."""
        def files() -> dict:
            return {f: f.stat().st_mtime_ns for top in (self.tmp, self.root) for f in top.rglob("*")}

        before = files()
        self.capsys.readouterr()
        assert main(["train", path, "--dry-run", "--json", *extra]) == 0
        out = self.capsys.readouterr().out.strip().splitlines()
        assert files() == before
        return json.loads(out[-1])

    def refused(self, path: str, key: str) -> str:
        self.capsys.readouterr()
        assert main(["train", path]) == 2
        err = self.capsys.readouterr().err
        assert key in err and "Traceback" not in err, err
        return err


def _inherits(summary: dict, *inherited: str) -> None:
    assert {k: summary["inherit"][k] for k in ALL} == {k: k in inherited for k in ALL}
    assert summary["inherit"]["optimizer_hyperparameters"] is False


def _same_losses(records: dict, reference: dict, steps) -> None:
    assert [records[s]["loss"] for s in steps] == [reference[s]["loss"] for s in steps]
    assert [records[s]["samples"] for s in steps] == [reference[s]["samples"] for s in steps]


# ------------------------------------------------------------------------------------------------- the cases


def resume_after_a_crash(c: Case) -> None:
    path = c.config("run", 12, CONST, save_interval=4)
    real_step = TrainingLoop.train_step

    def crash_at_step_7(loop):
        if loop.scheduler.t == 6:
            raise RuntimeError("injected crash")
        return real_step(loop)

    with c.monkeypatch.context() as patch:
        patch.setattr(TrainingLoop, "train_step", crash_at_step_7)
        with pytest.raises(RuntimeError, match="injected crash"):
            main(["train", path])
    summary = c.dry(path)
    assert (summary["mode"], summary["stage_index"], summary["first_lrs"]) == ("resume", 0, [2e-3] * 3)
    assert summary["checkpoint"].endswith("step00000004") and summary["data_position"] == 16
    _inherits(summary, *ALL)
    _same_losses(_train(path), c.straight, range(1, 13))


def resume_with_more_steps(c: Case) -> None:
    path = c.config("run", 4, CONST, save_interval=4)
    _train(path)
    summary = c.dry(path, "--set", "train.steps=12")
    assert (summary["mode"], summary["steps"], summary["samples"]) == \
        ("resume", {"first": 4, "last": 11, "total": 12}, {"a": 24, "noise": 8})
    _inherits(summary, *ALL)
    _same_losses(_train(path, "--set", "train.steps=12"), c.straight, range(1, 13))
    state = json.loads((c.tmp / "run" / "checkpoints" / "step00000012" / "megacpt_state.json").read_text())
    assert (state["stages"][-1]["steps"], state["stages"][-1]["samples"]) == (12, {"a": 36, "noise": 12})


def new_stage_optimizer_dropped(c: Case) -> None:
    path = c.config("stage1", 3, {**CONST, "max_lr": 1e-3}, save_interval=1,
                    init={"checkpoint": str(c.root / "straight" / "checkpoints")})
    summary = c.dry(path)
    assert (summary["mode"], summary["stage_index"], summary["first_lrs"], summary["last_lr"]) == \
        ("new_stage", 1, [1e-3] * 3, 1e-3)
    assert summary["samples"] == {"a": 9, "noise": 3}
    _inherits(summary, "weights")
    records = _train(path)
    assert [(r["stage"], r["lr"]) for r in records.values()] == [(1, 1e-3)] * 3
    assert records[3]["samples"] == {"a": 9, "noise": 3}  # the data starts again at its beginning
    assert [records[s]["loss"] for s in (1, 2, 3)] != [c.straight[s]["loss"] for s in (1, 2, 3)]
    for _, m, v, step in optimizer_file_state(c.tmp / "stage1" / "checkpoints" / "step00000001")[1]:
        assert step == 1  # a fresh Adam after one step: v = (1 - beta2) g^2 with g = m / (1 - beta1)
        torch.testing.assert_close(v, (1 - BETA2) * (m / (1 - BETA1)) ** 2, rtol=1e-4, atol=1e-12)


def kept_optimizer_with_new_betas_and_weight_decay(c: Case) -> None:
    betas, decay = (0.8, 0.99), 0.05
    path = c.config("stage1", 3, {**CONST, "max_lr": 1e-3}, save_interval=1,
                    init={"checkpoint": str(c.root / "straight" / "checkpoints"), "load_optimizer": True},
                    deepspeed={"optimizer": {"type": "AdamW", "params": {"betas": list(betas), "weight_decay": decay}}})
    summary = c.dry(path)
    _inherits(summary, "weights", "optimizer_moments", "optimizer_step")
    _train(path)
    before = optimizer_file_state(c.root / "straight" / "checkpoints" / "step00000012")[1]
    groups, after = optimizer_file_state(c.tmp / "stage1" / "checkpoints" / "step00000001")
    assert [(tuple(g["betas"]), g["weight_decay"]) for g in groups] == [(betas, decay), (betas, 0.0)]
    for (_, m0, v0, step0), (_, m1, v1, step1) in zip(before, after):
        assert (step0, step1) == (12, 13)
        grad = (m1 - betas[0] * m0) / (1 - betas[0])
        torch.testing.assert_close(v1, betas[1] * v0 + (1 - betas[1]) * grad**2, rtol=1e-4, atol=1e-12)


def kept_scheduler(c: Case) -> None:
    path = c.config("stage1", 6, INF, init={"checkpoint": _tag(c.root / "inf0", 3), "load_scheduler": True})
    summary = c.dry(path)
    assert summary["first_lrs"] == pytest.approx([_inf_lr(t) for t in (3, 4, 5)], rel=1e-12)
    assert summary["steps"] == {"first": 3, "last": 5, "total": 6}
    _inherits(summary, "weights", "schedule_position")
    records = _train(path)
    assert sorted(records) == [4, 5, 6]
    assert [records[s]["lr"] for s in (4, 5, 6)] == pytest.approx([_inf_lr(t) for t in (3, 4, 5)], rel=1e-12)
    finished = c.config("stage2", 6, INF, init={"checkpoint": _tag(c.root / "inf0", 6), "load_scheduler": True})
    assert "finished its schedule" in c.refused(finished, "init.load_scheduler")


def kept_data_position(c: Case) -> None:
    short = c.config("short", 8, CONST)
    _train(short)
    path = c.config("stage1", 4, CONST, init={"checkpoint": str(c.tmp / "short" / "checkpoints"),
                                              "load_optimizer": True, "load_data_position": True})
    summary = c.dry(path)
    assert (summary["data_position"], summary["samples"]) == (32, {"a": 12, "noise": 4})
    _inherits(summary, "weights", "optimizer_moments", "optimizer_step", "data_position")
    records = _train(path)  # steps 9 .. 12 of the stream, beyond the old stage's 8
    assert [records[s]["loss"] for s in range(1, 5)] == [c.straight[s]["loss"] for s in range(9, 13)]
    assert records[4]["samples"] == c.straight[12]["samples"]
    other_batch = c.config("stage2", 2, CONST, init={"checkpoint": str(c.tmp / "short" / "checkpoints"),
                                                     "load_data_position": True}, train={"global_batch_size": 8})
    assert "train.global_batch_size 4" in c.refused(other_batch, "init.load_data_position")


def resume_from_another_run_dir(c: Case) -> None:
    path = c.config("moved", 12, CONST, init={"checkpoint": _tag(c.root / "straight", 4), "mode": "resume"})
    summary = c.dry(path)
    assert (summary["mode"], summary["stage_index"], summary["steps"]["first"]) == ("resume", 0, 4)
    _inherits(summary, *ALL)
    records = _train(path)
    assert sorted(records) == list(range(5, 13))
    _same_losses(records, c.straight, range(5, 13))


def new_stage_from_hugging_face_weights(c: Case) -> None:
    assert main(["convert", "megacpt-to-hf", "--checkpoint", _tag(c.root / "straight", 12),
                 "--output", str(c.tmp / "hf")]) == 0
    assert main(["convert", "hf-to-megacpt", "--hf", str(c.tmp / "hf"), "--output", str(c.tmp / "imported")]) == 0
    stage = {**CONST, "max_lr": 1e-3}
    path = c.config("from_hf", 2, stage, init={"checkpoint": str(c.tmp / "imported")})
    summary = c.dry(path)
    assert (summary["mode"], summary["stage_index"]) == ("new_stage", 1)
    _inherits(summary, "weights")
    from_hf = _train(path)
    from_megacpt = _train(c.config("from_megacpt", 2, stage, init={"checkpoint": _tag(c.root / "straight", 12)}))
    assert [from_hf[s]["loss"] for s in (1, 2)] == pytest.approx([from_megacpt[s]["loss"] for s in (1, 2)], rel=1e-5)
    kept = c.config("kept", 2, stage, init={"checkpoint": str(c.tmp / "imported"), "load_optimizer": True})
    c.refused(kept, "init.load_optimizer")


def infinite_to_infinite_without_rewarm(c: Case) -> None:
    assert [c.inf1[s]["lr"] for s in (1, 2, 3)] == [ETA_CONST] * 3 and c.inf1[3]["stage"] == 1
    path = c.config("again", 3, CONTINUE, init={"checkpoint": _tag(c.root / "inf0", 6)})
    summary = c.dry(path)
    assert (summary["mode"], summary["stage_index"], summary["first_lrs"], summary["last_lr"]) == \
        ("new_stage", 1, [ETA_CONST] * 3, ETA_CONST)
    _inherits(summary, "weights")
    other_lr = c.config("other_lr", 3, {**CONTINUE, "const_lr": 2e-3}, init={"checkpoint": _tag(c.root / "inf0", 6)})
    c.refused(other_lr, "schedule.const_lr")
    after_cosine = c.config("after_cosine", 3, CONTINUE, init={"checkpoint": _tag(c.root / "straight", 12)})
    assert "'constant'" in c.refused(after_cosine, "schedule.rewarm")
    fresh = c.config("fresh", 3, CONTINUE)
    c.refused(fresh, "schedule.rewarm")


def infinite_to_anneal_branch(c: Case) -> None:
    anneal = {**CONTINUE, "constant_end": 0.0}
    path = c.config("anneal", 3, anneal, init={"checkpoint": str(c.root / "inf1" / "checkpoints")})
    expected = [ETA_CONST * (ETA_MIN / ETA_CONST) ** (t / 3) for t in range(3)]
    summary = c.dry(path)
    assert (summary["stage_index"], summary["first_lrs"]) == (2, pytest.approx(expected, rel=1e-12))
    records = _train(path)
    assert [records[s]["lr"] for s in (1, 2, 3)] == pytest.approx(expected, rel=1e-12)
    again = c.config("again", 3, CONTINUE, init={"checkpoint": str(c.tmp / "anneal" / "checkpoints")})
    assert "anneal at step 0" in c.refused(again, "schedule.rewarm")


def meta_schedule_stage_2(c: Case) -> None:
    schedule = {"style": "cosine", "max_lr": ETA_MAX, "min_lr": ETA_MIN, "warmup": 1, "meta": "autoregressive_cosine"}
    path = c.config("meta", 3, schedule, init={"checkpoint": str(c.root / "inf1" / "checkpoints")})
    tau, steps, warmup = 2, 3, 1  # FoMo-in-Flux: the peak one cosine over all stages takes one step into stage tau
    decay = steps - warmup
    peak = ETA_MIN + (ETA_MAX - ETA_MIN) * (1 + math.cos(math.pi * (tau * decay + 1) / ((tau + 1) * decay))) / 2
    expected = [peak, peak, ETA_MIN + (peak - ETA_MIN) * 0.5]
    summary = c.dry(path)
    assert summary["stage_index"] == 2 and summary["first_lrs"] == pytest.approx(expected, rel=1e-12)
    assert summary["peak_lr"] == pytest.approx(peak, rel=1e-12)
    records = _train(path)
    assert [(records[s]["stage"], records[s]["lr"]) for s in (1, 2, 3)] == \
        [(2, pytest.approx(lr, rel=1e-12)) for lr in expected]


def seen_only_replay_after_a_lengthened_stage(c: Case) -> None:
    from megacpt.checkpoint.tags import resolve_tag
    from megacpt.config import load_config
    from megacpt.data.datasets import build_train_dataset
    from megacpt.policy.stages import read_state

    only_a = [{"name": "a", "prefix": c.data["a"]}]
    grow = c.config("grow", 2, CONST, sources=only_a)
    _train(grow)
    _train(grow, "--set", "train.steps=5")  # 20 samples of 'a', 12 of them after the lengthening
    history = read_state(resolve_tag(c.tmp / "grow" / "checkpoints")).stages
    assert (history[-1].steps, history[-1].samples) == (5, {"a": 20})
    path = c.config("replay", 5, CONST, sources=[{"name": "b", "prefix": c.data["b"]}],
                    data={"replay": {"fraction": 0.5, "seen_only": True, "sources": [{"name": "old_a",
                                                                                     "prefix": c.data["a"]}]}},
                    init={"checkpoint": str(c.tmp / "grow" / "checkpoints")})
    summary = c.dry(path)
    assert summary["samples"] == {"b": 10, "old_a": 10}
    cache = str(c.tmp / "cache")
    trained = build_train_dataset(load_config(grow, ["train.steps=5"]).data, 20, 4, 64, cache, 256, -1)
    trained_on = sorted(tuple(trained[i]["tokens"].tolist()) for i in range(20))
    replay = build_train_dataset(load_config(path).data, 40, 4, 64, cache, 256, -1, history)
    replayed = sorted(tuple(replay[i]["tokens"].tolist()) for i in range(40) if replay.source_of(i) == "old_a")
    assert replayed == trained_on  # one pass over exactly the 20 samples trained on, the lengthening's included


CASES = [resume_after_a_crash, resume_with_more_steps, new_stage_optimizer_dropped,
         kept_optimizer_with_new_betas_and_weight_decay, kept_scheduler, kept_data_position,
         resume_from_another_run_dir, new_stage_from_hugging_face_weights, infinite_to_infinite_without_rewarm,
         infinite_to_anneal_branch, meta_schedule_stage_2, seen_only_replay_after_a_lengthened_stage]


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_transition(case, tmp_path, pattern_data, capsys, monkeypatch, root, straight, inf1):
    case(Case(tmp_path, pattern_data, capsys, monkeypatch, root, straight, inf1))
