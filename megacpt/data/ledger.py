"""The sample ledger: RUN_DIR/samples.jsonl, which samples of which source every optimizer step trained on.

One line per step, `{"step": s, "samples": {source: [ids]}}`, an id being the sample's number in that
source's own stream (megatron's GPTDataset of the source, epoch after epoch: epoch id // epoch size, index
id % epoch size; data.datasets.SourceStream). The blend decides every step's samples from the config alone,
so the main rank writes the whole global batch without reading any data, and a run that starts at step t
(a resume, after kill -9 too) writes lines 1..t anew from the blend before it appends: the file always ends
up identical to an uninterrupted run's, whatever lines a killed run left behind.
"""
from __future__ import annotations

import json
from pathlib import Path

from megacpt.errors import UserError
from megacpt.files import LineFile, write_atomic
from megacpt.run_dir import SAMPLES


def _line(dataset, step: int, first: int, batch_size: int) -> str:
    """Step `step`'s line: the samples at stream positions first .. first + batch_size - 1."""
    return json.dumps({"step": step, "samples": dataset.ids(range(first, first + batch_size))}) + "\n"


class SampleLedger:
    """Appends each step's line to RUN_DIR/samples.jsonl (main rank only). A run resuming its stage at step
    `done` first rewrites steps 1..done, the stage having begun at stream position `begin`; a rollback to an
    earlier checkpoint rewinds it the same way."""

    def __init__(self, run_dir: Path, dataset, batch_size: int, begin: int, done: int):
        self.path, self.dataset, self.batch_size, self.begin = Path(run_dir) / SAMPLES, dataset, batch_size, begin
        self.file = None
        self.rewind(done)

    def rewind(self, done: int) -> None:
        """The file as it is after step `done` (a resume, or a rollback to an earlier checkpoint)."""
        if self.file is not None:
            self.file.close()
        write_atomic(self.path, (_line(self.dataset, step, self.begin + (step - 1) * self.batch_size, self.batch_size)
                                 for step in range(1, done + 1)))
        self.file = LineFile(self.path)

    def write(self, step: int, first: int) -> None:
        """Step `step`, which trained on the global batch starting at stream position `first`."""
        self.file.write(_line(self.dataset, step, first, self.batch_size))

    def close(self) -> None:
        self.file.close()


def read_step(run_dir: Path, step: int) -> dict[str, list[int]]:
    """The `samples` of step `step` in RUN_DIR/samples.jsonl."""
    path = Path(run_dir) / SAMPLES
    if not path.is_file():
        raise UserError(f"{path} does not exist: the run did not keep a sample ledger (logging.sample_ledger)")
    last = None
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                raise UserError(f"{path}, line {number}: not JSON (a line cut by a killed run? a resume rewrites "
                                "it)") from None
            if record.get("step") == step:
                return record["samples"]
            last = record.get("step")
    raise UserError(f"{path} has no line for step {step} (its last line is step {last})")
