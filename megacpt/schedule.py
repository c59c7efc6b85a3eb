"""LR schedules for one stage of continual pretraining, and the scheduler object DeepSpeed steps.

The LR is a pure function of the schedule config, the stage length T, the 0-based step t within the stage
and the stage index tau: a schedule can be plotted without a model, tested against its formulas and resumed
from t alone. `StageScheduler` is the only thing that writes an LR into the optimizer, and it does so right
before every optimizer step, so an LR stored in a loaded optimizer state can never override the schedule
(Megatron-LM's bug). This module imports neither torch nor DeepSpeed. Formulas: docs/SCHEDULES.md.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

from megacpt.config import ScheduleConfig
from megacpt.errors import ConfigError, UserError

if TYPE_CHECKING:
    from torch.optim import Optimizer

INFINITE_STYLES = ("infinite_cosine", "infinite_inv_sqrt")


def fraction_to_steps(fraction: float, steps: int) -> int:
    """`fraction` of `steps` rounded half up, so 0.5 x 5 is 3 (Python's round() would give 2)."""
    return math.floor(fraction * steps + 0.5)


def warmup_steps(schedule: ScheduleConfig, steps: int) -> int:
    """W: `schedule.warmup` as steps (an int is steps, a float a fraction of T)."""
    if isinstance(schedule.warmup, float):
        return fraction_to_steps(schedule.warmup, steps)
    return schedule.warmup


def decay_end(schedule: ScheduleConfig, steps: int) -> int:
    """D for cosine/linear: the step where the decay reaches min_lr (default T)."""
    return steps if schedule.decay_steps is None else schedule.decay_steps


def cooldown_start(schedule: ScheduleConfig, steps: int) -> int:
    """S for wsd: the first step of the cooldown, T - round(decay_fraction x T)."""
    return steps - fraction_to_steps(schedule.decay_fraction, steps)


def infinite_phase_ends(schedule: ScheduleConfig, steps: int) -> tuple[int, int]:
    """(C, A) for infinite_*: the steps where the cooldown and the constant phase end (C = 0 without a re-warm)."""
    cooldown_end = fraction_to_steps(schedule.cooldown_end, steps) if schedule.rewarm else 0
    return cooldown_end, fraction_to_steps(schedule.constant_end, steps)


def check_continuation(schedule: ScheduleConfig, previous: ScheduleConfig | None, previous_steps: int,
                       steps_done: int) -> None:
    """Raise ConfigError unless `schedule` (rewarm false) can continue the constant phase of the stage before.

    `previous` is the schedule of the checkpoint's stage (None for fresh weights or imported ones), which ran
    `steps_done` of its `previous_steps` steps. The constant phase goes on only if that stage ran an infinite
    schedule and stopped before its anneal, and only at the same const_lr.
    """
    if schedule.rewarm:
        return
    if previous is None:
        raise ConfigError("schedule.rewarm", "false continues the constant phase of the checkpoint's infinite "
                          "schedule, but there is no checkpoint stage to continue (fresh or imported weights); set it "
                          "to true")
    if previous.style not in INFINITE_STYLES:
        raise ConfigError("schedule.rewarm", f"false continues an infinite schedule, but the checkpoint's stage ran "
                          f"'{previous.style}'; set it to true to re-warm")
    anneal_start = infinite_phase_ends(previous, previous_steps)[1]
    if steps_done > anneal_start:
        raise ConfigError("schedule.rewarm", f"false continues a constant phase, but the checkpoint's stage had "
                          f"started its anneal at step {anneal_start} and stopped at step {steps_done}; branch from a "
                          f"checkpoint saved at step {anneal_start} or earlier, or set it to true")
    if schedule.const_lr != previous.const_lr:
        raise ConfigError("schedule.const_lr", f"{schedule.const_lr} differs from the checkpoint's constant LR "
                          f"{previous.const_lr}; with schedule.rewarm false the stage continues at that LR")


def meta_peak(schedule: ScheduleConfig, steps: int, stage_index: int) -> float:
    """The peak LR of stage tau under the FoMo-in-Flux meta schedule; max_lr without one.

    Later stages re-warm to a lower peak so that they forget less. Autoregressive cosine takes the value a
    single cosine over all stages so far would have one step into this stage; at tau = 0 that is just below
    max_lr (exactly min_lr when T - W = 1), as in the paper's formula.
    """
    if stage_index < 0:
        raise ValueError(f"stage_index must be >= 0, got {stage_index}")
    if schedule.meta is None:
        return schedule.max_lr
    warmup = warmup_steps(schedule, steps)
    if schedule.meta == "autoregressive_cosine":
        decay = steps - warmup
        progress = (stage_index * decay + 1) / ((stage_index + 1) * decay)
        return _between(schedule.min_lr, schedule.max_lr, _cosine_shape(progress))
    return _between(schedule.min_lr, schedule.max_lr,
                    math.sqrt((stage_index + 1) * warmup / (stage_index * steps + warmup)))


def lr_at(schedule: ScheduleConfig, steps: int, t: int, stage_index: int = 0) -> float:
    """The LR of step t (0-based, within the stage) of a stage of T = `steps` steps.

    Warmup is linear and ends at the peak on step W - 1, so step 0 never trains at LR 0. Steps past the
    stage's end (t >= T) keep the final phase: decays stay at min_lr and never climb back. Call
    `check_schedule` once first; this function assumes a schedule that passed it.
    """
    if t < 0:
        raise ValueError(f"t must be >= 0, got {t}")
    peak = meta_peak(schedule, steps, stage_index)
    warmup = warmup_steps(schedule, steps)
    if t < warmup:
        return peak * (t + 1) / warmup
    return _AFTER_WARMUP[schedule.style](schedule, steps, t, warmup, peak)


def check_schedule(schedule: ScheduleConfig, steps: int) -> None:
    """Raise ConfigError for a schedule that cannot run for T = `steps` (what ScheduleConfig cannot check alone)."""
    warmup = warmup_steps(schedule, steps)
    if warmup >= steps:
        raise ConfigError("schedule.warmup", f"{warmup} warmup steps must be fewer than train.steps ({steps})")
    if warmup == 0 and (schedule.style == "inverse_sqrt" or schedule.meta == "autoregressive_rsqrt"):
        raise ConfigError("schedule.warmup", "must be > 0 for inverse_sqrt and autoregressive_rsqrt: they scale the LR "
                                             "by sqrt(W / ...), which is 0 when W = 0")
    if schedule.style in ("cosine", "linear") and decay_end(schedule, steps) <= warmup:
        raise ConfigError("schedule.decay_steps",
                          f"{decay_end(schedule, steps)} must be larger than the {warmup} warmup steps")
    if schedule.style == "wsd":
        start = cooldown_start(schedule, steps)
        if start == steps:
            raise ConfigError("schedule.decay_fraction",
                              f"{schedule.decay_fraction} x train.steps ({steps}) rounds to 0 cooldown steps")
        if start < warmup:
            raise ConfigError("schedule.decay_fraction",
                              f"the cooldown would start at step {start}, before the {warmup} warmup steps end")
    if schedule.style in INFINITE_STYLES:
        cooldown_end, constant_end = infinite_phase_ends(schedule, steps)
        if cooldown_end < warmup:
            raise ConfigError("schedule.cooldown_end",
                              f"the cooldown would end at step {cooldown_end}, before the {warmup} warmup steps end")
        if constant_end < steps and schedule.min_lr == 0:
            raise ConfigError("schedule.min_lr",
                              "must be > 0 when an infinite schedule anneals (constant_end < 1): the anneal is "
                              "geometric, const_lr x (min_lr / const_lr) ** p")


# ------------------------------------------------------------------------------ the phases after warmup
# Each takes (schedule, T, t, W, peak) for t >= W.


def _between(start: float, end: float, fraction: float) -> float:
    return start + (end - start) * fraction


def _progress(t: int, start: int, end: int) -> float:
    """Where t lies between start and end, clamped to [0, 1] so that a finished decay stays finished."""
    return min(max((t - start) / (end - start), 0.0), 1.0)


def _cosine_shape(p: float) -> float:
    return (1 + math.cos(math.pi * p)) / 2


def _h(x: float, alpha: float) -> float:
    """h of the inverse-sqrt cooldown, 1 / sqrt(1 + alpha x) - 1; h(u) / h(1) runs from 0 to 1, steep early."""
    return 1 / math.sqrt(1 + alpha * x) - 1


# Fraction of the way from min_lr to the peak, for progress p through a decay (also the cosine/linear styles).
DECAY_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda p: 1 - p,
    "cosine": _cosine_shape,
    "1-sqrt": lambda p: 1 - math.sqrt(p),
}


