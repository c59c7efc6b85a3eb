"""`megacpt demo`: the corpora are clean and deterministic, and `--quick` runs end to end, then reuses its phases
and adds arms to a finished directory."""
import ast
import json
import time

import numpy
import pytest

from megacpt.config import TokenizerConfig, load_config
from megacpt.data.tokenizers import build_tokenizer
from megacpt.demo.configs import (
    ARCHS,
    ARMS,
    FULL,
    QUICK,
    REPLAY_SCHEDULE,
    STAGE0,
    DemoPaths,
    stage0_config,
    stage0_of,
    stage1_config,
)
from megacpt.demo.corpora import chunk, docstrings_text, is_validation, strip_code
from megacpt.demo.demo_command import check_reuse, pin_settings
from megacpt.errors import UserError

from launch import assert_ok, run_megacpt

SOURCE = '''"""Module docstring."""
import os  # a comment


class A:
    """Only a docstring."""


def f(x):
    """Docstring of f.

    More words.
    """
    # a comment line
    return "# not a comment"  # but this is
'''


def test_code_loses_docstrings_and_comments_but_stays_valid_python():
    code = strip_code(SOURCE, ast.parse(SOURCE))
    assert "docstring" not in code.lower() and "# a comment" not in code and "but this is" not in code
    assert '"# not a comment"' in code  # a '#' inside a string is not a comment
    assert "class A:\n    pass" in code
    ast.parse(code)


def test_prose_holds_the_docstrings_in_source_order():
    text = docstrings_text(ast.parse(SOURCE))
    assert text == "Module docstring.\n\nOnly a docstring.\n\nDocstring of f.\n\nMore words."


def test_chunks_stay_near_the_limit_and_lose_no_text():
    text = "\n\n".join(f"paragraph {i}\n" + "a line of words\n" * (i * 10) for i in range(20))
    pieces = chunk(text, max_chars=1000)
    assert len(pieces) > 1 and all(len(p) <= 1000 for p in pieces)
    assert "".join(pieces).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(" ", "")


def test_validation_split_is_a_stable_hash_of_the_text():
    texts = [f"document {i}" for i in range(2000)]
    chosen = [t for t in texts if is_validation(t)]
    assert 50 < len(chosen) < 150  # about 5%
    assert chosen == [t for t in texts if is_validation(t)]
    assert is_validation("document 0") == is_validation("document " + "0")


def test_unknown_or_repeated_arms_are_refused(tmp_path):
    for arms in ("rewarm,bogus", "rewarm,rewarm", "rewarm,"):
        result = run_megacpt(["demo", "--quick", "--arms", arms, "--workdir", str(tmp_path / "w")], timeout=120)
        assert result.returncode == 2 and "--arms" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()


