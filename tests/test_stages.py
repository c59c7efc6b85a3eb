"""The checkpoint state as a type: what is written reads back equal, and a state file that lacks a field, has a
wrong type or another format version is refused naming the file and the field (exit 2, never a KeyError)."""
import json
from pathlib import Path

import pytest

from megacpt.checkpoint import manifest
from megacpt.cli import main
from megacpt.config import TokenizerConfig
from megacpt.errors import UserError
from megacpt.evaluation.lineage import history
from megacpt.policy.stages import (
    STATE_FILE,
    CheckpointState,
    DataPosition,
    ImportedStage,
    MergeSource,
    SchedulerState,
    read_state,
)

from datagen import tiny_config, trained_stage, write_config, write_state


def full_state(tag: Path, run_dir: Path) -> CheckpointState:
    """A state with every part filled: an imported stage, a trained one, schedule, data position, merge."""
    write_state(tag, 6, 1536, [ImportedStage(index=0, name="pythia", path="/hf/pythia"),
                               trained_stage(1, run_dir, 6, 10, samples={"x": 24})])
    state = read_state(tag).model_copy(update={
        "has_optimizer": True, "tokenizer": TokenizerConfig(type="hf", path="/tok/tokenizer.json"),
        "scheduler": SchedulerState(t=6, stage_index=1, steps=10, schedule=trained_stage(1, run_dir, 6).schedule),
        "data": DataPosition(consumed_samples=24, samples={"x": 24}),
        "merge": [MergeSource(checkpoint="/a", weight=0.25), MergeSource(checkpoint="/b", weight=0.75)]})
    (tag / STATE_FILE).write_text(state.model_dump_json(indent=1))
    return state


def test_a_state_reads_back_equal_to_what_was_written(tmp_path):
    state = full_state(tmp_path / "tag", tmp_path / "run")
    again = read_state(tmp_path / "tag")
    assert again == state
    assert isinstance(again.stages[0], ImportedStage) and again.stages[1].samples == {"x": 24}
    assert again.stages[1].tokens == 6 * 4 * 64 and again.stages[0].tokens == 0
    assert json.loads((tmp_path / "tag" / STATE_FILE).read_text())["format"] == 2


def _broken(tmp_path: Path, edit) -> Path:
    tag = tmp_path / "tag"
    full_state(tag, tmp_path / "run")
    raw = json.loads((tag / STATE_FILE).read_text())
    edit(raw)
    (tag / STATE_FILE).write_text(json.dumps(raw))
    manifest.write_manifest(tag, manifest.describe(tag, manifest.tag_files(tag)))  # a complete, verified tag
    return tag


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.pop("tokens"), "field 'tokens': Field required"),
    (lambda s: s["stages"][1].pop("steps_done"), "field 'stages.1.megacpt.steps_done': Field required"),
    (lambda s: s["stages"][1].pop("data"), "field 'stages.1.megacpt.data': Field required"),
    (lambda s: s["stages"][0].pop("origin"), "field 'stages.0'"),
    (lambda s: s["data"].update(consumed_samples="many"), "field 'data.consumed_samples'"),
    (lambda s: s["scheduler"].update(t=-1), "field 'scheduler.t'"),
    (lambda s: s["model"].update(hidden="64"), "field 'model.hidden'"),
    (lambda s: s.update(format=1), "field 'format' is 1, expected 2"),
    (lambda s: s.pop("format"), "field 'format' is None, expected 2"),
])
def test_a_state_that_is_not_one_names_the_file_and_the_field(tmp_path, edit, words):
    tag = _broken(tmp_path, edit)
    with pytest.raises(UserError) as e:
        read_state(tag)
    assert str(tag / STATE_FILE) in str(e.value) and words in str(e.value)


def test_training_from_a_checkpoint_whose_state_lacks_a_field_exits_2(tmp_path, pattern_data, capsys):
    tag = _broken(tmp_path, lambda s: s["stages"][1].pop("global_batch_size"))
    config = tiny_config(tmp_path / "next", [{"name": "a", "prefix": pattern_data["a"]}],
                         init={"checkpoint": str(tag), "load_optimizer": False, "load_scheduler": False,
                               "load_data_position": False})
    assert main(["train", write_config(tmp_path / "c.json", config)]) == 2
    err = capsys.readouterr().err
    assert "field 'stages.1.megacpt.global_batch_size': Field required" in err and str(tag / STATE_FILE) in err
    assert "Traceback" not in err and not (tmp_path / "next" / "checkpoints").exists()


def test_history_gives_each_stage_its_tokens_before_and_its_metrics_up_to_the_next_start(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": s, "loss": 1.0, "lr": 0.1} for s in range(1, 9)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_state(tmp_path / "tag", 0, 6 * 256, [ImportedStage(index=0, name="hf", path="/hf"),
                                              trained_stage(1, run, 6, 8), trained_stage(2, tmp_path / "gone", 2)])
    imported, trained, gone = history(read_state(tmp_path / "tag"))
    assert (imported.records, imported.run_dir, imported.start_tokens) == (None, None, 0)
    assert [r["step"] for r in trained.train] == [1, 2, 3, 4, 5, 6] and trained.start_tokens == 0
    assert gone.records is None and "does not exist" in gone.problem and gone.start_tokens == 6 * 4 * 64