def _constant(schedule: ScheduleConfig, steps: int, t: int, warmup: int, peak: float) -> float:
    return peak


def _cosine_or_linear(schedule: ScheduleConfig, steps: int, t: int, warmup: int, peak: float) -> float:
    p = _progress(t, warmup, decay_end(schedule, steps))
    return _between(schedule.min_lr, peak, DECAY_SHAPES[schedule.style](p))


def _inverse_sqrt(schedule: ScheduleConfig, steps: int, t: int, warmup: int, peak: float) -> float:
    return max(schedule.min_lr, peak * math.sqrt(warmup / (t + 1)))


def _wsd(schedule: ScheduleConfig, steps: int, t: int, warmup: int, peak: float) -> float:
    start = cooldown_start(schedule, steps)
    if t < start:
        return peak
    return _between(schedule.min_lr, peak, DECAY_SHAPES[schedule.decay_shape](_progress(t, start, steps)))


def _infinite(schedule: ScheduleConfig, steps: int, t: int, warmup: int, peak: float) -> float:
    """Ibrahim et al.'s infinite schedules: cooldown to const_lr, hold it, then (unless constant_end = 1) anneal."""
    cooldown_end, constant_end = infinite_phase_ends(schedule, steps)
    const = schedule.const_lr
    if t < cooldown_end:
        u = (t - warmup) / (cooldown_end - warmup)
        if schedule.style == "infinite_cosine":
            return _between(const, peak, _cosine_shape(u))
        return _between(peak, const, _h(u, schedule.timescale) / _h(1, schedule.timescale))
    if t < constant_end or constant_end == steps:
        return const
    return const * (schedule.min_lr / const) ** _progress(t, constant_end, steps)


