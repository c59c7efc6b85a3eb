"""The stage record and the checkpoint state as types, read and written in one place.

A *stage* is one `megacpt train` run (one schedule on one data mix) or, at the start of a model's life, the
import of weights megacpt did not train. Every checkpoint tag holds `megacpt_state.json`, a `CheckpointState`:
counters, the config it was saved under, the model signature, the tokenizer, and the stage history (oldest
first, the checkpoint's own stage last). Writers build these models; readers get them from `read_state`, which
turns a file that lacks a field, has a wrong type or another format version into a `UserError` naming the
file and the field. (The lineage walk over run directories is evaluation/lineage.py.)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from megacpt.config import (
    DataConfig,
    ModelConfig,
    ParallelConfig,
    RopeScalingConfig,
    ScheduleConfig,
    TokenizerConfig,
    padded_vocab_size,
)
from megacpt.errors import UserError
from megacpt.files import write_atomic

STATE_FILE = "megacpt_state.json"
STATE_FORMAT = 2  # 2: typed records (stage `origin`, imported stages with `path`); 1 is not read


class Record(BaseModel):
    """Base of the state's parts: unknown keys are errors (a misspelt field never passes silently)."""

    model_config = ConfigDict(extra="forbid")


class Resume(Record):
    """A restart of the stage that changed keys a resume may change: {dotted key: [before, after]}."""

    step: int = Field(ge=0, description="The checkpoint step the run resumed from.")
    changed: dict[str, list[Any]]


class SourceFile(Record):
    """A dataset file as a stage saw it when it started."""

    path: str = Field(description="Absolute path of the .bin or .idx.")
    size: int = Field(ge=0)
    checksum: str = Field(description="CRC32C (data.datasets.file_checksum).")


class SourceUse(Record):
    """What a stage read of one source: samples [start, stop) of the source's stream, i.e. megatron's
    GPTDataset of `prefix` epoch after epoch (epoch e shuffled with seed + e) at the stage's seq_length.

    Seen-only replay replays these samples; `data.continue_sources` starts the next stage's stream of the
    prefix at `stop`."""

    prefix: str
    seed: int = Field(description="The stream's data.seed (a continued source keeps the seed it started with).")
    start: int = Field(ge=0, description="The source's first sample in this stage.")
    stop: int = Field(ge=0, description="One past its last sample trained on, up to steps_done.")
    files: list[SourceFile] = Field(default_factory=list, description="The .idx and .bin at the stage's start.")


class TrainedStage(Record):
    """A stage `megacpt train` ran: where, from what, on which data, how far."""

    origin: Literal["megacpt"] = "megacpt"
    index: int = Field(ge=0, description="Position in the model's life (0 = first stage).")
    name: str = Field(description="The run directory's name.")
    run_dir: str = Field(description="Absolute RUN_DIR of the run (its metrics.jsonl holds the stage's records).")
    init: str | None = Field(description="The checkpoint tag the stage started from; None for fresh weights.")
    steps: int = Field(gt=0, description="train.steps of the stage (T).")
    steps_done: int = Field(ge=0, description="Steps trained when this record was saved.")
    global_batch_size: int = Field(gt=0)
    seq_length: int = Field(gt=0)
    rotary_base: int | None = Field(None, description="model.rotary_base of the stage (None in records of older "
                                                      "megacpt versions).")
    rope_scaling: RopeScalingConfig | None = Field(None, description="model.rope_scaling of the stage.")
    schedule: ScheduleConfig
    data: DataConfig
    samples: dict[str, int] = Field(description="Samples trained on per source name, up to steps_done.")
    sources: dict[str, SourceUse] = Field(default_factory=dict,
                                          description="Per source name: the samples of its stream read, up to "
                                                      "steps_done (empty in records of older megacpt versions).")
    resumes: list[Resume] = Field(default_factory=list, description="Restarts that changed a config key a resume "
                                                                     "may change (megacpt/policy/resume.py).")

    @property
    def tokens(self) -> int:
        """Tokens trained on in this stage up to `steps_done`."""
        return self.steps_done * self.global_batch_size * self.seq_length

    def uses(self) -> dict[str, SourceUse]:
        """`sources`, or for a record written before it, what `samples` implies: the first samples of each
        source's stream (no file identities)."""
        if self.sources or not self.samples:
            return self.sources
        prefixes = {s.name: s.prefix for s in self.data.sources + self.data.replay.sources}
        return {name: SourceUse(prefix=prefixes[name], seed=self.data.seed, start=0, stop=n)
                for name, n in self.samples.items() if name in prefixes}


class ImportedStage(Record):
    """Weights megacpt did not train (a Hugging Face folder): no run directory, no schedule, no data."""

    origin: Literal["huggingface"] = "huggingface"
    index: int = Field(ge=0)
    name: str
    path: str = Field(description="The folder the weights were imported from.")

    @property
    def tokens(self) -> int:
        return 0  # what the model saw before megacpt is unknown; its megacpt life starts here


