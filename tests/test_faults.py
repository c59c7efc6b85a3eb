"""Fault injection: damaged checkpoints, changed resumes, a busy or unusable run dir, bad data, failed writes.

Every case runs the real command and asserts the exit code, the words of the message (the file or key, and
what to do) and, for bad input, that nothing on disk changed (the run dir is hashed before and after).
Most cases need no training: they damage a copy of one tiny trained run (module fixture `trained`).
"""
import errno
import gc
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megacpt.checkpoint import manifest
from megacpt.checkpoint import save as checkpoint_save
from megacpt.cli import main
from megacpt.run_dir import LOCK, OWNER
from megacpt.train import trainer
from megacpt.train.callbacks import Callback

from datagen import pattern_documents, per_step, read_metrics, tiny_config, write_config, write_indexed
from launch import assert_ok, clean_env, deepspeed_launch, run_python

TAG2, TAG4 = "step00000002", "step00000004"


def _config(run_dir: Path, pattern_data: dict, **sections) -> dict:
    sections["train"] = {"steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "save_interval": 2,
                         "log_interval": 1, **sections.get("train", {})}
    return tiny_config(run_dir, [{"name": "a", "prefix": pattern_data["a"]}], **sections)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, pattern_data) -> Path:
    """A tiny run of 4 steps with tags step00000002 and step00000004 (latest)."""
    folder = tmp_path_factory.mktemp("trained")
    config = _config(folder / "run", pattern_data)
    assert main(["train", write_config(folder / "c.json", config)]) == 0
    return folder / "run"


@pytest.fixture
def run_copy(tmp_path, trained) -> Path:
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def tree_hash(root: Path) -> str:
    """Every path under `root` with its bytes: equal hashes mean nothing was written, moved or removed.
    (Except the run-dir lock's note of its holder, which every start rewrites.)"""
    digest = hashlib.sha256()
    if root.exists():
        for path in sorted(p for p in root.rglob("*") if p.name not in (LOCK, OWNER)):
            digest.update(str(path.relative_to(root)).encode())
            if path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


def refused(capsys, args: list[str], watched: Path, *words: str) -> str:
    """Run `megacpt ARGS`: exit 2, a message with `words` and no traceback, and `watched` unchanged."""
    before = tree_hash(watched)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    for word in words:
        assert word in err, f"{word!r} not in: {err}"
    assert tree_hash(watched) == before, "the command changed files on disk"
    return err


# ------------------------------------------------------------------------------------ damaged checkpoints


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated model states": (lambda tag: _truncate(tag / "mp_rank_00_model_states.pt"),
                               ["mp_rank_00_model_states.pt", "truncated"]),
    "missing model states": (lambda tag: (tag / "mp_rank_00_model_states.pt").unlink(),
                             ["mp_rank_00_model_states.pt is missing"]),
    "truncated rng file": (lambda tag: _truncate(tag / "rng_rank0.pt"), ["rng_rank0.pt", "truncated"]),
    "truncated megacpt state": (lambda tag: _truncate(tag / "megacpt_state.json"), ["megacpt_state.json"]),
    "flipped byte": (lambda tag: _flip_a_byte(tag / "mp_rank_00_model_states.pt"), ["fails its checksum"]),
    "no manifest (unfinished save)": (lambda tag: (tag / "manifest.json").unlink(), ["did not finish"]),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_train_refuses_a_damaged_latest_tag_and_names_the_file_and_the_older_tag(run_copy, pattern_data, capsys,
                                                                                  damage):
    corrupt, words = DAMAGE[damage]
    corrupt(run_copy / "checkpoints" / TAG4)
    cfg = write_config(run_copy.parent / "c.json", _config(run_copy, pattern_data))
    refused(capsys, ["train", cfg], run_copy, TAG4, *words, f"tag that verifies is {TAG2}",
            f"checkpoint.load_tag={TAG2}")


@pytest.mark.parametrize("command", [
    ["eval", "CONFIG", "--checkpoint", "CKPT"],
    ["generate", "--checkpoint", "CKPT", "--prompt-ids", "1,2,3", "--max-new-tokens", "2"],
    ["convert", "megacpt-to-hf", "--checkpoint", "CKPT", "--output", "OUT"],
    ["reshard", "--checkpoint", "CKPT", "--tp", "2", "--output", "OUT"],
    ["merge", "--checkpoints", "CKPT", "CKPT", "--weights", "0.5", "0.5", "--output", "OUT"],
])
def test_every_loader_verifies_the_tag_first(run_copy, pattern_data, capsys, command):
    _truncate(run_copy / "checkpoints" / TAG4 / "mp_rank_00_model_states.pt")
    config = _config(run_copy.parent / "eval_run", pattern_data,
                     data={"validation": [{"name": "a", "prefix": pattern_data["a_val"]}]})
    cfg = write_config(run_copy.parent / "c.json", config)
    subs = {"CONFIG": cfg, "CKPT": str(run_copy / "checkpoints"), "OUT": str(run_copy.parent / "out")}
    refused(capsys, [subs.get(a, a) for a in command], run_copy.parent, "mp_rank_00_model_states.pt", "truncated", TAG2)


def test_a_lost_latest_is_refused_naming_the_newest_complete_tag(run_copy, pattern_data, capsys):
    (run_copy / "checkpoints" / "latest").unlink()
    cfg = write_config(run_copy.parent / "c.json", _config(run_copy, pattern_data))
    refused(capsys, ["train", cfg], run_copy, "no 'latest'", TAG4, f"checkpoint.load_tag={TAG4}")


def test_latest_naming_a_missing_tag_is_refused(run_copy, pattern_data, capsys):
    shutil.rmtree(run_copy / "checkpoints" / TAG4)
    cfg = write_config(run_copy.parent / "c.json", _config(run_copy, pattern_data))
    refused(capsys, ["train", cfg], run_copy, f"names {run_copy / 'checkpoints' / TAG4}", TAG2)


def test_load_tag_of_a_missing_tag_lists_the_tags(run_copy, pattern_data, capsys):
    cfg = write_config(run_copy.parent / "c.json", _config(run_copy, pattern_data))
    refused(capsys, ["train", cfg, "--set", "checkpoint.load_tag=step00000003"], run_copy,
            "checkpoint.load_tag", f"{TAG2}, {TAG4}")


# ------------------------------------------------------------------------------ resumes that change the stage


