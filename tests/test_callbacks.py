"""The loop's one extension point: a callback registered from outside the package sees every hook, in order,
across skipped updates and a loss-spike rollback (rewind)."""
from test_spikes import STEPS, _config, _spiky_data

from megacpt.config import load_config
from megacpt.train.callbacks import Callback, StepResult
from megacpt.train.trainer import train

from datagen import read_metrics


class Recorder(Callback):
    """Every hook call as (hook, step)."""

    def __init__(self):
        self.calls: list[tuple[str, int | None]] = []
        self.step = None

    def on_start(self, loop) -> None:
        self.calls.append(("on_start", loop.scheduler.t))

    def before_step(self, loop, step: int) -> None:
        self.step = step
        self.calls.append(("before_step", step))

    def after_backward(self, loop, loss) -> None:
        self.calls.append(("after_backward", self.step))

    def before_update(self, loop) -> str | None:
        self.calls.append(("before_update", self.step))
        return None

    def after_update(self, loop) -> None:
        self.calls.append(("after_update", self.step))

    def after_step(self, loop, result: StepResult) -> None:
        assert result.step == self.step
        self.calls.append(("after_step", result.step))

    def rewind(self, loop, step: int) -> None:
        self.calls.append(("rewind", step))

    def close(self) -> None:
        self.calls.append(("close", None))


def expected_calls(applied: set[int], rollback_at: int, back_to: int, skipped_again: set[int]) -> list[tuple]:
    """The hooks a callback after megacpt's own sees: a skipped update is decided by an earlier gate (spikes),
    so this one is not asked; the rollback rewinds before this callback's after_step of that step."""
    calls = [("on_start", 0)]

    def step(s: int, applies: bool, rolls_back: bool = False) -> None:
        calls.extend([("before_step", s), ("after_backward", s)])
        if applies:
            calls.extend([("before_update", s), ("after_update", s)])
        calls.append(("rewind", back_to) if rolls_back else ("after_step", s))

    for s in range(1, rollback_at + 1):
        step(s, s in applied, rolls_back=s == rollback_at)
    for s in range(back_to + 1, STEPS + 1):
        step(s, s not in skipped_again)
    return calls + [("close", None)]


def test_a_callback_from_outside_sees_every_hook_in_order_including_a_rewind(tmp_path):
    (tmp_path / "data").mkdir()
    prefix = _spiky_data(tmp_path / "data", 13, 15)
    recorder = Recorder()
    train(load_config(_config(tmp_path, prefix)), extra_callbacks=[recorder])
    rollback = next(r for r in read_metrics(tmp_path / "run") if r.get("event") == "rollback")
    assert (rollback["at_step"], rollback["step"], rollback["spiked_steps"]) == (15, 10, [13, 14, 15])
    assert recorder.calls == expected_calls(applied=set(range(1, 13)), rollback_at=15, back_to=10,
                                            skipped_again={13, 14, 15})
