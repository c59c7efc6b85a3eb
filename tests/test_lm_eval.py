"""The lm-evaluation-harness adapter, offline: local task YAML files over a local JSON file, a tiny model trained
here with a Hugging Face tokenizer, and lm-eval's own `hf` model on the converted checkpoint as the reference.
Multiple choice (loglikelihood), rolling loglikelihood and greedy generation give the same numbers."""
import json
import os
import random
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read when `datasets` is imported: nothing is downloaded
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from megacpt.checkpoint import manifest
from megacpt.cli import main

from datagen import tiny_config, write_config
from hfmodel import random_family_model
from launch import assert_ok, run_python

TASKS = ("megacpt_words_mc", "megacpt_words_gen", "megacpt_words_ppl")
WORDS = "model data token train loss step batch layer rotary replay stage warmup cosine decay".split()


def write_tasks(folder: Path) -> Path:
    """Ten items over the corpus's words and one task YAML per output type, all reading the local JSON file."""
    rng = random.Random(1)
    items = [{"context": " ".join(rng.choices(WORDS, k=rng.randint(3, 8))),
              "choices": [" " + w for w in rng.sample(WORDS, 4)], "label": rng.randrange(4)} for _ in range(10)]
    folder.mkdir()
    (folder / "words.json").write_text(json.dumps(items))
    source = f"dataset_path: json\ndataset_kwargs:\n  data_files: {folder / 'words.json'}\ntest_split: train\n"
    specs = {
        "megacpt_words_mc": 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
                            'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n',
        "megacpt_words_gen": 'output_type: generate_until\ndoc_to_text: "{{context}}"\ndoc_to_target: '
                             '"{{choices[label]}}"\n'
                             'generation_kwargs:\n  until: [".", "ve na"]\n  max_gen_toks: 8\n  do_sample: false\n'
                             'metric_list:\n  - metric: exact_match\n',
        "megacpt_words_ppl": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: '
                             '"{{context}}{{choices[label]}}"\n'
                             'metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n',
    }
    for task, spec in specs.items():
        (folder / f"{task}.yaml").write_text(f"task: {task}\n{source}{spec}")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, write_jsonl, hf_tokenizer_json) -> dict:
    """A tiny model trained 20 steps on the corpus with an HF tokenizer, its HF conversion and the local tasks."""
    from megacpt.data.tokenizers import HFTokenizer

    folder = tmp_path_factory.mktemp("lm_eval")
    prefix = str(folder / "corpus")
    assert main(["preprocess", "--input", write_jsonl(folder / "corpus.jsonl", corpus), "--tokenizer-type", "hf",
                 "--tokenizer-model", hf_tokenizer_json, "--output-prefix", prefix, "--append-eod"]) == 0
    config = tiny_config(folder / "run", [{"name": "corpus", "prefix": prefix}],
                         model={"preset": "tiny", "vocab_size": HFTokenizer(hf_tokenizer_json).vocab_size},
                         tokenizer={"type": "hf", "path": hf_tokenizer_json},
                         train={"steps": 20, "global_batch_size": 8, "micro_batch_size": 4, "log_interval": 10})
    assert main(["train", write_config(folder / "config.json", config)]) == 0
    checkpoint = folder / "run" / "checkpoints"
    assert main(["convert", "megacpt-to-hf", "--checkpoint", str(checkpoint), "--output", str(folder / "hf")]) == 0
    return {"checkpoint": checkpoint, "hf": folder / "hf", "tasks": write_tasks(folder / "tasks"), "folder": folder}


def _hf_reference(trained) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(trained["hf"]), "dtype": "float32"},
                                   tasks=list(TASKS), device="cpu", batch_size=1, log_samples=True,
                                   task_manager=TaskManager(include_path=str(trained["tasks"]), include_defaults=False))


@pytest.fixture(scope="module", params=["llama-gqa", "qwen2-bias"])
def converted_family(request, tmp_path_factory, make_hf_tokenizer) -> dict:
    """A random Hugging Face model of the family (every parameter perturbed) in a folder with its tokenizer, as
    Llama 3 and Qwen2 ship it (tokenizer.json, and tokenizer_config.json naming the class and the eos token),
    converted to megacpt: the checkpoint remembers the folder's tokenizer."""
    folder = tmp_path_factory.mktemp(request.param)
    random_family_model(request.param, seed=0, vocab_size=320).save_pretrained(folder / "hf")
    make_hf_tokenizer(folder / "hf" / "tokenizer.json", ["<|endoftext|>"])
    (folder / "hf" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                                     "eos_token": "<|endoftext|>"}))
    checkpoint = folder / "converted"
    assert main(["convert", "hf-to-megacpt", "--hf", str(folder / "hf"), "--output", str(checkpoint)]) == 0
    return {"checkpoint": checkpoint, "hf": folder / "hf", "tasks": write_tasks(folder / "tasks"), "folder": folder}


