"""Loss laws with LR annealing: the formulas, constants recovered from synthetic curves, `megacpt predict`."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from megacpt.checkpoint import tags as checkpoint
from megacpt.cli import main
from megacpt.config import ScheduleConfig
from megacpt.prediction.loss_curves import run_curve
from megacpt.prediction.losslaw import LrLossCurve, annealing_area, area, effective_lrs, fit, predict
from megacpt.run_dir import checkpoint_dir
from megacpt.schedule import lr_at

from datagen import trained_stage, write_state


def schedule_lrs(style: str, steps: int, max_lr: float = 1e-3, min_lr: float = 1e-4, warmup: int = 20,
                 **keys) -> np.ndarray:
    schedule = ScheduleConfig(style=style, max_lr=max_lr, min_lr=min_lr, warmup=warmup, **keys)
    return np.array([lr_at(schedule, steps, t) for t in range(steps)])


def noisy(law: str, truth: dict, curve: LrLossCurve, noise: float, rng: np.random.Generator) -> LrLossCurve:
    clean = predict(law, truth, curve)
    return LrLossCurve(curve.lrs, curve.steps, clean * (1 + noise * rng.standard_normal(len(clean))), curve.shift_start,
                       curve.replay)


def assert_within(found: dict, truth: dict, tolerance: float) -> None:
    errors = {k: (found[k] - v) / v for k, v in truth.items()}
    assert all(abs(e) < tolerance for e in errors.values()), {k: f"{e:+.3f}" for k, e in errors.items()}


# ------------------------------------------------------------------------------------------ the formulas


def test_warmup_counts_at_peak_and_s2_follows_the_momentum_recursion():
    lrs = schedule_lrs("cosine", 50, warmup=5)
    eff = effective_lrs(LrLossCurve(lrs, np.arange(1, 51)))
    assert np.all(eff[:5] == 1e-3) and np.array_equal(eff[5:], lrs[5:])
    assert area(eff, np.array([3, 50]))[0] == pytest.approx(3e-3)
    m, s2 = 0.0, []
    for i in range(50):
        m = 0.999 * m + (eff[i - 1] - eff[i] if i else 0.0)
        s2.append((s2[-1] if s2 else 0.0) + m)
    assert np.allclose(annealing_area(eff, np.arange(1, 51)), s2, rtol=1e-12, atol=1e-15)


def test_a_rewarm_makes_the_tissue_law_predict_a_loss_bump():
    lrs = np.concatenate([schedule_lrs("cosine", 2000), schedule_lrs("cosine", 300, warmup=20)])
    loss = predict("tissue", {"L0": 2.0, "A": 0.5, "alpha": 0.5, "C": 1.0}, LrLossCurve(lrs, np.arange(1, 2301)))
    before, bump = loss[1999], loss[2000:].max()
    assert bump > before + 0.02  # the negative momentum of the re-warm outweighs the extra LR area for a while
    assert loss[-1] < before  # and the second decay ends lower


def test_the_laws_on_a_schedule_worked_by_hand():
    """Six steps: a warmup step at 0.5, two at the peak 1.0, two at 0.6, one at 0.2 (LR units)."""
    lrs = np.array([0.5, 1.0, 1.0, 0.6, 0.6, 0.2])
    curve = LrLossCurve(lrs, np.array([3, 6]))
    # tissue: the warmup step counts at the peak, so S1 = 1+1+1 = 3 and 3+0.6+0.6+0.2 = 4.4; the momentum is
    # m = 0, 0, 0, 0.4, 0.999*0.4 = 0.3996, 0.999*0.3996 + 0.4 = 0.7992004, so S2(3) = 0, S2(6) = 1.5988004.
    tissue = {"L0": 2.0, "A": 0.5, "alpha": 0.5, "C": 0.1}
    expected = [2 + 0.5 * 3 ** -0.5, 2 + 0.5 * 4.4 ** -0.5 - 0.1 * 1.5988004]
    assert predict("tissue", tissue, curve) == pytest.approx(expected, rel=1e-12)
    # multipower: S1 + S_W is the real area, 0.5+1+1 = 2.5 and 3.9; LD(3) = 0, and at 6 the drops are 0.4 at
    # step 4 (S_4(6) = 0.6+0.6+0.2 = 1.4, eta_4 = 0.6) and 0.4 at step 6 (S_6(6) = 0.2, eta_6 = 0.2).
    mp = {"L0": 2.0, "A": 0.5, "alpha": 0.5, "B": 3.0, "C": 2.0, "beta": 0.5, "gamma": 0.5}

    def g(x):
        return 1 - (2.0 * x + 1) ** -0.5

    ld = 3.0 * (0.4 * g(0.6 ** -0.5 * 1.4) + 0.4 * g(0.2 ** -0.5 * 0.2))
    assert predict("multipower", mp, curve) == pytest.approx([2 + 0.5 * 2.5 ** -0.5, 2 + 0.5 * 3.9 ** -0.5 - ld],
                                                             rel=1e-12)
    # cpt: the stage on new data starts at step 4 (0-based 3), so S1_cpt(6) = 1.4; replay 0.25 with kappa 2.
    cpt = {**tissue, "B": 0.3, "E": 2.0, "beta": 0.7, "kappa": 2.0}
    shifted = LrLossCurve(lrs, np.array([3, 6]), shift_start=3, replay=0.25)
    expected[1] += 0.3 * 0.75 ** 2 * (1 - (1 + 2.0 * 1.4) ** -0.7)
    assert predict("cpt", cpt, shifted) == pytest.approx(expected, rel=1e-12)


def multipower_by_the_paper(warmup: list[float], eta: list[float], t: int, c: dict) -> float:
    """Luo et al. 2025, eq. (the multi-power law) written out: eta[0] is the peak the warmup ends at, eta[1..t]
    the LRs of the t steps after it; L(t) = L0 + A (S1(t) + S_W)^-alpha - LD(t),
    LD(t) = B sum_{k=1..t} (eta_(k-1) - eta_k) G(eta_k^-gamma S_k(t)), S_k(t) = sum_{tau=k..t} eta_tau,
    G(x) = 1 - (C x + 1)^-beta."""
    s1 = sum(eta[1:t + 1])
    ld = 0.0
    for k in range(1, t + 1):
        s_k = sum(eta[k:t + 1])
        ld += (eta[k - 1] - eta[k]) * (1 - (c["C"] * eta[k] ** -c["gamma"] * s_k + 1) ** -c["beta"])
    return c["L0"] + c["A"] * (s1 + sum(warmup)) ** -c["alpha"] - c["B"] * ld


def tissue_by_the_paper(eta: list[float], warmup: int, s: int, c: dict, lam: float = 0.999) -> float:
    """Tissue et al. 2024: L(s) = L0 + A S1^-alpha - C S2, S1 = sum eta_i, S2 = sum m_i,
    m_i = lam m_(i-1) + (eta_(i-1) - eta_i); the warmup steps count as if the LR were already eta_max."""
    eta = [max(eta[:warmup + 1])] * warmup + list(eta[warmup:])
    m = s2 = 0.0
    for i in range(s):
        m = lam * m + (eta[i - 1] - eta[i] if i else 0.0)
        s2 += m
    return c["L0"] + c["A"] * sum(eta[:s]) ** -c["alpha"] - c["C"] * s2


def test_multipower_and_tissue_equal_the_papers_formulas_on_a_cosine_run():
    """100 warmup steps to 3e-4, 400 cosine steps to 3e-5, then a step decay to 1e-5: with the 400M constants
    of Luo et al. the law equals the paper's sum at every step; the tissue law its momentum recursion."""
    warmup = [3e-4 * (i + 1) / 100 for i in range(100)]
    after = [3e-5 + (3e-4 - 3e-5) * (1 + math.cos(math.pi * t / 400)) / 2 for t in range(1, 401)] + [1e-5] * 100
    lrs = np.array(warmup + after)
    steps = np.arange(100, 601, 25)
    paper = {"L0": 2.375, "A": 0.654, "alpha": 0.429, "B": 523.4, "C": 2.025, "beta": 0.594, "gamma": 0.635}
    expected = [multipower_by_the_paper(warmup, [3e-4] + after, int(n) - 100, paper) for n in steps]
    assert predict("multipower", paper, LrLossCurve(lrs, steps)) == pytest.approx(expected, rel=1e-10)
    tissue = {"L0": 2.0, "A": 0.5, "alpha": 0.5, "C": 300.0}
    expected = [tissue_by_the_paper(list(lrs), 99, int(n), tissue) for n in steps]
    assert predict("tissue", tissue, LrLossCurve(lrs, steps)) == pytest.approx(expected, rel=1e-10)