RESUME_CHANGES = {
    "source": ({"data": {"sources": [{"name": "b", "prefix": "B"}]}}, ["data.sources[0].name", '"a"', '"b"']),
    "batch": ({"train": {"global_batch_size": 8}}, ["train.global_batch_size", "4", "8"]),
    "lr": ({"schedule": {"max_lr": 1e-3}}, ["schedule.max_lr", "0.003", "0.001"]),
    "data seed": ({"data": {"seed": 7}}, ["data.seed"]),
    "sequence length": ({"model": {"preset": "tiny", "seq_length": 32}}, ["model.seq_length", "64", "32"]),
    "gradient clipping": ({"deepspeed": {"gradient_clipping": 0.5}}, ["deepspeed.gradient_clipping", "1.0", "0.5"]),
    "replay": ({"data": {"replay": {"fraction": 0.25, "sources": [{"name": "n", "prefix": "NOISE"}]}}},
               ["data.replay"]),
    "init": ({"init": {"checkpoint": "ELSEWHERE"}}, ["init.checkpoint"]),
}


@pytest.mark.parametrize("change", RESUME_CHANGES)
def test_a_resume_that_changes_what_the_stage_means_is_refused(run_copy, pattern_data, capsys, change):
    sections, words = RESUME_CHANGES[change]
    text = json.dumps(sections).replace('"B"', json.dumps(pattern_data["b"])).replace(
        '"NOISE"', json.dumps(pattern_data["noise"])).replace('"ELSEWHERE"', json.dumps(str(run_copy / "checkpoints")))
    config = _config(run_copy, pattern_data)
    for key, value in json.loads(text).items():
        config[key] = {**config.get(key, {}), **value}
    cfg = write_config(run_copy.parent / "c.json", config)
    refused(capsys, ["train", cfg], run_copy, *words, "new stage")


# ------------------------------------------------------------------------- config values that used to crash later


def _source_weight(value):
    def change(config: dict) -> None:
        config["data"]["sources"][0]["weight"] = value
    return change


# {case: (--set overrides, or a change of the config dict written to the file, words of the message)}
CONFIG_FAULTS = {
    "train.seed 2**70": (["train.seed=1180591620717411303424"], ["train.seed", "2147483647"]),
    "data.seed -1": (["data.seed=-1"], ["data.seed", "greater than or equal to 0"]),
    "data.seed 2**64": (["data.seed=18446744073709551616"], ["data.seed", "2147483647"]),
    "train.steps 10**12": (["train.steps=1000000000000"], ["train.steps", "10000000"]),
    "max_lr Infinity (--set)": (["schedule.max_lr=Infinity"], ["schedule.max_lr", "Infinity", "finite"]),
    "timescale Infinity": (["schedule.style=inverse_sqrt", "schedule.timescale=Infinity"], ["schedule.timescale"]),
    "init_std NaN": (["model.init_std=NaN"], ["model.init_std", "NaN"]),
    "source weight Infinity (file)": (_source_weight(math.inf), ["data.sources.0.weight", "Infinity"]),
    "source weight NaN (file)": (_source_weight(math.nan), ["data.sources.0.weight", "NaN"]),
    "betas NaN": (["deepspeed.optimizer.params.betas=[0.9, NaN]"], ["deepspeed.optimizer.params.betas.1", "NaN"]),
    "odd rotary dimensions": (["model.rotary_pct=0.1"], ["model.rotary_pct", "1 rotary dimensions", "even"]),
    "vocab_size 10**9": (["model.vocab_size=1000000000"], ["model", "GB for their fp32 weights alone"]),
    "hidden_size 65536": (["model.hidden_size=65536"], ["model", "GB for their fp32 weights alone"]),
    "ffn_hidden_size 2**31": (["model.ffn_hidden_size=2147483648"], ["model", "GB for their fp32 weights alone"]),
    "tensor 2 in a world of one": (["parallel.tensor=2"], ["parallel.tensor", "world size 1", "--world-size"]),
    "run_dir empty": (['run_dir=""'], ["run_dir", "is empty"]),
    "run_dir ~/x": (["run_dir=~/x"], ["run_dir", "'~'", "does not expand"]),
    "cache_dir ~/x": (["data.cache_dir=~/x"], ["data.cache_dir", "'~'"]),
    "zero stage 7": (["deepspeed.zero_optimization.stage=7"], ["deepspeed.zero_optimization.stage", "3"]),
    "zero stage 'two'": (["deepspeed.zero_optimization.stage=two"], ["deepspeed.zero_optimization.stage", '"two"']),
    "zero_optimization 5": (["deepspeed.zero_optimization=5"], ["deepspeed.zero_optimization", "a JSON object"]),
    "optimizer 'adam'": (["deepspeed.optimizer=adam"], ["deepspeed.optimizer", "a JSON object"]),
    "optimizer type SGD": (["deepspeed.optimizer.type=SGD"], ["deepspeed.optimizer.type", "AdamW"]),
    "gradient_clipping 'abc'": (["deepspeed.gradient_clipping=abc"], ["deepspeed.gradient_clipping", '"abc"']),
    "gradient_clipping -1": (["deepspeed.gradient_clipping=-1"], ["deepspeed.gradient_clipping", "0"]),
    "betas out of range": (["deepspeed.optimizer.params.betas=[0.9, 1.5]"], ["deepspeed.optimizer.params.betas",
                                                                             "[0, 1)"]),
    "lr in the optimizer": (["deepspeed.optimizer.params.lr=0.1"], ["deepspeed.optimizer.params.lr", "schedule"]),
    "weight_decay 'x'": (["deepspeed.optimizer.params.weight_decay=x"], ["deepspeed.optimizer.params.weight_decay"]),
    "eps -1": (["deepspeed.optimizer.params.eps=-1"], ["deepspeed.optimizer.params.eps", "greater than 0"]),
    "misspelled zero_optimisation": (["deepspeed.zero_optimisation.stage=1"],
                                     ["deepspeed.zero_optimisation", "did you mean 'zero_optimization'"]),
    "misspelled optimizer param": (["deepspeed.optimizer.params.beta=[0.9, 0.95]"],
                                   ["deepspeed.optimizer.params.beta", "did you mean 'betas'"]),
    "DeepSpeed's own ZeRO keys": (["deepspeed.zero_optimization.offload_optimiser={}"],
                                  ["deepspeed.zero_optimization.offload_optimiser", "DeepSpeed refuses"]),
    "fp16 and bf16 both": (["deepspeed.fp16.enabled=true", "deepspeed.bf16.enabled=true"],
                           ["deepspeed", "bfloat16 and fp16"]),
    "scheduler": (["deepspeed.scheduler.type=WarmupLR"], ["deepspeed.scheduler", "schedule"]),
}


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("case", CONFIG_FAULTS)
def test_config_values_that_would_crash_later_are_refused_naming_the_key(tmp_path, pattern_data, capsys, case,
                                                                          dry_run):
    change, words = CONFIG_FAULTS[case]
    config = _config(tmp_path / "run", pattern_data)
    if callable(change):
        change(config)
    cfg = write_config(tmp_path / "c.json", config)
    overrides = [a for item in ([] if callable(change) else change) for a in ("--set", item)]
    refused(capsys, ["train", cfg, *overrides, *(["--dry-run"] if dry_run else [])], tmp_path, *words)