def test_a_run_is_reused_only_with_the_config_the_demo_trains(tmp_path):
    paths = DemoPaths(tmp_path)
    runs = {"stage1_constant": stage1_config(paths, QUICK, 1, "constant")}
    check_reuse(paths, runs)  # nothing on disk yet
    config = json.loads(json.dumps(runs["stage1_constant"]))
    config["train"]["log_interval"] = 1  # the default written out: the same config
    for path in (paths.config("stage1_constant"), paths.run_dir("stage1_constant") / "config.json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config))
        check_reuse(paths, runs)
        config["train"]["seed"] = 2
        path.write_text(json.dumps(config))
        with pytest.raises(UserError, match=r"config.json has train.seed = 2, but this demo trains stage1_constant "
                                             r"with 1|stage1_constant.json has train.seed = 2"):
            check_reuse(paths, runs)
        config["train"]["seed"] = 1
        path.write_text(json.dumps(config))


def test_the_llama_demo_trains_a_llama_style_model_of_the_neox_demos_size_and_neox_stays_as_it_was(tmp_path):
    """--arch llama: RMSNorm, SwiGLU and grouped-query attention at the NeoX demo's depth and width, with its
    parameter count to within 0.5%; the NeoX demo's model section is exactly what it was before --arch."""
    from megacpt.config import padded_vocab_size, validate_config
    from megacpt.model.size import parameter_count

    paths = DemoPaths(tmp_path)
    counts = {}
    for arch in ARCHS:
        for size in (FULL, QUICK):
            configs = [stage0_config(paths, size, 1, name, arch) for name in (STAGE0, "stage0_infinite")]
            configs += [stage1_config(paths, size, 1, arm, arch) for arm in ARMS]
            models = {json.dumps(c["model"], sort_keys=True) for c in configs}
            assert len(models) == 1  # every run of a demo has the same model
            model = validate_config(configs[0]).model
            counts[arch, size] = parameter_count(model, padded_vocab_size(model.vocab_size, 1))
    assert stage0_config(paths, FULL, 1)["model"] == {"num_layers": 4, "hidden_size": 192, "num_attention_heads": 6,
                                                      "seq_length": 128, "vocab_size": 2048}
    llama = validate_config(stage1_config(paths, FULL, 1, "rewarm", "llama")).model
    assert (llama.family, llama.num_query_groups, llama.num_attention_heads, llama.tie_embeddings) == \
        ("llama", 2, 6, False)
    assert (llama.num_layers, llama.hidden_size) == (FULL.num_layers, FULL.hidden_size)
    assert counts["neox", FULL] == 2_566_272 and counts["llama", FULL] == 2_563_776
    assert abs(counts["llama", QUICK] / counts["neox", QUICK] - 1) < 0.005


def test_a_work_directory_of_one_arch_is_refused_for_the_other(tmp_path):
    result = run_megacpt(["demo", "--quick", "--arch", "gpt2", "--workdir", str(tmp_path / "w")], timeout=120)
    assert result.returncode == 2 and "--arch" in result.stderr and "Traceback" not in result.stderr
    settings = {"quick": True, "seed": 1, "python": "3", "size": {}, "tokenizer": "keep-whitespace"}
    pin_settings(DemoPaths(tmp_path), {**settings, "arch": "neox"})
    pin_settings(DemoPaths(tmp_path), {**settings, "arch": "neox"})  # the same settings: reused
    with pytest.raises(UserError, match="arch differ"):
        pin_settings(DemoPaths(tmp_path), {**settings, "arch": "llama"})
    (tmp_path / "demo.json").write_text(json.dumps(settings))  # written before --arch existed: a NeoX demo
    pin_settings(DemoPaths(tmp_path), {**settings, "arch": "neox"})


FIRST_ARMS = ("rewarm", "infinite")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """Two arms first; then every arm in the same directory, which trains only the arms added."""
    workdir = tmp_path_factory.mktemp("demo")
    first = run_megacpt(["demo", "--quick", "--arms", ",".join(FIRST_ARMS), "--workdir", str(workdir)], timeout=1800)
    assert_ok(first)
    assert json.loads((workdir / "summary.json").read_text())["arms"].keys() == set(FIRST_ARMS)
    start = time.monotonic()
    result = run_megacpt(["demo", "--quick", "--workdir", str(workdir)], timeout=1800)
    assert_ok(result)
    return workdir, result, time.monotonic() - start


def _metrics(workdir, run):
    lines = (workdir / "runs" / run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_an_arm_added_later_trains_only_that_arm(quick_demo):
    _, result, _ = quick_demo
    for phase in ("stage0", "stage0_infinite", *(f"stage1_{arm}" for arm in FIRST_ARMS)):
        assert f"[{phase}] reused" in result.stdout, result.stdout
    for arm in set(ARMS) - set(FIRST_ARMS):
        assert f"[stage1_{arm}] megacpt train" in result.stdout


def test_quick_demo_writes_the_summary_the_figures_and_valid_configs(quick_demo):
    workdir, result, _ = quick_demo
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary["stage0"]) == set(summary["stage0_infinite"]) == {"prose", "code"}
    assert set(summary["arms"]) == set(ARMS)
    for arm, result_ in summary["arms"].items():
        stage0 = summary[stage0_of(arm)]
        for key in ("final", "delta"):
            assert set(result_[key]) == {"prose", "code"}, (arm, key)
        assert result_["final"]["code"] < stage0["code"], f"{arm}: stage 1 did not lower the code loss"
        for name in ("prose", "code"):
            assert result_["delta"][name] == pytest.approx(result_["final"][name] - stage0[name])
        evals = [r for r in _metrics(workdir, f"stage1_{arm}") if "eval" in r]
        steps = [0] + [r["step"] for r in evals]
        prose = [stage0["prose"]] + [r["eval"]["prose"] for r in evals]
        assert steps[-1] == QUICK.stage1_steps
        assert result_["prose_area"] == pytest.approx(numpy.trapezoid(prose, steps))
        assert result_["prose_area_above_stage0"] == pytest.approx(numpy.trapezoid(prose, steps)
                                                                   - stage0["prose"] * steps[-1])
    samples = [r["samples"]["prose"] for r in _metrics(workdir, "stage1_replay_schedule") if "loss" in r]
    (_, start), (_, end) = REPLAY_SCHEDULE
    fraction = start + (end - start) * numpy.arange(QUICK.stage1_steps) / QUICK.stage1_steps
    expected = numpy.cumsum(fraction * QUICK.global_batch_size)  # batch b (logged as step b + 1) at fraction(b)
    assert numpy.abs(numpy.array(samples) - expected).max() <= 1
    assert set(summary["checks"]) == {"every_arm_adapts_to_code", "replay_forgets_less_prose",
                                      "replay_code_within_10pct_of_rewarm", "rewarm_arms_beat_constant_on_code"}
    for figure in ("forgetting.png", "lr.png"):
        assert (workdir / figure).read_bytes().startswith(b"\x89PNG")
    configs = sorted((workdir / "configs").glob("*.json"))
    assert [c.stem for c in configs] == sorted(["stage0", "stage0_infinite"] + [f"stage1_{arm}" for arm in ARMS])
    for path in configs:
        config = load_config(path)
        assert config.data.validation and {v.name for v in config.data.validation} == {"prose", "code"}
    assert "rewarm_replay" in result.stdout and "code" in result.stdout  # the console table


def test_the_infinite_arm_holds_its_constant_lr_across_the_switch_and_anneals_at_the_end(quick_demo):
    workdir, _, _ = quick_demo
    const_lr = QUICK.max_lr * QUICK.infinite_const_ratio
    stage0 = [r["lr"] for r in _metrics(workdir, "stage0_infinite") if "loss" in r]
    stage1 = [r["lr"] for r in _metrics(workdir, "stage1_infinite") if "loss" in r]
    assert max(stage0) == pytest.approx(QUICK.max_lr, rel=0.05) and stage0[-1] == pytest.approx(const_lr)
    anneal = round(QUICK.infinite_constant_end * QUICK.stage1_steps)  # the step logged as anneal + 1 runs t = anneal
    assert stage1[:anneal + 1] == pytest.approx([const_lr] * (anneal + 1))  # no re-warm
    assert all(b < a for a, b in zip(stage1[anneal:], stage1[anneal + 1:]))
    assert stage1[-1] < const_lr / 2


def test_the_demo_tokenizer_keeps_code_newlines_and_indentation(quick_demo):
    workdir, _, _ = quick_demo
    tokenizer = build_tokenizer(TokenizerConfig(type="sentencepiece", model=str(workdir / "tokenizer" / "demo.model")))
    code = "def f(x):\n    if x:\n        return [x,  1]\n\n    return None\n"
    assert tokenizer.decode(tokenizer.encode(code)) == code


def test_rerunning_the_demo_reuses_every_finished_phase(quick_demo):
    workdir, _, added_seconds = quick_demo
    start = time.monotonic()
    again = run_megacpt(["demo", "--quick", "--workdir", str(workdir)], timeout=600)
    assert_ok(again)
    for phase in ("corpora", "tokenizer", "datasets", "stage0", "stage0_infinite", *(f"stage1_{a}" for a in ARMS)):
        assert f"[{phase}] reused" in again.stdout, again.stdout
    assert "megacpt train" not in again.stdout
    assert time.monotonic() - start < added_seconds / 2
    assert json.loads((workdir / "summary.json").read_text())["arms"].keys() == set(ARMS)


@pytest.mark.parametrize("path, key", [("configs/stage1_constant.json", "schedule.max_lr"),
                                       ("runs/stage1_infinite/config.json", "schedule.max_lr"),
                                       ("configs/stage0.json", "schedule.max_lr")])
def test_a_run_whose_config_is_not_the_demos_is_refused_not_reused(quick_demo, path, key):
    workdir, _, _ = quick_demo
    original = (workdir / path).read_text()
    config = json.loads(original)
    config["schedule"]["max_lr"] *= 2
    (workdir / path).write_text(json.dumps(config))
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    try:
        result = run_megacpt(["demo", "--quick", "--workdir", str(workdir)], timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert path in result.stderr and key in result.stderr
        assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()} == before
    finally:
        (workdir / path).write_text(original)


def test_a_workdir_made_with_other_settings_is_refused(quick_demo):
    workdir, _, _ = quick_demo
    result = run_megacpt(["demo", "--quick", "--seed", "7", "--workdir", str(workdir)], timeout=120)
    assert result.returncode == 2 and "seed" in result.stderr and "Traceback" not in result.stderr
