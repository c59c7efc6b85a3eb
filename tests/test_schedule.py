"""LR schedules: every style against its formula, the scheduler object on a real optimizer, stages, bad input.

The expected LRs are computed here from the issue's formulas, independently of megacpt.schedule; phase
boundaries (W, S, C, A) are written out by hand for each case. Fast: no torch.distributed, no model.
"""
import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megacpt.cli import main as cli_main
from megacpt.config import ScheduleConfig, validate_config
from megacpt.errors import ConfigError, UserError
from megacpt.schedule import StageScheduler, check_continuation, check_schedule, lr_at, meta_peak

ETA_MAX, ETA_MIN, ETA_CONST = 3e-4, 3e-5, 1.65e-4


# ------------------------------------------------------------------------------ independent formulas


def expected_lr(style, t, T, W, *, D=None, S=None, shape=None, C=None, A=None, alpha=10.0, peak=ETA_MAX):
    if t < W:
        return peak * (t + 1) / W
    if style == "constant":
        return peak
    if style in ("cosine", "linear"):
        D = T if D is None else D
        p = min(1.0, max(0.0, (t - W) / (D - W)))
        if style == "cosine":
            return ETA_MIN + (peak - ETA_MIN) * (1 + math.cos(math.pi * p)) / 2
        return ETA_MIN + (peak - ETA_MIN) * (1 - p)
    if style == "inverse_sqrt":
        return max(ETA_MIN, peak * math.sqrt(W / (t + 1)))
    if style == "wsd":
        if t < S:
            return peak
        p = (t - S) / (T - S)
        f = {"linear": 1 - p, "cosine": (1 + math.cos(math.pi * p)) / 2, "1-sqrt": 1 - math.sqrt(p)}[shape]
        return ETA_MIN + (peak - ETA_MIN) * f
    if style in ("infinite_cosine", "infinite_inv_sqrt"):
        if t < C:
            u = (t - W) / (C - W)
            if style == "infinite_cosine":
                return ETA_CONST + (peak - ETA_CONST) * (1 + math.cos(math.pi * u)) / 2
            def h(x):
                return 1 / math.sqrt(1 + alpha * x) - 1
            return peak + (ETA_CONST - peak) * h(u) / h(1)
        if t < A:
            return ETA_CONST
        return ETA_CONST * (ETA_MIN / ETA_CONST) ** ((t - A) / (T - A))
    raise AssertionError(style)


def assert_matches(schedule: ScheduleConfig, T: int, expected, stage_index: int = 0) -> None:
    check_schedule(schedule, T)
    worst = max(abs(lr_at(schedule, T, t, stage_index) - expected(t)) for t in range(T))
    assert worst <= 1e-12


# (T, warmup as configured, W by hand, decay_steps D or None)
TWD = [
    (100, 0, 0, None),
    (100, 10, 10, None),
    (100, 10, 10, 60),  # D < T: holds min_lr for the last 40 steps
    (37, 0.1, 4, 20),  # fraction: 3.7 rounds to 4
    (250, 0.01, 3, None),  # 2.5 rounds half up to 3
]