def test_a_config_file_that_is_not_utf8_is_refused(tmp_path, capsys):
    (tmp_path / "c.json").write_bytes(b'{"run_dir": "caf\xe9"}')
    refused(capsys, ["train", str(tmp_path / "c.json")], tmp_path, "c.json", "not UTF-8", "byte 16")


def test_deepspeed_keys_are_the_ones_deepspeed_reads():
    """config.DEEPSPEED_KEYS (what a `deepspeed` section may hold) is every top-level key DeepSpeed's config reads."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from megacpt.config import DEEPSPEED_KEYS

    read = set()

    class Keys:
        def __init__(self, keys):
            self.keys = keys

        def __contains__(self, key):
            read.add(key)
            return key in self.keys

    class Recording(dict):
        def get(self, key, *default):
            read.add(key)
            return super().get(key, *default)

        def __getitem__(self, key):
            read.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            read.add(key)
            return super().__contains__(key)

        def keys(self):
            return Keys(set(self))

    DeepSpeedConfig(Recording(train_batch_size=4, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2))
    # sequence_parallel_size is read only inside a process group (where this test may or may not run)
    assert read - {"sequence_parallel_size"} == DEEPSPEED_KEYS - {"sequence_parallel_size"}


# ------------------------------------------------------------------------------------------ the run dir


def test_a_second_run_on_a_locked_run_dir_names_the_holder(run_copy, pattern_data, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from megacpt import run_dir\n"
                               "with run_dir.hold(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
         str(run_copy)], env=clean_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree_hash(run_copy)
        cfg = write_config(run_copy.parent / "c.json", _config(run_copy, pattern_data))
        assert main(["train", cfg]) == 2
        err = capsys.readouterr().err
        assert "in use by another megacpt run" in err and f"pid {holder.pid}" in err and os.uname().nodename in err
        assert tree_hash(run_copy) == before
    finally:
        holder.kill()
        holder.wait()
    # the lock died with its holder: the same command now resumes the finished run (nothing left to train)
    assert main(["train", cfg]) == 0


@pytest.mark.parametrize("where, words", [("file", ["is a file"]), ("under a file", ["cannot create", "not a folder"])])
def test_an_unusable_run_dir_is_refused(tmp_path, pattern_data, capsys, where, words):
    (tmp_path / "afile").write_text("x")
    run_dir = tmp_path / "afile" if where == "file" else tmp_path / "afile" / "run"
    cfg = write_config(tmp_path / "c.json", _config(run_dir, pattern_data))
    refused(capsys, ["train", cfg], tmp_path / "afile", "run_dir", *words)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_dir_is_refused(tmp_path, pattern_data, capsys):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    cfg = write_config(tmp_path / "c.json", _config(tmp_path / "ro" / "run", pattern_data))
    refused(capsys, ["train", cfg], tmp_path / "ro", "permission denied")


# ----------------------------------------------------------------------------- a full or read-only disk


def _mount(*args: str) -> None:
    if subprocess.run(["mount", *args], capture_output=True).returncode:
        pytest.skip("needs mount (root; CI runs as root)")


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 40 MB tmpfs of the test's own (a real full disk: every write fails as it would), unmounted at the end."""
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount("-t", "tmpfs", "-o", "size=40m", "tmpfs", str(disk))
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)  # lazy: a failed test may hold a file open there


def _fill(disk: Path, leave: int = 0) -> None:
    """Fill `disk` up to `leave` free bytes."""
    with open(disk / "fill", "wb") as f:
        try:
            while shutil.disk_usage(disk).free > leave:
                f.write(bytes(min(1 << 20, shutil.disk_usage(disk).free - leave)))
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


@pytest.mark.parametrize("start", ["fresh", "resume"])
def test_a_start_on_a_full_disk_is_refused_naming_the_file(tmp_path, small_disk, trained, pattern_data, capsys, start):
    run = small_disk / "run"
    if start == "resume":
        shutil.copytree(trained, run)
    _fill(small_disk)
    config = _config(run, pattern_data, train={"steps": 6}, data={"cache_dir": str(tmp_path / "cache")})
    refused(capsys, ["train", write_config(tmp_path / "c.json", config)], small_disk,
            f"cannot write {run / OWNER}: No space left on device", "Free space on that disk")
    assert run.exists() == (start == "resume")  # a fresh start leaves no run dir


def test_a_disk_that_fills_up_during_training_ends_the_run_naming_the_file(tmp_path, small_disk, trained,
                                                                            pattern_data, capsys, monkeypatch):
    """The disk fills up (for real: a tmpfs) after step 6 of a resumed run; metrics.jsonl's next page cannot be
    allocated some records later. The run ends with exit 2 naming that file, without a traceback, and the
    checkpoints are as they were: `latest` on step 4, which verifies. Once there is room again the same
    command resumes there and logs every step once (a line the full disk cut short is dropped)."""
    run = small_disk / "run"
    shutil.copytree(trained, run)
    checkpoints = tree_hash(run / "checkpoints")

    class FillTheDisk(Callback):
        def after_step(self, loop, result) -> None:
            if result.step == 6:
                _fill(small_disk)

    real_build = trainer.build_callbacks

    def build_with_the_filler(callbacks, *args, **kwargs):
        metrics = real_build(callbacks, *args, **kwargs)
        callbacks.add(FillTheDisk())
        return metrics

    monkeypatch.setattr(trainer, "build_callbacks", build_with_the_filler)
    config = _config(run, pattern_data, train={"steps": 200, "save_interval": 1000},  # no save after the fill
                     data={"cache_dir": str(tmp_path / "cache")})
    command = ["train", write_config(tmp_path / "c.json", config)]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert f"cannot write {run / 'metrics.jsonl'}: No space left on device" in err, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert "step 7/200" in err and "step 200/200" not in err  # trained past the fill, ended at the failed write
    assert tree_hash(run / "checkpoints") == checkpoints
    assert (run / "checkpoints" / "latest").read_text() == TAG4 and not manifest.problems(run / "checkpoints" / TAG4)

    monkeypatch.undo()
    (small_disk / "fill").unlink()
    assert main(command) == 0
    assert "resuming stage 0 at step 4/200" in capsys.readouterr().err
    assert sorted(per_step(run)) == list(range(1, 201))


