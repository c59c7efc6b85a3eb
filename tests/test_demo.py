"""`megacpt demo`: the corpora are clean and deterministic, and `--quick` runs end to end, then reuses its phases."""
import ast
import json
import time

import pytest

from megacpt.config import TokenizerConfig, load_config
from megacpt.data.tokenizers import build_tokenizer
from megacpt.demo.configs import ARMS
from megacpt.demo.corpora import chunk, docstrings_text, is_validation, strip_code

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


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    start = time.monotonic()
    result = run_megacpt(["demo", "--quick", "--workdir", str(workdir)], timeout=1800)
    assert_ok(result)
    return workdir, result, time.monotonic() - start


def test_quick_demo_writes_the_summary_the_figures_and_valid_configs(quick_demo):
    workdir, result, _ = quick_demo
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary["stage0"]) == {"prose", "code"}
    assert set(summary["arms"]) == set(ARMS)
    for arm, result_ in summary["arms"].items():
        for key in ("final", "delta"):
            assert set(result_[key]) == {"prose", "code"}, (arm, key)
        assert result_["final"]["code"] < summary["stage0"]["code"], f"{arm}: stage 1 did not lower the code loss"
        for name in ("prose", "code"):
            assert result_["delta"][name] == pytest.approx(result_["final"][name] - summary["stage0"][name])
    for figure in ("forgetting.png", "lr.png"):
        assert (workdir / figure).read_bytes().startswith(b"\x89PNG")
    configs = sorted((workdir / "configs").glob("*.json"))
    assert [c.stem for c in configs] == sorted(["stage0"] + [f"stage1_{arm}" for arm in ARMS])
    for path in configs:
        config = load_config(path)
        assert config.data.validation and {v.name for v in config.data.validation} == {"prose", "code"}
    assert "rewarm_replay" in result.stdout and "code" in result.stdout  # the console table


def test_the_demo_tokenizer_keeps_code_newlines_and_indentation(quick_demo):
    workdir, _, _ = quick_demo
    tokenizer = build_tokenizer(TokenizerConfig(type="sentencepiece", model=str(workdir / "tokenizer" / "demo.model")))
    code = "def f(x):\n    if x:\n        return [x,  1]\n\n    return None\n"
    assert tokenizer.decode(tokenizer.encode(code)) == code


def test_rerunning_the_demo_reuses_every_finished_phase(quick_demo):
    workdir, first, first_seconds = quick_demo
    start = time.monotonic()
    again = run_megacpt(["demo", "--quick", "--workdir", str(workdir)], timeout=600)
    assert_ok(again)
    for phase in ("corpora", "tokenizer", "datasets", "stage0", *(f"stage1_{arm}" for arm in ARMS)):
        assert f"[{phase}] reused" in again.stdout, again.stdout
    assert "megacpt train" not in again.stdout
    assert time.monotonic() - start < first_seconds / 3
    assert json.loads((workdir / "summary.json").read_text())["arms"].keys() == set(ARMS)


def test_a_workdir_made_with_other_settings_is_refused(quick_demo):
    workdir, _, _ = quick_demo
    result = run_megacpt(["demo", "--quick", "--seed", "7", "--workdir", str(workdir)], timeout=120)
    assert result.returncode == 2 and "seed" in result.stderr and "Traceback" not in result.stderr
