"""`logging.sample_ledger`: the ids of every step's samples in RUN_DIR/samples.jsonl (data/ledger.py writes it),
kept in step with the run across resumes and rollbacks. Main rank only."""
from __future__ import annotations

from megacpt.data.ledger import SampleLedger
from megacpt.train.callbacks import Callback, StepResult


class SampleLedgerLog(Callback):
    """One ledger line per trained step; a rollback rewinds the file to its checkpoint."""

    def __init__(self, ledger: SampleLedger):
        self.ledger = ledger

    def after_step(self, loop, result: StepResult) -> None:
        self.ledger.write(result.step, result.first_sample)

    def rewind(self, loop, step: int) -> None:
        self.ledger.rewind(step)

    def close(self) -> None:
        self.ledger.close()