@pytest.mark.parametrize("fault, reason", [("full disk", "no space left on device"),
                                           ("read-only checkpoints", "read-only file system")])
def test_a_zero_0_to_1_resume_that_cannot_write_the_universal_form_is_refused(tmp_path, small_disk, trained,
                                                                              pattern_data, capsys, fault, reason):
    run = small_disk / "run"
    shutil.copytree(trained, run)
    checkpoints = run / "checkpoints"
    if fault == "full disk":
        _fill(small_disk, leave=64 << 10)  # room for the lock's note, not for the universal form
    else:
        _mount("--bind", str(checkpoints), str(checkpoints))
        _mount("-o", "remount,ro,bind", str(checkpoints))
    try:
        config = _config(run, pattern_data, data={"cache_dir": str(tmp_path / "cache")})
        refused(capsys, ["train", write_config(tmp_path / "c.json", config), "--set",
                         "deepspeed.zero_optimization.stage=1"], small_disk,
                f"cannot write the universal form of checkpoint {checkpoints / TAG4} beside it: {reason}",
                "megacpt reshard")
    finally:
        if fault != "full disk":
            subprocess.run(["umount", "--lazy", str(checkpoints)], check=True)


@pytest.mark.parametrize("start", ["resume from an older tag", "fresh start after a killed one"])
def test_a_start_that_fails_after_its_checks_changes_nothing_in_an_existing_run_dir(run_copy, pattern_data, capsys,
                                                                                     monkeypatch, start):
    """config.json, the tags and metrics.jsonl change only once the start has built and restored everything:
    here the data indices cannot be written (a full disk under data.cache_dir)."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "save", full)
    if start.startswith("fresh"):  # a run killed before its first checkpoint: metrics.jsonl and config.json only
        shutil.rmtree(run_copy / "checkpoints")
    config = _config(run_copy, pattern_data, train={"log_interval": 2},  # a change a resume may make
                     data={"cache_dir": str(run_copy.parent / "other_cache")})
    refused(capsys, ["train", write_config(run_copy.parent / "c.json", config),
                     *(["--set", f"checkpoint.load_tag={TAG2}"] if start.startswith("resume") else [])], run_copy,
            "data.cache_dir", "No space left on device")


# ------------------------------------------------------------------------------------ bad data and tokenizers


def _damaged_copy(tmp_path: Path, prefix: str, damage) -> str:
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, tmp_path / ("d" + ext))
    damage(tmp_path / "d")
    return str(tmp_path / "d")


DATA_DAMAGE = {
    "truncated idx": (lambda p: _truncate(p.with_suffix(".idx")), ["d.idx", "truncated or overwritten"]),
    "empty idx": (lambda p: p.with_suffix(".idx").write_bytes(b""), ["d.idx", "not a Megatron index"]),
    "garbage idx": (lambda p: p.with_suffix(".idx").write_bytes(b"x" * 100), ["d.idx", "not a Megatron index"]),
    "empty bin": (lambda p: p.with_suffix(".bin").write_bytes(b""), ["d.bin is empty"]),
    "truncated bin": (lambda p: _truncate(p.with_suffix(".bin")), ["d.bin is truncated"]),
    "idx version 2": (lambda p: _set_byte(p.with_suffix(".idx"), 9, 2), ["d.idx", "version 2"]),
    "idx dtype code 9": (lambda p: _set_byte(p.with_suffix(".idx"), 17, 9), ["d.idx", "dtype code 9"]),
    "idx of float tokens": (lambda p: _set_byte(p.with_suffix(".idx"), 17, 7), ["d.idx", "dtype code 7"]),
}


def _set_byte(path: Path, offset: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] = value
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", DATA_DAMAGE)
def test_damaged_datasets_are_refused_naming_the_file(tmp_path, pattern_data, capsys, damage):
    corrupt, words = DATA_DAMAGE[damage]
    prefix = _damaged_copy(tmp_path, pattern_data["a"], corrupt)
    config = tiny_config(tmp_path / "run", [{"name": "a", "prefix": prefix}])
    err = refused(capsys, ["train", write_config(tmp_path / "c.json", config)], tmp_path, *words)
    assert not (tmp_path / "run").exists() and "IndexedDataset.__del__" not in err


CACHE_DAMAGE = {  # megatron's cached index files (numpy .npy), damaged: (file, damage, words)
    "truncated sample index": ("sample_index", _truncate, "mmap length"),
    "garbage shuffle index": ("shuffle_index", lambda p: p.write_bytes(b"\x93NUMPY" + bytes(99)), "format version"),
    "document index not numpy (unpickling)": ("document_index", lambda p: p.write_bytes(b"x" * 99), "damaged"),
}


@pytest.mark.parametrize("damage", CACHE_DAMAGE)
def test_damaged_cached_indices_are_named_with_how_to_clear_them(tmp_path, pattern_data, capsys, damage):
    index, corrupt, words = CACHE_DAMAGE[damage]
    config = _config(tmp_path / "run", pattern_data, train={"steps": 1}, schedule={"warmup": 0})
    cfg = write_config(tmp_path / "c.json", config)
    assert main(["train", cfg]) == 0
    shutil.rmtree(tmp_path / "run")
    (cached,) = (tmp_path / "cache").glob(f"*/*-{index}.npy")
    corrupt(cached)
    err = refused(capsys, ["train", cfg], tmp_path, str(cached.parent), "are damaged", words,
                  "remove that folder")
    assert "IndexedDataset.__del__" not in err
    shutil.rmtree(cached.parent)  # as the message says: then the run builds them again
    assert main(["train", cfg]) == 0


@pytest.mark.parametrize("where, words", [("file", ["is a file"]), ("under a file", ["cannot create", "not a folder"])])
def test_an_unusable_cache_dir_is_refused_before_the_start(tmp_path, pattern_data, capsys, where, words):
    (tmp_path / "afile").write_text("x")
    cache = tmp_path / "afile" if where == "file" else tmp_path / "afile" / "cache"
    config = _config(tmp_path / "run", pattern_data, data={"cache_dir": str(cache)})
    for dry_run in ([], ["--dry-run"]):
        refused(capsys, ["train", write_config(tmp_path / "c.json", config), *dry_run], tmp_path, "data.cache_dir",
                *words)


@pytest.mark.parametrize("failure, words", [(errno.ENOSPC, "No space left on device"),
                                            (errno.EROFS, "Read-only file system")])
def test_a_cache_dir_that_cannot_be_written_is_named(tmp_path, pattern_data, capsys, monkeypatch, failure, words):
    def fail(*args, **kwargs):
        raise OSError(failure, os.strerror(failure))

    monkeypatch.setattr(np, "save", fail)  # megatron writes its indices with numpy.save
    config = _config(tmp_path / "run", pattern_data, data={"cache_dir": str(tmp_path / "run" / "cache")})
    refused(capsys, ["train", write_config(tmp_path / "c.json", config)], tmp_path, "data.cache_dir",
            str(tmp_path / "run" / "cache"), words)
    assert not (tmp_path / "run").exists()  # a start that trained nothing leaves no run dir


def test_a_dataset_shorter_than_one_sample_is_refused(tmp_path, pattern_data, capsys):
    prefix = write_indexed(tmp_path / "short", [[1, 2, 3, 4, 5]] * 4)
    for group in ("sources", "validation"):
        data = {"sources": [{"name": "a", "prefix": pattern_data["a"]}]}
        data[group] = [{"name": "short", "prefix": prefix}]
        config = tiny_config(tmp_path / "run", data["sources"], data=data)
        refused(capsys, ["train", write_config(tmp_path / "c.json", config)], tmp_path / "run",
                f"data.{group}[0] (short)", "holds 20 tokens", "seq_length 64")


def test_a_replay_source_that_is_a_new_source_is_refused(tmp_path, pattern_data, capsys):
    config = tiny_config(tmp_path / "run", [{"name": "a", "prefix": pattern_data["a"]}],
                         data={"replay": {"fraction": 0.2, "sources": [{"name": "old", "prefix": pattern_data["a"]}]}})
    refused(capsys, ["train", write_config(tmp_path / "c.json", config)], tmp_path, "'old'", "same files", "seen_only")


@pytest.mark.parametrize("link", ["symlinked files", "hard-linked files", "symlinked folder"])
@pytest.mark.parametrize("group", ["validation", "replay"])
def test_a_validation_or_replay_prefix_linked_to_the_training_files_is_the_same_data(tmp_path, pattern_data, capsys,
                                                                                      link, group):
    trained = Path(pattern_data["a"])
    if link == "symlinked folder":
        (tmp_path / "linked").symlink_to(trained.parent, target_is_directory=True)
        prefix = tmp_path / "linked" / trained.name
    else:
        prefix = tmp_path / "other"
        for ext in (".bin", ".idx"):
            target = trained.with_name(trained.name + ext)
            if link == "symlinked files":
                prefix.with_name(prefix.name + ext).symlink_to(target)
            else:
                os.link(target, prefix.with_name(prefix.name + ext))
    data, words = {
        "validation": ({"validation": [{"name": "v", "prefix": str(prefix)}]},
                       ["'v'", "is also the training data of source 'a'"]),
        "replay": ({"replay": {"fraction": 0.2, "sources": [{"name": "old", "prefix": str(prefix)}]}},
                   ["replay source 'old'", "same files as new source 'a'"])}[group]
    config = tiny_config(tmp_path / "run", [{"name": "a", "prefix": pattern_data["a"]}], data=data)
    refused(capsys, ["train", write_config(tmp_path / "c.json", config)], tmp_path, *words)


def test_a_resume_after_a_source_was_rewritten_under_the_same_prefix_is_refused(tmp_path, capsys):
    import crc32c

    prefix = write_indexed(tmp_path / "d", pattern_documents(11, 3, 60, 100))
    config = tiny_config(tmp_path / "run", [{"name": "d", "prefix": prefix}],
                         train={"steps": 2, "save_interval": 2}, schedule={"warmup": 0})
    assert main(["train", write_config(tmp_path / "c.json", config)]) == 0
    bin_file = Path(prefix + ".bin")
    before = bin_file.read_bytes()
    gc.collect()  # unmap the old files before they are rewritten
    write_indexed(prefix, pattern_documents(11, 4, 60, 100))  # the same documents' lengths, other tokens
    after = bin_file.read_bytes()
    assert len(after) == len(before) and after != before
    config["train"]["steps"] = 4
    refused(capsys, ["train", write_config(tmp_path / "c.json", config)], tmp_path / "run",
            f"{bin_file} of source 'd' changed since this stage started on it (as checkpoint {TAG2} records)",
            f"{len(before)} bytes, CRC32C {crc32c.crc32c(before):08x}; now {len(after)} bytes, CRC32C "
            f"{crc32c.crc32c(after):08x}", "init.checkpoint")


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path, pattern_data, capsys):
    config = tiny_config(tmp_path / "run", [{"name": "a", "prefix": pattern_data["a"]}], tokenizer={"type": "byte"})
    refused(capsys, ["train", write_config(tmp_path / "c.json", config)], tmp_path,
            "model.vocab_size", "is 256", "257")


def test_a_dataset_rewritten_under_the_same_prefix_gets_new_indices(tmp_path, world):
    from megacpt.config import DataConfig
    from megacpt.data.datasets import build_train_dataset

    prefix = write_indexed(tmp_path / "d", pattern_documents(11, 3, 60, 100))
    data = DataConfig(sources=[{"name": "d", "prefix": prefix}])
    build = dict(num_samples=40, global_batch_size=4, seq_length=64, cache_dir=str(tmp_path / "cache"), vocab_size=256,
                 eod=None)
    first = build_train_dataset(data, **build)[0]["tokens"].tolist()
    gc.collect()  # unmap the old files before they are rewritten
    time.sleep(0.01)
    write_indexed(prefix, pattern_documents(5, 100, 10, 100))  # fewer, other documents under the same name
    second = build_train_dataset(data, **build)
    tokens = set(np.concatenate([second[i]["tokens"].numpy() for i in range(40)]).tolist())
    assert tokens == {(100 + 7 * i) % 256 for i in range(5)}  # only the new documents' tokens
    assert first != second[0]["tokens"].tolist()


@pytest.mark.launcher
def test_deepspeeds_ds_to_universal_on_a_tag_stops_where_the_docs_say_and_megacpt_reshard_converts_it(tmp_path,
                                                                                                     pattern_data):
    """DeepSpeed's own converter on a 2-rank ZeRO-1 tag stops at megatron-core's empty `_extra_state` entries;
    LAUNCH.md and CHECKPOINTS.md say so and name megacpt's command, which writes the tag's universal form."""
    config = _config(tmp_path / "run", pattern_data, train={"steps": 2, "save_interval": 2}, schedule={"warmup": 0},
                     deepspeed={"zero_optimization": {"stage": 1}})
    assert_ok(deepspeed_launch(2, ["megacpt", "train", write_config(tmp_path / "c.json", config)]))
    tag = tmp_path / "run" / "checkpoints" / TAG2
    result = run_python(["-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag), "--output_folder",
                         str(tmp_path / "ds_universal")])
    assert result.returncode != 0 and "'NoneType' object has no attribute 'float'" in result.stderr, result.stderr
    docs = Path(__file__).resolve().parents[1] / "docs"
    for page in ("LAUNCH.md", "CHECKPOINTS.md"):
        text = " ".join((docs / page).read_text().split())
        assert "ds_to_universal --input_folder TAG" in text and "megacpt reshard --checkpoint TAG --tp T" in text, page
    # what the docs offer instead: reshard at the tag's own TP writes OUT/TAG/universal, DeepSpeed's layout
    assert_ok(run_python(["-m", "megacpt", "reshard", "--checkpoint", str(tag), "--tp", "1", "--output",
                          str(tmp_path / "out")]))
    universal = tmp_path / "out" / TAG2 / "universal" / "zero"
    weights = {n: t for n, t in torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)["module"].items()
               if torch.is_tensor(t)}
    assert sorted(p.name for p in universal.iterdir() if p.is_dir()) == sorted(weights)  # and optimizer_state.pt
    for name, tensor in weights.items():
        assert {p.name for p in (universal / name).iterdir()} >= {"fp32.pt", "exp_avg.pt", "exp_avg_sq.pt"}
        assert torch.equal(torch.load(universal / name / "fp32.pt", weights_only=False)["param"], tensor.float()), name


# ------------------------------------------------------------------------------------ other commands


def _command_inputs(run: Path, pattern_data: dict) -> dict[str, str]:
    """What the output-file commands read: a trained run, a config and a loss law's constants."""
    validation = {"validation": [{"name": "a", "prefix": pattern_data["a_val"]}]}
    config = _config(run.parent / "other", pattern_data, data=validation)
    fit = {"law": "tissue", "val": "a", "constants": {"L0": 2.0, "A": 1.0, "alpha": 0.5, "C": 1.0}}
    (run.parent / "fit.json").write_text(json.dumps(fit))
    return {"RUN": str(run), "CONFIG": write_config(run.parent / "c.json", config), "FIT": str(run.parent / "fit.json"),
            "CKPT": str(run / "checkpoints"), "TAG": str(run / "checkpoints" / TAG4)}