def test_a_history_that_starts_flat_has_no_warmup_to_hold_at_the_peak():
    """A constant stage and then a re-warm: the re-warm is no first warmup, the constant LRs stay as they were."""
    lrs = np.array([1e-4] * 5 + [2e-4, 3e-4, 2e-4])
    assert np.array_equal(effective_lrs(LrLossCurve(lrs, np.arange(1, 9))), lrs)


# ---------------------------------------------------------------------- recovering known constants


def test_tissue_fit_recovers_its_constants_within_5_percent():
    truth = {"L0": 2.0, "A": 0.5, "alpha": 0.5, "C": 0.5}
    rng = np.random.default_rng(1)
    steps = np.arange(40, 1001, 10)
    curves = [noisy("tissue", truth, LrLossCurve(lrs, steps), 0.002, rng)
              for lrs in (schedule_lrs("cosine", 1000), schedule_lrs("wsd", 1000, decay_shape="linear"))]
    result = fit("tissue", curves)
    assert_within(result.constants, truth, 0.05)
    assert result.r2 > 0.999 and result.mae < 0.01 and result.points == 2 * len(steps)


def test_multipower_fit_recovers_its_constants_within_5_percent():
    """Step decays show the shape of G right after a drop; without them (or at 0.2% noise) C and beta trade
    off along a valley and scatter by 10-20% while L0, A, alpha, B and gamma stay within a few percent."""
    truth = {"L0": 2.0, "A": 0.5, "alpha": 0.5, "B": 500.0, "C": 2.0, "beta": 0.6, "gamma": 0.6}
    rng = np.random.default_rng(1)
    t = np.arange(600)
    constant = schedule_lrs("constant", 600)
    schedules = (schedule_lrs("cosine", 600), schedule_lrs("wsd", 600, decay_shape="linear"),
                 np.where(t < 200, constant, 1e-4), np.where(t < 150, constant, 3e-4))
    steps = np.arange(40, 601, 5)
    curves = [noisy("multipower", truth, LrLossCurve(lrs, steps), 0.0002, rng) for lrs in schedules]
    assert_within(fit("multipower", curves, starts=4).constants, truth, 0.05)