def test_adapter_gives_the_numbers_of_lm_evals_hf_model_on_the_converted_checkpoint(trained, capsys):
    _assert_adapter_equals_hf(trained, capsys)


def test_adapter_on_a_converted_llama_or_qwen2_gives_the_numbers_of_lm_evals_hf_model_on_the_original(
        converted_family, capsys):
    _assert_adapter_equals_hf(converted_family, capsys)


def _assert_adapter_equals_hf(case: dict, capsys) -> None:
    """`megacpt lm-eval` on case["checkpoint"] against lm-eval's `hf` model on case["hf"]: the same scores of
    every choice, the same generations, the same perplexities."""
    out = case["folder"] / "ours.json"
    assert main(["lm-eval", "--checkpoint", str(case["checkpoint"]), "--tasks", ",".join(TASKS), "--include-path",
                 str(case["tasks"]), "--only-include-path", "--batch-size", "3", "--log-samples", "--output",
                 str(out)]) == 0
    assert "megacpt_words_mc" in capsys.readouterr().out
    ours, hf = json.loads(out.read_text()), _hf_reference(case)

    assert ours["results"]["megacpt_words_mc"]["acc,none"] == hf["results"]["megacpt_words_mc"]["acc,none"]
    for mine, theirs in zip(ours["samples"]["megacpt_words_mc"], hf["samples"]["megacpt_words_mc"], strict=True):
        for (score, greedy), (hf_score, hf_greedy) in zip((r[0] for r in mine["resps"]),
                                                          (r[0] for r in theirs["resps"])):
            assert score == pytest.approx(hf_score, abs=1e-4) and greedy == hf_greedy
    generated = [s["resps"][0][0] for s in ours["samples"]["megacpt_words_gen"]]
    assert generated == [s["resps"][0][0] for s in hf["samples"]["megacpt_words_gen"]]
    assert any(generated) and all(len(text) < 60 for text in generated)  # some text, cut by the stop sequences
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["megacpt_words_ppl"][metric] == pytest.approx(hf["results"]["megacpt_words_ppl"][metric],
                                                                             rel=1e-5)


def test_lm_evals_own_command_line_runs_the_registered_model(trained):
    result = run_python(["-m", "megacpt.evaluation.lm_eval_adapter", "--model", "megacpt", "--model_args",
                         f"checkpoint={trained['checkpoint']}", "--tasks", "megacpt_words_mc", "--include_path",
                         str(trained["tasks"]), "--limit", "2"])
    assert_ok(result)
    assert "megacpt_words_mc" in result.stdout and "acc" in result.stdout


def test_unknown_tasks_and_checkpoints_without_a_tokenizer_are_refused(trained, tmp_path, capsys):
    local = ["--include-path", str(trained["tasks"]), "--only-include-path"]
    assert main(["lm-eval", "--checkpoint", str(trained["checkpoint"]), *local, "--tasks",
                 "megacpt_words_mc,no_such_task"]) == 2
    err = capsys.readouterr().err
    assert "unknown lm-eval task(s) no_such_task" in err and "Traceback" not in err

    tag = trained["checkpoint"] / (trained["checkpoint"] / "latest").read_text()
    bare = tmp_path / "bare" / tag.name
    shutil.copytree(tag, bare)
    state = json.loads((bare / "megacpt_state.json").read_text())
    (bare / "megacpt_state.json").write_text(json.dumps({**state, "tokenizer": None}))
    manifest.write_manifest(bare, manifest.describe(bare, manifest.tag_files(bare)))  # edited on purpose
    assert main(["lm-eval", "--checkpoint", str(bare), *local, "--tasks", "megacpt_words_mc"]) == 2
    assert "names no tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("damage, words", [("truncated", "truncated"), ("flipped", "fails its checksum")])
def test_a_damaged_tag_is_refused_before_lm_eval_loads_it(trained, tmp_path, capsys, damage, words):
    """lm-eval verifies the tag against its manifest first, as every loader does: a truncated model file, or
    one with a byte flipped in its weights (which would load), is exit 2 naming the file, not a model
    evaluated from damaged weights."""
    tag = trained["checkpoint"] / (trained["checkpoint"] / "latest").read_text()
    damaged = tmp_path / "damaged" / tag.name
    shutil.copytree(tag, damaged)
    model_file = damaged / "mp_rank_00_model_states.pt"
    data = bytearray(model_file.read_bytes())
    if damage == "truncated":
        data = data[:1000]
    else:
        data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    assert main(["lm-eval", "--checkpoint", str(damaged), "--include-path", str(trained["tasks"]),
                 "--only-include-path", "--tasks", "megacpt_words_mc"]) == 2
    err = capsys.readouterr().err
    assert "mp_rank_00_model_states.pt" in err and words in err and "Traceback" not in err
