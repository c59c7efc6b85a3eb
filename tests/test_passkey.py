"""Passkey retrieval: prompts put the key where asked, and the scores see whether a model copies it."""
import json
import math

import pytest
import torch

from megacpt.cli import main
from megacpt.evaluation.passkey import build_prompt, passkey_table, score

from datagen import tiny_config, write_config


def encode(text: str) -> list[int]:
    """A byte tokenizer: every prompt piece is its UTF-8 bytes."""
    return list(text.encode())


class Induction:
    """A 'model' that predicts, after the last 12 tokens, what followed their latest earlier occurrence (a
    copying head); uniform where they never occurred."""

    def __call__(self, ids, positions, context: int = 12):
        seq = ids[0].tolist()
        logits = torch.zeros(1, len(seq), 256)
        for t in range(context, len(seq)):
            for j in range(t - 1, context - 1, -1):
                if seq[j - context + 1:j + 1] == seq[t - context + 1:t + 1]:
                    logits[0, t, seq[j + 1]] = 20.0
                    break
        return logits


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_the_key_sits_at_its_depth_and_the_answer_repeats_its_tokens(depth):
    prompt = build_prompt(encode, 1000, depth, "31415")
    text = bytes(prompt.ids).decode()
    assert len(prompt.ids) <= 1000 and text.endswith("The pass key is 31415")
    assert bytes(prompt.ids[prompt.answer]).decode() == " 31415" and prompt.answer.stop == len(prompt.ids)
    filler_tokens = text.count("The grass is green")
    before = text[:prompt.key_at].count("The grass is green")
    assert before == round(depth * filler_tokens)
    assert bytes(prompt.ids[prompt.key_at:]).decode().startswith(" The pass key is 31415. Remember it.")
    control = build_prompt(encode, 1000, depth, "31415", with_key=False)
    assert "31415" not in bytes(control.ids[:control.answer.start]).decode() and control.key_at is None


def test_a_copying_model_retrieves_the_key_and_a_uniform_one_does_not():
    copying = passkey_table(Induction(), encode, 600, [0.0, 0.5, 1.0], 3, 0, torch.device("cpu"))
    assert all(r["retrieved"] == 1.0 and r["answer_loss"] < 1e-6 for r in copying)
    assert all(r["answer_loss_without_key"] > 1.0 for r in copying)  # without the key there is nothing to copy
    uniform = lambda ids, positions: torch.zeros(1, ids.shape[1], 256)  # noqa: E731
    loss, retrieved = score(uniform, build_prompt(encode, 600, 0.5, "27182"), torch.device("cpu"))
    assert abs(loss - math.log(256)) < 1e-5 and not retrieved


def test_too_short_a_prompt_is_refused():
    with pytest.raises(ValueError, match="no room for filler"):
        build_prompt(encode, 100, 0.5, "31415")


def test_passkey_command_reports_every_depth(tmp_path, pattern_data, hf_tokenizer_json, capsys):
    from megacpt.data.tokenizers import HFTokenizer

    vocab = HFTokenizer(hf_tokenizer_json).vocab_size
    config = tiny_config(tmp_path / "run", [{"name": "a", "prefix": pattern_data["a"]}],
                         model={"preset": "tiny", "vocab_size": vocab}, train={"steps": 3},
                         tokenizer={"type": "hf", "path": hf_tokenizer_json})
    assert main(["train", write_config(tmp_path / "c.json", config)]) == 0
    out = tmp_path / "passkey.json"
    args = ["passkey", "--checkpoint", str(tmp_path / "run" / "checkpoints"), "--length", "300", "--depths", "0", "1",
            "--trials", "2", "--json", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert [r["depth"] for r in report["depths"]] == [0.0, 1.0] and report["length"] == 300
    assert all(0 <= r["retrieved"] <= 1 and math.isfinite(r["answer_loss"]) for r in report["depths"])
    assert "answer loss" in capsys.readouterr().out
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main(args[:3] + ["--length", "20", "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "--length 20" in err and "Traceback" not in err