def test_cpt_fit_recovers_the_shift_term_and_the_replay_exponent_within_5_percent():
    truth = {"L0": 2.0, "A": 0.5, "alpha": 0.5, "C": 0.5, "B": 0.4, "E": 100.0, "beta": 0.7, "kappa": 1.5}
    rng = np.random.default_rng(1)
    pretrain = schedule_lrs("cosine", 600)
    steps = np.arange(40, 1001, 10)
    curves = [noisy("cpt", truth, LrLossCurve(np.concatenate([pretrain, schedule_lrs(style, 400, max_lr=5e-4)]), steps,
                                        shift_start=600, replay=replay), 0.002, rng)
              for style, replay in (("cosine", 0.0), ("cosine", 0.25), ("wsd", 0.0), ("wsd", 0.5))]
    result = fit("cpt", curves)
    assert result.fixed == ()
    assert_within(result.constants, truth, 0.05)


# ------------------------------------------------------------------------------- runs on disk, the CLI

TRUTH = {"L0": 2.0, "A": 0.5, "alpha": 0.5, "C": 0.5}


def write_run(run_dir: Path, lrs: np.ndarray, evals: dict[int, dict], stage: int = 0, init: str | None = None,
              log_interval: int = 1) -> None:
    """A metrics.jsonl as `megacpt train` writes it: stage_start, training records, evaluation records."""
    run_dir.mkdir(parents=True)
    records = [{"step": 0, "event": "stage_start", "stage": stage, "init": init}]
    for step in range(1, len(lrs) + 1):
        if step % log_interval == 0 or step == len(lrs):
            records.append({"step": step, "stage": stage, "lr": float(lrs[step - 1]), "loss": 3.0})
        if step in evals:
            records.append({"step": step, "stage": stage, "tokens": step * 256, "eval": evals[step]})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def run_config(run_dir: Path, schedule: dict, steps: int, source: str, init: str | None = None,
               replay: float = 0.0) -> dict:
    data = {"sources": [{"name": source, "prefix": f"/data/{source}"}]}
    if replay:
        data["replay"] = {"fraction": replay, "sources": [{"name": "old", "prefix": "/data/old"}]}
    raw = {"run_dir": str(run_dir), "model": {"preset": "tiny"}, "data": data, "schedule": schedule,
           "train": {"steps": steps, "global_batch_size": 4}}
    if init:
        raw["init"] = {"checkpoint": init}
    return raw


COSINE = {"style": "cosine", "max_lr": 1e-3, "min_lr": 1e-4, "warmup": 20}


def pretrain_run(tmp_path: Path, steps: int = 300) -> Path:
    """A 300-step cosine run whose 'val' losses follow the tissue law, with a checkpoint at its end."""
    run_dir = tmp_path / "pretrain"
    lrs = schedule_lrs("cosine", steps)
    eval_steps = np.arange(20, steps + 1, 20)
    losses = predict("tissue", TRUTH, LrLossCurve(lrs, eval_steps))
    write_run(run_dir, lrs, {int(s): {"val": float(v), "other": 9.0} for s, v in zip(eval_steps, losses)})
    raw = run_config(run_dir, COSINE, steps, "old")
    (run_dir / "config.json").write_text(json.dumps(raw))
    write_state(checkpoint_dir(run_dir) / checkpoint.tag_name(steps), steps, steps * 256,
                [trained_stage(0, run_dir, steps, schedule=COSINE, data=raw["data"])])
    return run_dir