@pytest.mark.parametrize("style", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("T,warmup,W,D", TWD)
def test_constant_cosine_linear_match_formulas(style, T, warmup, W, D):
    schedule = ScheduleConfig(style=style, max_lr=ETA_MAX, min_lr=ETA_MIN, warmup=warmup, decay_steps=D)
    assert_matches(schedule, T, lambda t: expected_lr(style, t, T, W, D=D))


@pytest.mark.parametrize("T,warmup,W,D", [case for case in TWD if case[2] > 0])
def test_inverse_sqrt_matches_formula(T, warmup, W, D):
    schedule = ScheduleConfig(style="inverse_sqrt", max_lr=ETA_MAX, min_lr=ETA_MIN, warmup=warmup)
    assert_matches(schedule, T, lambda t: expected_lr("inverse_sqrt", t, T, W))


# (T, warmup, W, decay_fraction, S by hand)
WSD_CASES = [(100, 0, 0, 0.2, 80), (100, 10, 10, 0.2, 80), (37, 0.1, 4, 0.25, 28), (250, 0.01, 3, 0.1, 225)]


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("T,warmup,W,fraction,S", WSD_CASES)
def test_wsd_matches_formula(shape, T, warmup, W, fraction, S):
    schedule = ScheduleConfig(style="wsd", max_lr=ETA_MAX, min_lr=ETA_MIN, warmup=warmup, decay_fraction=fraction,
                              decay_shape=shape)
    assert_matches(schedule, T, lambda t: expected_lr("wsd", t, T, W, S=S, shape=shape))


# (T, warmup, W, cooldown_end, constant_end, C and A by hand)
INFINITE_CASES = [
    (100, 0, 0, 0.6, 0.85, 60, 85),
    (100, 10, 10, 0.6, 0.85, 60, 85),
    (37, 0.1, 4, 0.6, 0.85, 22, 31),  # 22.2 -> 22, 31.45 -> 31
    (100, 10, 10, 0.6, 1.0, 60, 100),  # constant_end 1: never anneals
    (100, 10, 10, 0.1, 0.5, 10, 50),  # C = W: no cooldown phase
]


@pytest.mark.parametrize("style", ["infinite_cosine", "infinite_inv_sqrt"])
@pytest.mark.parametrize("T,warmup,W,c,a,C,A", INFINITE_CASES)
def test_infinite_schedules_match_formulas(style, T, warmup, W, c, a, C, A):
    schedule = ScheduleConfig(style=style, max_lr=ETA_MAX, min_lr=ETA_MIN, const_lr=ETA_CONST, warmup=warmup,
                              cooldown_end=c, constant_end=a, timescale=7.0)
    assert_matches(schedule, T, lambda t: expected_lr(style, t, T, W, C=C, A=A, alpha=7.0))


# (T, constant_end, A by hand): without a re-warm the stage starts in its constant phase
CONTINUED_CASES = [(100, 1.0, 100), (100, 0.85, 85), (37, 0.5, 19), (10, 0.0, 0), (1, 0.0, 0)]


@pytest.mark.parametrize("style", ["infinite_cosine", "infinite_inv_sqrt"])
@pytest.mark.parametrize("T,a,A", CONTINUED_CASES)
def test_continued_infinite_schedule_holds_const_lr_then_anneals(style, T, a, A):
    schedule = ScheduleConfig(style=style, max_lr=ETA_MAX, min_lr=ETA_MIN, const_lr=ETA_CONST, rewarm=False,
                              constant_end=a)
    assert_matches(schedule, T,
                   lambda t: ETA_CONST if t < A else ETA_CONST * (ETA_MIN / ETA_CONST) ** ((t - A) / (T - A)))
    assert lr_at(schedule, T, 0) == ETA_CONST  # no warmup, no cooldown: step 0 trains at eta_const


def _infinite(**changes) -> ScheduleConfig:
    return ScheduleConfig(**{"style": "infinite_cosine", "max_lr": ETA_MAX, "min_lr": ETA_MIN, "const_lr": ETA_CONST,
                             "warmup": 10, "constant_end": 0.8, **changes})


@pytest.mark.parametrize("previous, steps_done", [
    (_infinite(), 0), (_infinite(), 80),  # anywhere up to the anneal's start (80 of 100)
    (_infinite(constant_end=1.0), 100),  # a stage that never anneals, finished
    (_infinite(rewarm=False, warmup=0, constant_end=1.0), 100),  # a continued stage continued again
])
def test_continuation_of_a_constant_phase_is_accepted(previous, steps_done):
    check_continuation(_infinite(rewarm=False, warmup=0), previous, 100, steps_done)


@pytest.mark.parametrize("previous, steps_done, const_lr, key, words", [
    (None, 0, ETA_CONST, "schedule.rewarm", "no checkpoint stage"),
    (ScheduleConfig(style="cosine"), 100, ETA_CONST, "schedule.rewarm", "'cosine'"),
    (_infinite(), 81, ETA_CONST, "schedule.rewarm", "anneal at step 80"),
    (_infinite(rewarm=False, warmup=0, constant_end=0.0), 10, ETA_CONST, "schedule.rewarm", "anneal at step 0"),
    (_infinite(), 50, 1e-4, "schedule.const_lr", str(ETA_CONST)),
])
def test_continuation_that_cannot_continue_names_the_key(previous, steps_done, const_lr, key, words):
    with pytest.raises(ConfigError) as caught:
        check_continuation(_infinite(rewarm=False, warmup=0, const_lr=const_lr), previous, 100, steps_done)
    assert caught.value.key == key and words in str(caught.value)


def test_step_zero_never_trains_at_lr_zero():
    schedule = ScheduleConfig(style="cosine", max_lr=ETA_MAX, min_lr=ETA_MIN, warmup=10)
    assert lr_at(schedule, 100, 0) == ETA_MAX / 10
    assert lr_at(schedule, 100, 9) == ETA_MAX


@pytest.mark.parametrize("style", ["cosine", "linear", "wsd", "infinite_cosine"])
def test_lr_never_climbs_back_past_the_end(style):
    schedule = ScheduleConfig(style=style, max_lr=ETA_MAX, min_lr=ETA_MIN, const_lr=ETA_CONST, warmup=5,
                              decay_steps=50 if style in ("cosine", "linear") else None)
    lrs = [lr_at(schedule, 100, t) for t in range(5, 400)]
    assert all(later <= earlier + 1e-18 for earlier, later in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(ETA_MIN, abs=1e-15)


def test_infinite_without_anneal_holds_const_lr_forever():
    schedule = ScheduleConfig(style="infinite_cosine", max_lr=ETA_MAX, min_lr=ETA_MIN, const_lr=ETA_CONST,
                              constant_end=1.0)
    assert lr_at(schedule, 100, 99) == lr_at(schedule, 100, 500) == ETA_CONST


# ------------------------------------------------------------------------------ meta schedules


@pytest.mark.parametrize("tau", [0, 1, 2, 5])
def test_autoregressive_cosine_peak_matches_fomo_formula(tau):
    T, W = 100, 10
    schedule = ScheduleConfig(style="cosine", max_lr=ETA_MAX, min_lr=ETA_MIN, warmup=W, meta="autoregressive_cosine")
    peak = ETA_MIN + (ETA_MAX - ETA_MIN) * (1 + math.cos(math.pi * (tau * (T - W) + 1) / ((tau + 1) * (T - W)))) / 2
    assert abs(meta_peak(schedule, T, tau) - peak) <= 1e-12
    assert_matches(schedule, T, lambda t: expected_lr("cosine", t, T, W, peak=peak), stage_index=tau)


@pytest.mark.parametrize("tau", [0, 1, 3])
def test_autoregressive_rsqrt_peak_matches_fomo_formula(tau):
    T, W = 100, 10
    schedule = ScheduleConfig(style="wsd", max_lr=ETA_MAX, min_lr=ETA_MIN, warmup=W, meta="autoregressive_rsqrt",
                              decay_shape="linear")
    peak = ETA_MIN + math.sqrt((tau + 1) * W / (tau * T + W)) * (ETA_MAX - ETA_MIN)
    assert abs(meta_peak(schedule, T, tau) - peak) <= 1e-12
    assert_matches(schedule, T, lambda t: expected_lr("wsd", t, T, W, S=80, shape="linear", peak=peak), stage_index=tau)


def test_later_stages_peak_lower():
    schedule = ScheduleConfig(style="cosine", max_lr=ETA_MAX, min_lr=ETA_MIN, warmup=10, meta="autoregressive_rsqrt")
    peaks = [meta_peak(schedule, 100, tau) for tau in range(5)]
    assert peaks[0] == pytest.approx(ETA_MAX, abs=1e-15) and all(b < a for a, b in zip(peaks, peaks[1:]))


# ------------------------------------------------------------------------------ the scheduler object


def make_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    groups = [{"params": model[0].parameters()}, {"params": model[1].parameters(), "weight_decay": 0.0}]
    return model, torch.optim.AdamW(groups, lr=123.0, weight_decay=0.1)


def train_step(model, optimizer, scheduler, seed):
    torch.manual_seed(1000 + seed)
    loss = model(torch.randn(16, 4)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


def save_and_load(state):
    """A round trip through a file, as a checkpoint does (a loaded optimizer would share tensors otherwise)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


COSINE = ScheduleConfig(style="cosine", max_lr=1e-3, min_lr=1e-4, warmup=3)
CONSTANT_HIGH = ScheduleConfig(style="constant", max_lr=5e-2, min_lr=0.0)


def test_param_groups_hold_the_schedule_lr_after_every_step():
    model, optimizer = make_optimizer()
    scheduler = StageScheduler(optimizer, COSINE, steps=20)
    assert [g["lr"] for g in optimizer.param_groups] == [lr_at(COSINE, 20, 0)] * 2
    for step in range(20):
        train_step(model, optimizer, scheduler, step)
        assert scheduler.t == step + 1
        assert scheduler.get_last_lr() == [lr_at(COSINE, 20, step + 1)] * 2


def test_loaded_optimizer_lr_cannot_override_the_schedule():
    """Megatron-LM's bug: a loaded optimizer state carries its old LR. The next update must use the schedule's."""
    model_a, optimizer_a = make_optimizer()
    scheduler_a = StageScheduler(optimizer_a, CONSTANT_HIGH, steps=10)
    for step in range(3):
        train_step(model_a, optimizer_a, scheduler_a, step)
    saved_params, saved_optimizer = save_and_load((model_a.state_dict(), optimizer_a.state_dict()))
    assert saved_optimizer["param_groups"][0]["lr"] == 5e-2

    # A new stage: fresh scheduler under another schedule, then the old optimizer state is loaded.
    model_b, optimizer_b = make_optimizer()
    model_b.load_state_dict(saved_params)
    scheduler_b = StageScheduler(optimizer_b, COSINE, steps=20, stage_index=1)
    optimizer_b.load_state_dict(save_and_load(saved_optimizer))
    assert optimizer_b.param_groups[0]["lr"] == 5e-2  # what the checkpoint says ...
    train_step(model_b, optimizer_b, scheduler_b, 3)

    # ... but the update used the schedule's LR for t = 0: compare with AdamW given that LR by hand.
    model_ref, optimizer_ref = make_optimizer()
    model_ref.load_state_dict(saved_params)
    optimizer_ref.load_state_dict(save_and_load(saved_optimizer))
    for group in optimizer_ref.param_groups:
        group["lr"] = lr_at(COSINE, 20, 0)
    torch.manual_seed(1003)
    loss = model_ref(torch.randn(16, 4)).pow(2).mean()
    loss.backward()
    optimizer_ref.step()
    for name, value in model_b.state_dict().items():
        assert torch.equal(value, model_ref.state_dict()[name]), name
    assert [g["lr"] for g in optimizer_b.param_groups] == [lr_at(COSINE, 20, 1)] * 2


def test_resume_continues_the_stage_at_the_saved_t():
    model, optimizer = make_optimizer()
    scheduler = StageScheduler(optimizer, COSINE, steps=20, stage_index=2)
    for step in range(7):
        train_step(model, optimizer, scheduler, step)
    state = json.loads(json.dumps(scheduler.state_dict()))
    assert state == {"t": 7, "stage_index": 2, "steps": 20, "schedule": COSINE.model_dump(mode="json")}

    _, optimizer_resumed = make_optimizer()
    resumed = StageScheduler(optimizer_resumed, COSINE, steps=20)
    resumed.load_state_dict(state)
    assert (resumed.t, resumed.stage_index) == (7, 2)
    assert resumed.get_lr() == [lr_at(COSINE, 20, 7, stage_index=2)] * 2


def test_resume_keeps_the_current_config_when_steps_changed():
    _, optimizer = make_optimizer()
    longer = StageScheduler(optimizer, COSINE, steps=40)
    longer.load_state_dict({"t": 7, "stage_index": 0, "steps": 20, "schedule": COSINE.model_dump(mode="json")})
    assert longer.current_lr() == lr_at(COSINE, 40, 7)


def test_new_stage_starts_at_t_zero_and_rewarms():
    _, optimizer = make_optimizer()
    scheduler = StageScheduler(optimizer, COSINE, steps=20, stage_index=1)
    assert scheduler.t == 0
    assert scheduler.current_lr() == COSINE.max_lr / 3


@pytest.mark.parametrize("state",
                         [{}, {"t": -1, "stage_index": 0}, {"t": 3, "stage_index": "1"}, {"t": 2.5, "stage_index": 0}])
def test_malformed_scheduler_state_is_a_user_error(state):
    _, optimizer = make_optimizer()
    with pytest.raises(UserError, match="scheduler state"):
        StageScheduler(optimizer, COSINE, steps=20).load_state_dict(state)


def test_scheduler_is_not_callable_so_deepspeed_uses_it_as_is():
    _, optimizer = make_optimizer()
    assert not callable(StageScheduler(optimizer, COSINE, steps=20))


# ------------------------------------------------------------------------------ bad input


def raw_config(run_dir, steps=100, **schedule):
    return {
        "run_dir": str(run_dir),
        "model": {"preset": "tiny"},
        "data": {"sources": [{"name": "a", "prefix": "data/a"}]},
        "train": {"steps": steps, "global_batch_size": 8},
        "schedule": schedule,
    }


BAD_SCHEDULES = [
    ("schedule.style", {"style": "cosin"}),
    ("schedule.min_lr", {"max_lr": 1e-4, "min_lr": 1e-3}),
    ("schedule.warmup", {"warmup": 100}),
    ("schedule.warmup", {"warmup": 1.0}),
    ("schedule.warmup", {"style": "inverse_sqrt", "warmup": 0}),
    ("schedule.decay_steps", {"warmup": 10, "decay_steps": 10}),
    ("schedule.decay_fraction", {"style": "wsd", "decay_fraction": 0.001}),
    ("schedule.decay_fraction", {"style": "wsd", "warmup": 50, "decay_fraction": 0.6}),
    ("schedule.constant_end", {"style": "infinite_cosine", "const_lr": 1e-4, "cooldown_end": 0.7, "constant_end": 0.6}),
    ("schedule.cooldown_end", {"style": "infinite_cosine", "const_lr": 1e-4, "warmup": 20, "cooldown_end": 0.1}),
    ("schedule.const_lr", {"style": "infinite_inv_sqrt"}),
    ("schedule.const_lr", {"style": "infinite_cosine", "max_lr": 1e-4, "const_lr": 2e-4}),
    ("schedule.min_lr", {"style": "infinite_cosine", "const_lr": 1e-4, "min_lr": 0.0}),
    ("schedule.rewarm", {"style": "cosine", "rewarm": False}),
    ("schedule.rewarm", {"style": "infinite_cosine", "const_lr": 1e-4, "warmup": 5, "rewarm": False}),
    ("schedule.meta", {"style": "infinite_cosine", "const_lr": 1e-4, "rewarm": False, "meta": "autoregressive_cosine"}),
    ("schedule.min_lr", {"style": "infinite_inv_sqrt", "const_lr": 1e-4, "rewarm": False, "constant_end": 0}),
]


def config_error(raw) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        config = validate_config(raw)
        check_schedule(config.schedule, config.train.steps)
    return caught.value


@pytest.mark.parametrize("key,schedule", BAD_SCHEDULES)
def test_bad_schedule_names_the_key(tmp_path, key, schedule):
    error = config_error(raw_config(tmp_path, **schedule))
    assert error.key == key and key in str(error)


@pytest.mark.parametrize("key,schedule", BAD_SCHEDULES)
def test_cli_exits_2_on_a_bad_schedule(tmp_path, capsys, key, schedule):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw_config(tmp_path, **schedule)))
    assert cli_main(["schedule", str(path), "--csv", str(tmp_path / "lr.csv")]) == 2
    assert f"config key '{key}'" in capsys.readouterr().err
    assert not (tmp_path / "lr.csv").exists()


# ------------------------------------------------------------------------------ megacpt schedule


def write_config(tmp_path, **schedule) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw_config(tmp_path, steps=50, **schedule)))
    return path


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ["step", "stage", "lr"]
    return [(int(step), int(stage), float(lr)) for step, stage, lr, *_ in rows[1:]]


def test_cli_writes_every_step_of_the_stage(tmp_path):
    config = write_config(tmp_path, style="wsd", warmup=5, max_lr=ETA_MAX, min_lr=ETA_MIN)
    assert cli_main(["schedule", str(config), "--csv", str(tmp_path / "lr.csv"), "--plot",
                     str(tmp_path / "lr.png")]) == 0
    schedule = validate_config(json.loads(config.read_text())).schedule
    assert read_csv(tmp_path / "lr.csv") == [(t, 0, lr_at(schedule, 50, t)) for t in range(50)]
    assert (tmp_path / "lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_applies_overrides_and_stage_index(tmp_path):
    config = write_config(tmp_path, style="cosine", warmup=5, meta="autoregressive_rsqrt")
    argv = ["schedule", str(config), "--csv", str(tmp_path / "lr.csv"), "--set", "train.steps=30", "--set",
            "schedule.max_lr=1e-3", "--stage-index", "2"]
    assert cli_main(argv) == 0
    rows = read_csv(tmp_path / "lr.csv")
    schedule = ScheduleConfig(style="cosine", warmup=5, meta="autoregressive_rsqrt", max_lr=1e-3)
    assert rows == [(t, 2, lr_at(schedule, 30, t, stage_index=2)) for t in range(30)]


def test_cli_does_not_import_torch(tmp_path):
    config = write_config(tmp_path, style="cosine", warmup=5)
    code = (
        "import sys; from megacpt.cli import main; "
        f"rc = main(['schedule', {str(config)!r}, '--csv', {str(tmp_path / 'lr.csv')!r}]); "
        "assert rc == 0 and 'torch' not in sys.modules and 'deepspeed' not in sys.modules, sorted(sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_cli_plots_a_chain_of_stages_and_checks_each_link(tmp_path, capsys):
    infinite = {"style": "infinite_cosine", "max_lr": ETA_MAX, "min_lr": ETA_MIN, "const_lr": ETA_CONST}
    chain = [({**infinite, "warmup": 5, "constant_end": 1.0}, 50),
             ({**infinite, "rewarm": False, "constant_end": 1.0}, 40),
             ({**infinite, "rewarm": False, "constant_end": 0.0}, 10)]
    paths = []
    for k, (schedule, steps) in enumerate(chain):
        paths.append(tmp_path / f"s{k}.json")
        paths[-1].write_text(json.dumps(raw_config(tmp_path, steps=steps, **schedule)))
    argv = ["schedule", *map(str, paths), "--csv", str(tmp_path / "lr.csv"), "--plot", str(tmp_path / "lr.png")]
    assert cli_main(argv) == 0
    expected = [(k, lr_at(ScheduleConfig(**schedule), steps, t, k))
                for k, (schedule, steps) in enumerate(chain) for t in range(steps)]
    assert read_csv(tmp_path / "lr.csv") == [(step, k, lr) for step, (k, lr) in enumerate(expected)]
    rows = read_csv(tmp_path / "lr.csv")
    assert rows[50][2] == rows[89][2] == ETA_CONST  # the second stage holds eta_const from its first step
    assert rows[90][2] == ETA_CONST and rows[-1][2] == pytest.approx(ETA_CONST * (ETA_MIN / ETA_CONST) ** 0.9)
    assert (tmp_path / "lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert cli_main(["schedule", str(paths[2]), str(paths[1]), "--csv", str(tmp_path / "bad.csv")]) == 2
    assert "schedule.rewarm" in capsys.readouterr().err and not (tmp_path / "bad.csv").exists()