class VocabExtendedStage(Record):
    """`megacpt extend-vocab`: the embedding and output layer grown for a tokenizer's new ids, no training."""

    origin: Literal["extend-vocab"] = "extend-vocab"
    index: int = Field(ge=0)
    name: str
    checkpoint: str = Field(description="The checkpoint tag whose vocabulary was grown.")
    tokenizer: str = Field(description="The extended tokenizer, as given.")
    base_vocab_size: int = Field(gt=0, description="Pieces of the checkpoint's tokenizer (their rows are kept).")
    vocab_size: int = Field(gt=0, description="Pieces of the extended tokenizer.")
    init: Literal["mean", "random"] = Field(description="How the new rows started.")

    @property
    def tokens(self) -> int:
        return 0


StageRecord = Annotated[TrainedStage | ImportedStage | VocabExtendedStage, Field(discriminator="origin")]


class ModelSignature(Record):
    """What must agree between a checkpoint and the model it is loaded into."""

    family: str = "neox"  # states written before the other families existed hold GPT-NeoX models
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    padded_vocab_size: int
    rotary_pct: float
    parallel_residual: bool
    tie_embeddings: bool = False
    tensor_parallel: int

    @model_validator(mode="before")
    @classmethod
    def _multi_head_before_families(cls, data):
        """A state written before grouped-query attention existed has one key/value head per query head."""
        if isinstance(data, dict) and "num_query_groups" not in data and "num_attention_heads" in data:
            data = {**data, "num_query_groups": data["num_attention_heads"]}
        return data

    @classmethod
    def of(cls, m: ModelConfig, tensor_parallel: int) -> "ModelSignature":
        return cls(family=m.family, num_layers=m.num_layers, hidden_size=m.hidden_size,
                   num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
                   ffn_hidden_size=m.ffn_hidden_size,
                   padded_vocab_size=padded_vocab_size(m.vocab_size, tensor_parallel), rotary_pct=m.rotary_pct,
                   parallel_residual=m.parallel_residual, tie_embeddings=m.tie_embeddings,
                   tensor_parallel=tensor_parallel)


class SavedConfig(BaseModel):
    """The run config a checkpoint was saved under: all of config.json for a training checkpoint (kept as
    written), only `model` and `parallel` for weights-only imports. The sections tools read are typed."""

    model_config = ConfigDict(extra="allow")

    model: ModelConfig
    parallel: ParallelConfig


class SchedulerState(Record):
    """The schedule position (`StageScheduler.state_dict`): step t within the stage and the stage index."""

    t: int = Field(ge=0)
    stage_index: int = Field(ge=0)
    steps: int = Field(gt=0)
    schedule: ScheduleConfig


class DataPosition(Record):
    """Where the training stream stands: samples consumed (global) and their count per source."""

    consumed_samples: int = Field(ge=0)
    samples: dict[str, int]


class MergeSource(Record):
    """One input of `megacpt merge`."""

    checkpoint: str
    weight: float


class CheckpointState(Record):
    """Everything megacpt itself saves with a tag (DeepSpeed's files hold the weights and optimizer)."""

    format: Literal[2] = STATE_FORMAT
    step: int = Field(ge=0, description="Steps of the checkpoint's own stage (0 for imported weights).")
    tokens: int = Field(ge=0, description="Tokens trained on by megacpt over all stages.")
    config: SavedConfig
    model: ModelSignature
    tokenizer: TokenizerConfig | None
    has_optimizer: bool = Field(description="False for weights-only tags (imported, resharded, merged).")
    stages: list[StageRecord] = Field(min_length=1, description="The stage history, the checkpoint's own last.")
    scheduler: SchedulerState | None = Field(description="None for weights-only imports.")
    data: DataPosition | None = Field(description="None for weights-only imports.")
    merge: list[MergeSource] | None = Field(None, description="The merged checkpoints and weights (`megacpt merge`).")
    spike_window: list[float] | None = Field(None, description="The recent losses that train.spike judges the next "
                                                               "step against (spikes.py).")


def read_state(tag_dir: Path) -> CheckpointState:
    """TAG/megacpt_state.json as a CheckpointState; a UserError naming the file and the field when it is not one."""
    path = Path(tag_dir) / STATE_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    found = raw.get("format") if isinstance(raw, dict) else None
    if found != STATE_FORMAT:
        raise UserError(f"{path}: field 'format' is {found!r}, expected {STATE_FORMAT} (a checkpoint state written by "
                        f"another megacpt version; this one reads format {STATE_FORMAT} only)")
    try:
        return CheckpointState.model_validate(raw)
    except ValidationError as e:
        problems = [f"field '{'.'.join(map(str, err['loc']))}': {err['msg']}" for err in e.errors()[:3]]
        more = f" (and {e.error_count() - 3} more)" if e.error_count() > 3 else ""
        raise UserError(f"{path} is not a valid megacpt checkpoint state: {'; '.join(problems)}{more}") from None


def write_state(tag_dir: Path, state: CheckpointState) -> None:
    write_atomic(Path(tag_dir) / STATE_FILE, state.model_dump_json(indent=1))