def test_fit_on_a_run_directory_saves_the_constants_under_their_names(tmp_path, capsys):
    run_dir = pretrain_run(tmp_path)
    out = tmp_path / "fit.json"
    assert main(["predict", "--fit", str(run_dir), "--val", "val", "--output", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["law"] == "tissue" and saved["val"] == "val" and saved["points"] == 15
    assert set(saved["constants"]) == {"L0", "A", "alpha", "C"}
    assert_within(saved["constants"], TRUTH, 0.01)  # noise-free points
    assert "R^2" in capsys.readouterr().out


def test_predict_writes_each_planned_stage_and_its_final_loss(tmp_path, capsys):
    run_dir = pretrain_run(tmp_path)
    fit_file = tmp_path / "fit.json"
    assert main(["predict", "--fit", str(run_dir), "--val", "val", "--output", str(fit_file)]) == 0
    tag = str(checkpoint_dir(run_dir))
    configs = []
    for name, schedule in (("cos", COSINE), ("wsd", {**COSINE, "style": "wsd"})):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(run_config(tmp_path / name, schedule, 100, "old", init=tag)))
        configs.append(str(path))
    csv, png = tmp_path / "pred.csv", tmp_path / "pred.png"
    assert main(["predict", "--constants", str(fit_file), "--predict", *configs, "--csv", str(csv), "--plot",
                 str(png)]) == 0
    rows = csv.read_text().splitlines()
    assert rows[0] == "config,step,lr,loss" and len(rows) == 1 + 2 * 100
    assert png.stat().st_size > 0
    out = capsys.readouterr().out
    assert f"{configs[0]}: predicted final val loss" in out and f"{configs[1]}: predicted final val loss" in out
    expected = predict("tissue", TRUTH,
                       LrLossCurve(np.concatenate([schedule_lrs("cosine", 300), schedule_lrs("cosine", 100)]),
                                   np.array([400])))
    assert float(rows[100].split(",")[-1]) == pytest.approx(expected[0], abs=0.005)


def test_a_new_stage_continues_the_lr_history_of_the_run_it_started_from(tmp_path):
    pretrain = pretrain_run(tmp_path)
    tag = checkpoint_dir(pretrain) / checkpoint.tag_name(300)
    stage = tmp_path / "stage1"
    lrs = schedule_lrs("cosine", 100, max_lr=5e-4)
    write_run(stage, lrs, {50: {"val": 2.5}, 100: {"val": 2.4}}, stage=1, init=str(tag), log_interval=10)
    (stage / "config.json").write_text(json.dumps(run_config(stage, {**COSINE, "max_lr": 5e-4}, 100, "new",
                                                             replay=0.25)))
    curve = run_curve(stage, "val")
    assert np.allclose(curve.lrs, np.concatenate([schedule_lrs("cosine", 300), lrs]))  # every step, from config.json
    assert list(curve.steps) == [350, 400] and curve.shift_start == 300 and curve.replay == 0.25


def test_logged_lrs_that_contradict_the_config_are_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    write_run(run_dir, schedule_lrs("cosine", 100) * 2, {s: {"val": 3.0} for s in range(10, 101, 10)}, log_interval=10)
    (run_dir / "config.json").write_text(json.dumps(run_config(run_dir, COSINE, 100, "a")))
    assert main(["predict", "--fit", str(run_dir), "--val", "val"]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and "train.log_interval 1" in err and "Traceback" not in err


def test_a_validation_set_without_evaluation_records_is_refused(tmp_path, capsys):
    run_dir = pretrain_run(tmp_path)
    assert main(["predict", "--fit", str(run_dir), "--val", "german"]) == 2
    err = capsys.readouterr().err
    assert str(run_dir / "metrics.jsonl") in err and "'german'" in err and "other, val" in err


def test_too_few_points_to_fit_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "short"
    write_run(run_dir, schedule_lrs("cosine", 60), {s: {"val": 4.0 - s / 100} for s in (20, 40, 60)})
    assert main(["predict", "--fit", str(run_dir), "--val", "val", "--law", "multipower"]) == 2
    err = capsys.readouterr().err
    assert "'val'" in err and str(run_dir) in err and "at least 14" in err and "hold 3" in err


def test_the_cpt_law_needs_a_stage_on_new_data(tmp_path, capsys):
    assert main(["predict", "--fit", str(pretrain_run(tmp_path)), "--val", "val", "--law", "cpt"]) == 2
    assert "new data" in capsys.readouterr().err