_AFTER_WARMUP: dict[str, Callable[[ScheduleConfig, int, int, int, float], float]] = {
    "constant": _constant,
    "cosine": _cosine_or_linear,
    "linear": _cosine_or_linear,
    "inverse_sqrt": _inverse_sqrt,
    "wsd": _wsd,
    "infinite_cosine": _infinite,
    "infinite_inv_sqrt": _infinite,
}


# ---------------------------------------------------------------------------------- the scheduler object


class StageScheduler:
    """Sets every param group's LR to `lr_at(t)`; pass it to `deepspeed.initialize(lr_scheduler=...)`.

    `t` counts the optimizer steps taken in this stage; DeepSpeed calls `step()` after each one. The LR is
    written on creation, after every `step()` and `load_state_dict()`, and by a step pre-hook right before
    every `optimizer.step()`: loading an optimizer state (which carries its old LR) between two steps cannot
    change the LR that the next update uses. The object is deliberately not callable, since DeepSpeed would
    take a callable for a factory (pass `functools.partial(StageScheduler, schedule=..., steps=...)` when
    DeepSpeed builds the optimizer from its config).
    """

    def __init__(self, optimizer: Optimizer, schedule: ScheduleConfig, steps: int, stage_index: int = 0,
                 lr_factor: Callable[[int], float] | None = None):
        check_schedule(schedule, steps)
        self.optimizer = optimizer
        self.schedule = schedule
        self.steps = steps
        self.stage_index = stage_index
        self.t = 0
        # step (1-based) -> multiplier of its LR: lowered for some steps after a loss-spike rollback
        self.lr_factor = lr_factor or (lambda step: 1.0)
        optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: self.apply())
        self.apply()

    def current_lr(self) -> float:
        return lr_at(self.schedule, self.steps, self.t, self.stage_index) * self.lr_factor(self.t + 1)

    def apply(self) -> None:
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.t += 1
        self.apply()

    def get_lr(self) -> list[float]:
        """The LR every param group holds (the names torch's and DeepSpeed's schedulers use)."""
        return [group["lr"] for group in self.optimizer.param_groups]

    get_last_lr = get_lr

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: t and the stage index, plus T and the schedule for the record."""
        return {"t": self.t, "stage_index": self.stage_index, "steps": self.steps,
                "schedule": self.schedule.model_dump(mode="json")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the saved stage at its t. The current config's schedule and T stay in force: a resumed run
        may change them (e.g. more train.steps), and the saved ones are only a record."""
        t, stage_index = state.get("t"), state.get("stage_index")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (t, stage_index)):
            raise UserError("scheduler state in the checkpoint must hold integers t >= 0 and stage_index >= 0, got "
                            f"t={t!r}, stage_index={stage_index!r}")
        self.t = t
        self.stage_index = stage_index
        self.apply()