# every command that writes a file or folder: (arguments, the output option); OUT is the output
WRITERS = {
    "plot --output": (["plot", "RUN", "--output", "OUT"], "--output"),
    "schedule --csv": (["schedule", "CONFIG", "--csv", "OUT"], "--csv"),
    "schedule --plot": (["schedule", "CONFIG", "--csv", "OUT.csv", "--plot", "OUT"], "--plot"),
    "predict --csv": (["predict", "--constants", "FIT", "--predict", "CONFIG", "--csv", "OUT"], "--csv"),
    "predict --plot": (["predict", "--constants", "FIT", "--predict", "CONFIG", "--csv", "OUT.csv", "--plot", "OUT"],
                       "--plot"),
    "plan --json": (["plan", "CONFIG", "--nodes", "1", "--gpus-per-node", "1", "--json", "OUT"], "--json"),
    "eval --json": (["eval", "CONFIG", "--checkpoint", "CKPT", "--json", "OUT"], "--json"),
    "convert megacpt-to-hf": (["convert", "megacpt-to-hf", "--checkpoint", "CKPT", "--output", "OUT"], "--output"),
    "reshard": (["reshard", "--checkpoint", "CKPT", "--tp", "2", "--output", "OUT"], "--output"),
    "merge": (["merge", "--checkpoints", "TAG", "CKPT", "--weights", "0.5", "0.5", "--output", "OUT"], "--output"),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_every_command_refuses_to_replace_an_existing_output_without_overwrite(run_copy, pattern_data, capsys,
                                                                                writer):
    command, option = WRITERS[writer]
    subs = _command_inputs(run_copy, pattern_data)
    out = run_copy.parent / "existing"
    out.write_text("keep me")
    refused(capsys, [subs.get(a, str(out) if a == "OUT" else str(out) + a[3:] if a.startswith("OUT") else a)
                     for a in command], run_copy.parent, f"{option} {out} already exists", "--overwrite")


# (command, its input that OUT names, or a folder that holds or lies inside that input)
OVERLAPS = {
    "convert into the checkpoint it reads": ("convert megacpt-to-hf", "CKPT", "is the input"),
    "convert into the run holding it": ("convert megacpt-to-hf", "RUN", "contains the input"),
    "convert into its tag": ("convert megacpt-to-hf", "TAG", "lies inside the input"),
    "reshard into its checkpoint": ("reshard", "CKPT", "is the input"),
    "merge into its first checkpoint": ("merge", "TAG", "is the input"),
    "plot over the metrics it reads": ("plot --output", "RUN/metrics.jsonl", "is the input"),
    "schedule --csv over its config": ("schedule --csv", "CONFIG", "is the input"),
    "predict --csv over its constants": ("predict --csv", "FIT", "is the input"),
    "predict --plot over its config": ("predict --plot", "CONFIG", "is the input"),
    "plan --json over its config": ("plan --json", "CONFIG", "is the input"),
    "eval --json over its config": ("eval --json", "CONFIG", "is the input"),
}


@pytest.mark.parametrize("overlap", OVERLAPS)
def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused_even_with_overwrite(run_copy, pattern_data,
                                                                                         capsys, overlap):
    writer, target, words = OVERLAPS[overlap]
    command, option = WRITERS[writer]
    subs = _command_inputs(run_copy, pattern_data)
    base, _, rest = target.partition("/")
    out = subs[base] + (f"/{rest}" if rest else "") + ("/inner" if "lies inside" in words else "")
    args = [subs.get(a, out if a == "OUT" else out + a[3:] if a.startswith("OUT") else a) for a in command]
    refused(capsys, [*args, "--overwrite"], run_copy.parent, f"{option} {out} {words}", "--overwrite does not")


def test_eval_json_refuses_to_overwrite_an_existing_file(run_copy, pattern_data, capsys):
    (run_copy.parent / "results.json").write_text("keep me")
    cfg = write_config(run_copy.parent / "c.json", _config(run_copy.parent / "x", pattern_data))
    refused(capsys, ["eval", cfg, "--checkpoint", str(run_copy / "checkpoints"), "--json",
                     str(run_copy.parent / "results.json")], run_copy.parent, "results.json", "--overwrite")


def test_convert_refuses_a_truncated_safetensors_and_an_output_under_a_file(tmp_path, capsys):
    from test_convert import save_hf

    hf = save_hf(tmp_path / "hf", seed=0)
    _truncate(hf / "model.safetensors")
    refused(capsys, ["convert", "hf-to-megacpt", "--hf", str(hf), "--output", str(tmp_path / "out")], tmp_path,
            "model.safetensors", "incomplete")
    (tmp_path / "afile").write_text("x")
    save_hf(tmp_path / "good", seed=0)
    refused(capsys, ["convert", "hf-to-megacpt", "--hf", str(tmp_path / "good"), "--output",
                     str(tmp_path / "afile" / "out")], tmp_path, "cannot create output", "afile")


@pytest.mark.parametrize("garbage", [b"\xff\xfe\x00garbage\x80", b"../" + TAG4.encode()], ids=["binary", "text"])
@pytest.mark.parametrize("command", ["train", "verify"])
def test_latest_holding_garbage_is_refused_naming_it(run_copy, pattern_data, capsys, command, garbage):
    (run_copy / "checkpoints" / "latest").write_bytes(garbage)
    cfg = write_config(run_copy.parent / "c.json", _config(run_copy, pattern_data))
    args = ["train", cfg] if command == "train" else ["checkpoint", "verify", str(run_copy)]
    refused(capsys, args, run_copy, "latest", "holds no tag name", TAG4)


def test_verify_after_a_crash_in_the_first_save_passes_and_clean_removes_conversion_staging(tmp_path, capsys):
    root = tmp_path / "run" / "checkpoints"
    (root / "step00000002").mkdir(parents=True)  # the first save, killed: no manifest, no `latest`
    (root / "step00000002" / "mp_rank_00_model_states.pt").write_bytes(b"half")
    (root / ".step00000002.universal-4242" / "universal").mkdir(parents=True)  # a killed universal conversion
    assert main(["checkpoint", "verify", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "step00000002: unfinished save" in out and ".step00000002.universal-4242" in out and "none yet" in out
    assert main(["checkpoint", "verify", str(tmp_path / "run"), "--clean"]) == 0
    assert sorted(p.name for p in root.iterdir()) == []


PREDICT_CONSTANTS = {
    "constants a list": {"law": "tissue", "val": "a", "constants": [2.0, 1.0, 0.5, 1.0]},
    "fixed a number": {"law": "tissue", "val": "a", "constants": {"L0": 2, "A": 1, "alpha": 0.5, "C": 1}, "fixed": 5},
    "points a string": {"law": "tissue", "val": "a", "constants": {"L0": 2, "A": 1, "alpha": 0.5, "C": 1},
                        "points": "x"},
    "a list at the top": [1, 2],
}


@pytest.mark.parametrize("case", PREDICT_CONSTANTS)
def test_predict_constants_of_the_wrong_shape_are_refused(tmp_path, pattern_data, capsys, case):
    (tmp_path / "fit.json").write_text(json.dumps(PREDICT_CONSTANTS[case]))
    cfg = write_config(tmp_path / "c.json", _config(tmp_path / "run", pattern_data))
    refused(capsys, ["predict", "--constants", str(tmp_path / "fit.json"), "--predict", cfg, "--csv",
                     str(tmp_path / "out.csv")], tmp_path, "--constants", "fit.json")


@pytest.mark.parametrize("command", [["sweep", "BASE", "--grid", "train.seed=1,2", "--workdir", "AFILE"],
                                     ["demo", "--quick", "--workdir", "AFILE"]])
def test_a_workdir_that_is_a_file_is_refused(tmp_path, pattern_data, capsys, command):
    (tmp_path / "afile").write_text("x")
    base = write_config(tmp_path / "c.json", _config(tmp_path / "run", pattern_data))
    subs = {"BASE": base, "AFILE": str(tmp_path / "afile")}
    refused(capsys, [subs.get(a, a) for a in command], tmp_path, "--workdir", "is a file")


@pytest.mark.parametrize("value", ["inf", "nan", "0"])
def test_plan_refuses_a_peak_rate_that_is_not_a_finite_positive_number(tmp_path, pattern_data, capsys, value):
    cfg = write_config(tmp_path / "c.json", _config(tmp_path / "run", pattern_data))
    with pytest.raises(SystemExit) as exit_:
        main(["plan", cfg, "--gpu-tflops", value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--gpu-tflops" in err and "finite number > 0" in err and "Traceback" not in err


def test_eval_samples_beyond_the_validation_set_are_refused(run_copy, pattern_data, capsys):
    config = _config(run_copy.parent / "x", pattern_data, data={"validation": [{"name": "a",
                                                                                "prefix": pattern_data["a_val"]}]})
    cfg = write_config(run_copy.parent / "c.json", config)
    held = (30 * 100 - 1) // 64  # a_val: 30 documents of 100 tokens, in samples of 64
    refused(capsys, ["eval", cfg, "--checkpoint", str(run_copy / "checkpoints"), "--samples", str(held + 1)],
            run_copy.parent, "--samples", f"holds {held} samples", "(a)")


@pytest.mark.parametrize("name", ["metrics.jsonl", "samples.jsonl", "config.json"])
def test_a_run_file_that_is_a_folder_is_refused(run_copy, pattern_data, capsys, name):
    shutil.rmtree(run_copy / name, ignore_errors=True)
    (run_copy / name).unlink(missing_ok=True)
    (run_copy / name).mkdir()
    cfg = write_config(run_copy.parent / "c.json", _config(run_copy, pattern_data))
    for dry_run in ([], ["--dry-run"]):
        refused(capsys, ["train", cfg, *dry_run], run_copy, str(run_copy / name), "is a folder")


def test_a_resume_shorter_than_the_steps_trained_is_refused(run_copy, pattern_data, capsys):
    cfg = write_config(run_copy.parent / "c.json", _config(run_copy, pattern_data, train={"steps": 3}))
    refused(capsys, ["train", cfg], run_copy, "train.steps", "is 3", "trained 4 steps", ">= 4")


def test_a_fresh_start_sets_earlier_metrics_aside(tmp_path, pattern_data):
    """A run killed before its first checkpoint left records; the next start begins metrics.jsonl anew."""
    (tmp_path / "run").mkdir()
    old = '{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n'
    (tmp_path / "run" / "metrics.jsonl").write_text(old)
    (tmp_path / "run" / "metrics.jsonl.superseded").write_text("older")
    config = _config(tmp_path / "run", pattern_data, train={"steps": 2, "save_interval": 0}, schedule={"warmup": 0})
    assert main(["train", write_config(tmp_path / "c.json", config)]) == 0
    assert (tmp_path / "run" / "metrics.jsonl.superseded-2").read_text() == old
    assert (tmp_path / "run" / "metrics.jsonl.superseded").read_text() == "older"
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r and "event" not in r] == [1, 2]


def test_checkpoint_verify_reports_damage_and_clean_removes_only_unfinished_saves(run_copy, capsys):
    root = run_copy / "checkpoints"
    assert main(["checkpoint", "verify", str(run_copy)]) == 0
    assert f"{TAG2}: ok" in capsys.readouterr().out
    (root / "step00000006").mkdir()
    (root / "step00000006" / "mp_rank_00_model_states.pt").write_bytes(b"half")
    (root / ".latest.tmp-4242").write_text(TAG4)  # what a crash while replacing `latest` leaves
    _flip_a_byte(root / TAG2 / "rng_rank0.pt")
    assert main(["checkpoint", "verify", str(run_copy)]) == 2
    captured = capsys.readouterr()
    assert "step00000006: unfinished save" in captured.out and ".latest.tmp-4242" in captured.out
    assert f"{TAG2}: DAMAGED" in captured.out and "rng_rank0.pt fails its checksum" in captured.out
    assert f"newest tag that verifies is {TAG4}" in captured.err
    assert main(["checkpoint", "verify", str(root / TAG4)]) == 0
    assert main(["checkpoint", "verify", str(run_copy), "--clean"]) == 2  # TAG2 stays damaged and stays
    assert not (root / "step00000006").exists() and not (root / ".latest.tmp-4242").exists() and (root / TAG2).exists()


# ------------------------------------------------------------------------------ failures that need training


@pytest.mark.parametrize("failure, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 966"), "no space left on device"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
])
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_failed_save_removes_the_partial_tag_and_keeps_latest(tmp_path, pattern_data, capsys, monkeypatch,
                                                                 failure, reason, asynchronous):
    """Also when the write fails in checkpoint.async_save's writer thread (the optimizer partition of ZeRO 1,
    written after the loop went on): the loop learns it when it finishes the save."""
    real_save = torch.save
    writer = []

    def fail_on_the_second_tag(obj, f, *args, **kwargs):
        if "step00000002" in str(f) and ("optim_states" in str(f) or not asynchronous):
            writer.append(threading.current_thread().name)
            raise failure
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fail_on_the_second_tag)
    if isinstance(failure, RuntimeError):  # torch's full-disk error has no errno: the folder's free space tells
        monkeypatch.setattr(checkpoint_save, "_free_bytes", lambda path: 0)
    config = _config(tmp_path / "run", pattern_data, train={"steps": 2, "save_interval": 1}, schedule={"warmup": 0},
                     checkpoint={"async_save": asynchronous},
                     deepspeed={"zero_optimization": {"stage": 1 if asynchronous else 0}})
    assert main(["train", write_config(tmp_path / "c.json", config)]) == 2
    err = capsys.readouterr().err
    root = tmp_path / "run" / "checkpoints"
    assert reason in err and str(root) in err and "still names step00000001" in err and "Traceback" not in err
    assert not (root / "step00000002").exists() and (root / "latest").read_text() == "step00000001"
    assert not manifest.problems(root / "step00000001")
    assert (writer[0] != threading.main_thread().name) == asynchronous


def test_resuming_an_older_tag_sets_newer_ones_aside_records_changes_and_keeps_one_record_per_step(
        run_copy, pattern_data, trained):
    root = run_copy / "checkpoints"
    newer = tree_hash(root / TAG4)
    config = _config(run_copy, pattern_data, train={"log_interval": 2})  # a change a resume may make
    cfg = write_config(run_copy.parent / "c.json", config)
    assert main(["train", cfg, "--set", f"checkpoint.load_tag={TAG2}"]) == 0
    assert tree_hash(root / f"{TAG4}.superseded") == newer  # set aside, never written over
    assert (root / "latest").read_text() == TAG4 and not manifest.problems(root / TAG4)
    steps = [r["step"] for r in read_metrics(run_copy) if "loss" in r]
    assert steps == [1, 2, 4]  # steps 3-4 of the first run dropped; this run logs every 2nd step
    straight = {r["step"]: r["loss"] for r in read_metrics(trained) if "loss" in r}
    assert [r["loss"] for r in read_metrics(run_copy) if r.get("step") == 4 and "loss" in r] == [
        pytest.approx((straight[3] + straight[4]) / 2, abs=1e-6)]
    (resumed,) = json.loads((root / TAG4 / "megacpt_state.json").read_text())["stages"][-1]["resumes"]
    assert resumed["step"] == 2 and resumed["changed"]["train.log_interval"] == [1, 2]
    assert resumed["changed"]["checkpoint.load_tag"] == [None, TAG2]
    assert resumed["changed"]["run_dir"] == [str(trained), str(run_copy)]  # the copy is another folder
