"""The run configuration: pydantic schema, JSON loading, `--set` overrides and the derived values.

Every key has a description; docs/CONFIG.md is generated from this module (`python tools/config_doc.py`)
and a test fails when it is stale. Validation happens here, before anything heavy is imported, and every
problem is raised as a `ConfigError` naming the dotted key. This module does not touch torch or the data.
"""
from __future__ import annotations

import difflib
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from megacpt.errors import ConfigError, UserError
from megacpt.model.presets import PRESETS
from megacpt.run_dir import DATA_CACHE

MAX_SEED = 2**31 - 1  # numpy's generators (megatron's shuffles) take seeds below 2**32; a stream adds its epoch
MAX_STEPS = 10**7


def check_folder_path(value: str) -> str:
    """A folder megacpt creates: not empty, and not starting with '~' (a shell expands it; megacpt does not)."""
    if not value.strip():
        raise ValueError("is empty; give a folder (an empty path would write into the current folder)")
    if value.startswith("~"):
        raise ValueError(f"'{value}' starts with '~', which megacpt does not expand (it would create a folder named "
                         "'~'); write the path out, e.g. $HOME/... expanded by the shell, or an absolute path")
    return value


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# The keys of each rope_type besides `factor`, with their defaults (None: required). megatron-core's Llama 3
# scaling takes only the factor, its other constants are fixed in its code; YaRN's betas are the defaults of
# Hugging Face and megatron-core, its original length is the checkpoint's.
ROPE_TYPE_KEYS = {
    "linear": {},
    "llama3": {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "yarn": {"beta_fast": 32.0, "beta_slow": 1.0, "original_max_position_embeddings": None},
}


class RopeScalingConfig(Section):
    """RoPE frequency scaling, in Hugging Face's `rope_scaling` form (config.json)."""

    rope_type: Literal["linear", "llama3", "yarn"] = Field(
        description="'linear': position interpolation (Chen et al. 2023), positions divided by factor (megatron-core's "
                    "seq_len_interpolation_factor); 'llama3': Llama 3.1's frequency-dependent scaling (megatron-core's "
                    "rope_scaling); 'yarn': YaRN (Peng et al. 2023), frequencies whose wavelength exceeds the trained "
                    "length interpolated by factor, short ones kept, a ramp between, and attention logits scaled by "
                    "(0.1 ln(factor) + 1)^2 (megatron-core's YarnRotaryEmbedding).")
    factor: float = Field(gt=0, description="Scaling factor: linear and yarn, the new length over the trained one "
                                            "(L'/L); llama3, 8 for Llama 3.1, 32 for Llama 3.2.")
    low_freq_factor: float | None = Field(None, description="llama3 only: wavelengths above "
                                                            "original_max_position_embeddings / low_freq_factor are "
                                                            "divided by factor. Only 1 (megatron-core's constant).")
    high_freq_factor: float | None = Field(None, description="llama3 only: wavelengths below "
                                                             "original_max_position_embeddings / high_freq_factor are "
                                                             "kept. Only 4 (megatron-core's constant).")
    original_max_position_embeddings: int | None = Field(None, gt=0, description=(
        "The context length the frequencies were trained at. llama3: only 8192 (megatron-core's constant); yarn: "
        "required, the checkpoint's seq_length (L)."))
    beta_fast: float | None = Field(None, gt=0, description="yarn only: frequencies that turn more than beta_fast "
                                                            "times within original_max_position_embeddings are kept; "
                                                            "default 32.")
    beta_slow: float | None = Field(None, gt=0, description="yarn only: frequencies that turn fewer than beta_slow "
                                                            "times are interpolated fully; default 1.")

    @model_validator(mode="after")
    def _keys_of_the_type(self) -> "RopeScalingConfig":
        """Fill the type's defaults; refuse another type's keys, and llama3 constants megatron-core lacks."""
        own = ROPE_TYPE_KEYS[self.rope_type]
        for key in {key for keys in ROPE_TYPE_KEYS.values() for key in keys}:
            given = getattr(self, key)
            if key not in own:
                if given is not None:
                    raise ValueError(f"{key} does not belong to rope_type '{self.rope_type}'")
            elif given is None:
                if own[key] is None:
                    raise ValueError(f"rope_type '{self.rope_type}' needs {key} (the length the checkpoint was "
                                     "trained at)")
                object.__setattr__(self, key, own[key])
            elif self.rope_type == "llama3" and given != own[key]:
                raise ValueError(f"{key} {given} is not supported: megatron-core's llama3 scaling has "
                                 f"{key} {own[key]} built in")
        return self

    def hf_dict(self) -> dict:
        """The entries of Hugging Face's rope_scaling / rope_parameters."""
        return self.model_dump(exclude_none=True)


class ModelConfig(Section):
    """The model's family and dimensions. `preset` fills every field not given explicitly."""

    preset: str | None = Field(None,
                               description="Size preset (see megacpt/model/presets.py), e.g. 'pythia-410m', "
                                           "'neox-10b', 'llama-3.1-8b', 'qwen2.5-0.5b', 'tiny'.")
    family: Literal["neox", "llama", "mistral", "qwen2"] | None = Field(
        None, description="'neox' (GPT-NeoX, Pythia; the default), 'llama' (Llama 2 / 3.x), 'mistral' or 'qwen2' "
                          "(Qwen2 / 2.5): the last three are pre-norm blocks with RMSNorm, SwiGLU, grouped-query "
                          "attention and full RoPE, without biases (qwen2: biases on q, k, v); see "
                          "megacpt/model/families.py.")
    num_layers: int | None = Field(None, gt=0, description="Transformer layers.")
    hidden_size: int | None = Field(None, gt=0, description="Hidden size.")
    num_attention_heads: int | None = Field(None, gt=0, description="Attention (query) heads.")
    num_query_groups: int | None = Field(None, gt=0,
                                         description="Key/value heads of grouped-query attention (Hugging Face's "
                                                     "num_key_value_heads); must divide num_attention_heads; default "
                                                     "num_attention_heads (multi-head attention, the only choice for "
                                                     "neox).")
    ffn_hidden_size: int | None = Field(None, gt=0, description="MLP inner size; default 4 x hidden_size.")
    seq_length: int | None = Field(None, gt=0, description="Tokens per training sample.")
    vocab_size: int | None = Field(None, gt=0,
                                   description="Tokenizer vocabulary size (before padding to a multiple of 128 x "
                                               "tensor parallel).")
    tie_embeddings: bool | None = Field(None, description="One matrix for the input embedding and the output layer "
                                                          "(Hugging Face's tie_word_embeddings; Llama 3.2 1B/3B, small "
                                                          "Qwen2.5); default false. Not for neox.")
    rotary_pct: float | None = Field(None, gt=0, le=1,
                                     description="Fraction of each head's dimensions that get rotary embeddings; "
                                                 "default 0.25 for neox, 1 (the only choice) for the other families.")
    rotary_base: int = Field(10000, gt=0, description="Rotary base (theta; Hugging Face's rope_theta).")
    rope_scaling: RopeScalingConfig | None = Field(None, description="RoPE frequency scaling (Llama 3.1's 'llama3', "
                                                                     "position interpolation, YaRN); omit for plain "
                                                                     "RoPE.")
    parallel_residual: bool | None = Field(None,
                                           description="NeoX parallel residual x + attn(ln1 x) + mlp(ln2 x); false "
                                                       "gives the sequential block. Default true for neox, false (the "
                                                       "only choice) for the other families.")
    layernorm_eps: float = Field(1e-5, gt=0, description="Epsilon of the LayerNorms (neox) or RMSNorms (the other "
                                                          "families; Hugging Face's rms_norm_eps), added to the "
                                                          "variance.")
    sliding_window: int | None = Field(None, gt=0,
                                       description="mistral: the attention window the checkpoint was trained with "
                                                   "(Mistral 7B v0.1: 4096). megacpt attends over the whole sample, "
                                                   "so seq_length may not exceed it.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Hidden and attention dropout (Pythia: 0).")
    init_std: float = Field(0.02, gt=0, description="Standard deviation of the normal weight initialisation.")

    @model_validator(mode="after")
    def _fill_from_preset(self) -> "ModelConfig":
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ValueError(f"unknown preset '{self.preset}'{_did_you_mean(self.preset, PRESETS)}; known: "
                                 f"{', '.join(PRESETS)}")
            for key, value in PRESETS[self.preset].items():
                if key not in self.model_fields_set:
                    object.__setattr__(self, key, RopeScalingConfig(**value) if key == "rope_scaling" else value)
        required = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size")
        missing = [k for k in required if getattr(self, k) is None]
        if missing:
            raise ValueError(f"missing {', '.join(missing)} (give them or a 'preset')")
        neox = (self.family or "neox") == "neox"
        defaults = {"family": "neox", "ffn_hidden_size": 4 * self.hidden_size,
                    "num_query_groups": self.num_attention_heads, "tie_embeddings": False,
                    "rotary_pct": 0.25 if neox else 1.0, "parallel_residual": neox}
        for key, value in defaults.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.rotary_dims % 2 or not self.rotary_dims:
            raise ConfigError("model.rotary_pct", f"{self.rotary_pct} of a head's {self.head_dim} dimensions gives "
                              f"{self.rotary_dims} rotary dimensions (rounded down), which must be even and above 0 "
                              "(rotary embeddings rotate pairs)")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not divisible by num_query_groups "
                             f"{self.num_query_groups}")
        self._check_family()
        return self

    def _check_family(self) -> None:
        """The choices a family fixes (its Hugging Face class has no other)."""
        if self.family == "neox":
            fixed = {"num_query_groups": self.num_attention_heads, "tie_embeddings": False}
        else:
            fixed = {"rotary_pct": 1.0, "parallel_residual": False}
        for key, value in fixed.items():
            if getattr(self, key) != value:
                raise ValueError(f"{key} {getattr(self, key)} is not possible for family '{self.family}', which has "
                                 f"{key} {value}")
        if self.sliding_window is not None and self.family != "mistral":
            raise ValueError(f"sliding_window is Mistral's; family '{self.family}' attends over the whole sample")
        if self.sliding_window is not None and self.seq_length > self.sliding_window:
            raise ValueError(f"seq_length {self.seq_length} exceeds the sliding_window {self.sliding_window}: megacpt "
                             "does not implement Mistral's sliding-window attention, so a longer sample would attend "
                             "further back than the model was trained to; keep seq_length <= sliding_window")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dims(self) -> int:
        """Dimensions of each head that get rotary embeddings (rounded down, as megatron-core and HF do)."""
        return int(self.head_dim * self.rotary_pct)


class ParallelConfig(Section):
    """Model parallelism. Data parallelism is whatever is left of the world size."""

    tensor: int = Field(1, gt=0, description="Tensor-parallel degree.")
    pipeline: int = Field(1, gt=0, description="Pipeline-parallel degree; only 1 is supported (use tensor parallel + "
                                               "ZeRO).")


class TokenizerConfig(Section):
    """How text becomes tokens. Omit the section for data that is already tokenized."""

    type: Literal["sentencepiece", "hf", "byte"] = Field(
        description="'sentencepiece' (a .model file), 'hf' (a tokenizer.json) or 'byte' (no file).")
    model: str | None = Field(None, description="Path of the SentencePiece .model file (type 'sentencepiece').")
    path: str | None = Field(None, description="Path of the Hugging Face tokenizer.json (type 'hf').")

    @model_validator(mode="after")
    def _needs_file(self) -> "TokenizerConfig":
        if self.type == "sentencepiece" and not self.model:
            raise ValueError("type 'sentencepiece' needs 'model' (the .model file)")
        if self.type == "hf" and not self.path:
            raise ValueError("type 'hf' needs 'path' (the tokenizer.json)")
        return self


# A mixture schedule: [step, value] points, piecewise linear, constant outside (`scheduled`).
SchedulePoints = list[tuple[int | float, float]]
_POINTS_RULE = ("[step, value] points whose step is an int (an optimizer step of the stage, >= 0) or a float in "
                "[0, 1] (a fraction of train.steps), in increasing order")


def same_dataset(a: str, b: str) -> bool:
    """Whether dataset prefixes `a` and `b` reach the same data: one path once symlinks are resolved, or .bin
    files that are one file (a symlink, a hard link, a linked folder)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a + ".bin", b + ".bin")
    except OSError:  # a file that does not exist (yet): the paths alone tell
        return False


def check_points(points: SchedulePoints, low: float, high: float, high_open: bool) -> SchedulePoints:
    """Bounds of a mixture schedule's points that need no train.steps (RunConfig checks their order)."""
    if not points:
        raise ValueError(f"a schedule needs at least one point: {_POINTS_RULE}")
    for step, value in points:
        if isinstance(step, float) and not 0 <= step <= 1:
            raise ValueError(f"step {step} is a float, so a fraction of train.steps, and must lie in [0, 1]; give an "
                             "int for an optimizer step")
        if isinstance(step, int) and step < 0:
            raise ValueError(f"step {step} is negative")
        if value < low or value > high or (high_open and value == high):
            bounds = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}{')' if high_open else ']'}"
            raise ValueError(f"value {value} at step {step} must be {bounds}")
    return points


def point_steps(points: SchedulePoints, steps: int) -> list[float]:
    """The optimizer step of each point of a schedule of a stage of `steps` steps."""
    return [x * steps if isinstance(x, float) else float(x) for x, _ in points]


def scheduled(schedule: float | SchedulePoints, stage_steps: int, steps: np.ndarray) -> np.ndarray:
    """The value of `schedule` at each of `steps`: a number everywhere, or its points joined linearly and held
    constant before the first and after the last (a float point step is a fraction of `stage_steps`)."""
    if isinstance(schedule, (int, float)):
        return np.full(len(steps), float(schedule))
    xs = [x * stage_steps if isinstance(x, float) else x for x, _ in schedule]
    return np.interp(steps, xs, [v for _, v in schedule])


class DataSource(Section):
    """One Megatron indexed dataset (PREFIX.bin / PREFIX.idx) with its blend weight."""

    name: str = Field(description="Name used in metrics (`samples`) and the stage history.")
    prefix: str = Field(description="Path prefix of the .bin/.idx pair.")
    long_document_boost: int = Field(1, ge=1, description="Put each document longer than data.long_document_tokens "
                                     "this many times into every epoch of the source (Fu et al. 2024's per-source "
                                     "length upsampling): its samples hold more tokens of long documents, its share "
                                     "of every batch stays its weight's (docs/LONG_CONTEXT.md).")
    weight: float | SchedulePoints = Field(
        1.0, description="Relative weight within its group (new data or replay), >= 0: a number, or a mixture "
                         "schedule, [[step, weight], ...] joined linearly and constant before the first point and "
                         "after the last; an int step is an optimizer step of the stage, a float step in [0, 1] a "
                         "fraction of train.steps (docs/DATA.md).")

    @field_validator("weight")
    @classmethod
    def _weight_bounds(cls, value: float | SchedulePoints) -> float | SchedulePoints:
        if isinstance(value, list):
            return check_points(value, 0.0, math.inf, False)
        if value < 0:
            raise ValueError(f"{value} is negative; weights are >= 0")
        return value


class ReplayConfig(Section):
    """Compute-equivalent replay of earlier data (Ibrahim et al. 2024)."""

    fraction: float | SchedulePoints = Field(
        0.0, description="Share of every batch drawn from the replay sources, in [0, 1); new sources get 1 - "
                         "fraction. A number, or a mixture schedule [[step, fraction], ...] as for a source's weight, "
                         "e.g. [[0, 0.5], [1.0, 0.1]] falls from 50% at the start to 10% at the end.")
    sources: list[DataSource] = Field(default_factory=list, description="Earlier datasets to replay.")
    seen_only: bool = Field(False, description="Replay only the samples an earlier megacpt stage trained on (from the "
                                               "checkpoint's stage history).")

    @field_validator("fraction")
    @classmethod
    def _fraction_bounds(cls, value: float | SchedulePoints) -> float | SchedulePoints:
        if isinstance(value, list):
            return check_points(value, 0.0, 1.0, True)
        if not 0 <= value < 1:
            raise ValueError(f"{value} must lie in [0, 1)")
        return value

    @property
    def any_replay(self) -> bool:
        """Whether some step draws replay samples."""
        return any(v > 0 for _, v in self.fraction) if isinstance(self.fraction, list) else self.fraction > 0


class ValidationSet(Section):
    """A held-out dataset whose loss is reported separately (forgetting vs adaptation)."""

    name: str = Field(description="Name of the validation set in metrics (`eval`).")
    prefix: str = Field(description="Path prefix of the .bin/.idx pair.")


class DataConfig(Section):
    """Training data: new sources, replay, validation sets."""

    sources: list[DataSource] = Field(description="New data for this stage.")
    replay: ReplayConfig = Field(default_factory=ReplayConfig, description="Replay of earlier data.")
    allow_validation_overlap: bool = Field(False, description="Allow a validation prefix that is also a training or "
                                                              "replay prefix (its loss then measures memorisation, "
                                                              "not generalisation).")
    validation: list[ValidationSet] = Field(default_factory=list,
                                            description="Validation sets, each evaluated separately; a prefix that "
                                                        "is also trained on is refused unless "
                                                        "allow_validation_overlap.")
    seed: int = Field(1234, ge=0, le=MAX_SEED, description="Seed of the sample order (shuffling and blending), in "
                                                           "[0, 2**31 - 1].")
    continue_sources: bool = Field(False, description="A source (same prefix) that an earlier stage of the "
                                   "checkpoint's lineage trained on starts at the first sample that stage did not "
                                   "use, with that stage's seed, so nothing repeats until the source's epoch ends "
                                   "(seen-only replay sources excepted); refused when its files changed since.")
    cache_dir: str | None = Field(None, description="Where dataset indices are cached; default RUN_DIR/data_cache.")
    long_document_tokens: int = Field(0, ge=0, description="A document is long when it holds more tokens than "
                                      "this (e.g. the earlier stage's seq_length): the threshold of the sources' "
                                      "long_document_boost and of the reported long-document share.")
    document_mask: bool = Field(False, description="Each token of a packed training sample attends only to earlier "
                                "tokens of its own document (document boundaries from the dataset's index, no EOD "
                                "token needed), as if each document ran alone at positions 0, 1, ...; the label that "
                                "starts a new document carries no loss (docs/LONG_CONTEXT.md). Validation samples "
                                "are always evaluated unmasked.")

    @field_validator("cache_dir")
    @classmethod
    def _cache_dir_path(cls, value: str | None) -> str | None:
        return value if value is None else check_folder_path(value)

    @field_validator("validation")
    @classmethod
    def _held_out(cls, value: list[ValidationSet], info: ValidationInfo) -> list[ValidationSet]:
        if info.data.get("allow_validation_overlap"):
            return value
        replay = info.data.get("replay")
        trained = info.data.get("sources", []) + (replay.sources if replay else [])
        for v in value:
            source = next((s.name for s in trained if same_dataset(s.prefix, v.prefix)), None)
            if source is not None:
                raise ValueError(f"'{v.name}' ({v.prefix}) is also the training data of source '{source}', so its loss "
                                 f"would not measure held-out data; use a held-out file, or set "
                                 f"data.allow_validation_overlap to true if the overlap is intended")
        return value

    def schedules(self) -> dict[str, SchedulePoints]:
        """{dotted key: points} of every weight or fraction given as a mixture schedule."""
        items = {f"data.sources.{i}.weight": s.weight for i, s in enumerate(self.sources)}
        items |= {f"data.replay.sources.{i}.weight": s.weight for i, s in enumerate(self.replay.sources)}
        items["data.replay.fraction"] = self.replay.fraction
        return {key: value for key, value in items.items() if isinstance(value, list)}

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if not self.sources:
            raise ValueError("'sources' needs at least one dataset")
        names = [s.name for s in self.sources + self.replay.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique across sources and replay.sources; repeated: {dupes}")
        for group, items in (("sources", self.sources), ("replay.sources", self.replay.sources)):
            constant = all(isinstance(s.weight, float) for s in items)
            if items and constant and sum(s.weight for s in items) <= 0:
                raise ValueError(f"weights in '{group}' must be >= 0 and sum to more than 0")
        boosted = [s.name for s in self.sources + self.replay.sources if s.long_document_boost > 1]
        if boosted and not self.long_document_tokens:
            raise ValueError(f"sources {boosted} set long_document_boost, which needs long_document_tokens (the length "
                             "above which a document counts as long, e.g. the earlier stage's seq_length)")
        if boosted and (self.continue_sources or self.replay.seen_only):
            raise ValueError(f"sources {boosted} set long_document_boost, which stage records do not keep yet, so a "
                             "boosted stream cannot be continued or replayed seen-only; set continue_sources and "
                             "replay.seen_only to false")
        if self.replay.any_replay and not self.replay.sources:
            raise ValueError("replay.fraction > 0 needs replay.sources")
        for s in self.replay.sources if not self.replay.seen_only else []:
            new = next((n for n in self.sources if same_dataset(n.prefix, s.prefix)), None)
            if new is not None:
                raise ValueError(f"replay source '{s.name}' ({s.prefix}) reads the same files as new source "
                                 f"'{new.name}' ({new.prefix}): replay is earlier data, "
                                 "so this only shifts the blend weights; give the weight to the source instead, or "
                                 "set replay.seen_only to replay just what an earlier stage trained on")
        return self


ScheduleStyle = Literal["constant", "cosine", "linear", "inverse_sqrt", "wsd", "infinite_cosine", "infinite_inv_sqrt"]


class ScheduleConfig(Section):
    """The LR of every step of this stage; see megacpt/schedule.py for the exact formulas."""

    style: ScheduleStyle = Field("cosine",
                                 description="constant | cosine | linear | inverse_sqrt | wsd | infinite_cosine | "
                                             "infinite_inv_sqrt.")
    max_lr: float = Field(3e-4, gt=0, description="Peak LR (eta_max), reached at the end of warmup.")
    min_lr: float = Field(0.0, ge=0, description="Final LR (eta_min).")
    warmup: int | float = Field(0, ge=0,
                                description="Warmup: an int is steps, a float in [0, 1) a fraction of train.steps "
                                            "(rounded).")
    decay_steps: int | None = Field(None, gt=0,
                                    description="cosine/linear: step where the decay reaches min_lr; default "
                                                "train.steps.")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: fraction of train.steps spent cooling down.")
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = Field("1-sqrt", description="wsd: shape of the cooldown.")
    rewarm: bool = Field(True, description="false continues the checkpoint's infinite schedule at const_lr: no "
                                           "warmup, no cooldown, the anneal from constant_end x train.steps "
                                           "(infinite_* with init.mode 'new_stage' only).")
    const_lr: float | None = Field(None, gt=0, validate_default=True,
                                   description="infinite_*: the constant LR (eta_const), between min_lr and max_lr; "
                                               "required for those styles.")
    cooldown_end: float = Field(0.6, ge=0, le=1,
                                description="infinite_*: end of the cooldown, as a fraction of train.steps.")
    constant_end: float = Field(0.85, ge=0, le=1,
                                description="infinite_*: end of the constant phase (start of the anneal); 1 never "
                                            "anneals.")
    timescale: float = Field(10.0, gt=0, description="infinite_inv_sqrt: alpha of h(x) = 1/sqrt(1 + alpha x) - 1.")
    meta: Literal["autoregressive_cosine", "autoregressive_rsqrt"] | None = Field(
        None, description="Lower each later stage's peak (FoMo-in-Flux meta schedules).")

    # Checks that need no train.steps; megacpt.schedule.check_schedule does the ones that do. Field validators
    # (not a model validator) so that the error names the offending key, e.g. 'schedule.min_lr'.

    @field_validator("min_lr")
    @classmethod
    def _min_not_above_max(cls, value: float, info: ValidationInfo) -> float:
        max_lr = info.data.get("max_lr")
        if max_lr is not None and value > max_lr:
            raise ValueError(f"{value} is larger than schedule.max_lr {max_lr}")
        return value

    @field_validator("warmup")
    @classmethod
    def _fraction_below_one(cls, value: int | float) -> int | float:
        if isinstance(value, float) and value >= 1:
            raise ValueError(f"a float is a fraction of train.steps and must be below 1, got {value}; give an int for "
                             "a number of steps")
        return value

    @field_validator("rewarm")
    @classmethod
    def _continue_only_infinite(cls, value: bool, info: ValidationInfo) -> bool:
        style, warmup = info.data.get("style"), info.data.get("warmup")
        if not value and style not in ("infinite_cosine", "infinite_inv_sqrt"):
            raise ValueError(f"false continues an infinite schedule's constant phase; style '{style}' has none (use "
                             "infinite_cosine or infinite_inv_sqrt)")
        if not value and warmup:
            raise ValueError(f"false continues at const_lr without a warmup, but schedule.warmup is {warmup}; set it "
                             "to 0")
        return value

    @field_validator("const_lr")
    @classmethod
    def _const_lr_for_infinite(cls, value: float | None, info: ValidationInfo) -> float | None:
        style, low, high = info.data.get("style"), info.data.get("min_lr"), info.data.get("max_lr")
        if value is None and style in ("infinite_cosine", "infinite_inv_sqrt"):
            raise ValueError(f"is required for style '{style}' (the LR of the constant phase, eta_const)")
        if value is not None and low is not None and high is not None and not low <= value <= high:
            raise ValueError(f"{value} must lie between schedule.min_lr {low} and schedule.max_lr {high}")
        return value

    @field_validator("constant_end")
    @classmethod
    def _phases_in_order(cls, value: float, info: ValidationInfo) -> float:
        cooldown_end = info.data.get("cooldown_end")
        if info.data.get("rewarm") is False:
            return value  # no cooldown: the stage starts in its constant phase
        if cooldown_end is not None and value < cooldown_end:
            raise ValueError(f"{value} is before schedule.cooldown_end {cooldown_end}; the phases end in order: "
                             "cooldown_end <= constant_end <= 1")
        return value

    @field_validator("meta")
    @classmethod
    def _meta_needs_a_peak(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("rewarm") is False:
            raise ValueError("a meta schedule lowers each stage's peak, but schedule.rewarm false has no peak; drop "
                             "one of them")
        return value


class FreezeConfig(Section):
    """Train only the rows of the newest vocabulary extension first (docs/DATA.md)."""

    steps: int = Field(ge=0, description="For this many steps at the start of the stage, train only the input "
                                         "embedding and output rows of the token ids the last `megacpt extend-vocab` "
                                         "of the model's history added; every other weight (and its Adam moments) "
                                         "stays bit-identical. Then everything trains.")


class SpikeConfig(Section):
    """Loss-spike handling (off unless the section is given): skip spiking steps, then roll back past them."""

    zscore: float = Field(6.0, gt=0,
                          description="A step whose loss (mean over the data-parallel ranks) exceeds the mean of the "
                                      "window by more than zscore standard deviations is a spike: skipped like a "
                                      "non-finite step (weights and Adam untouched).")
    window: int = Field(50, ge=2, description="Losses of the most recent applied steps that the mean and standard "
                                              "deviation are taken over; no step is judged before the window is "
                                              "full.")
    max_in_a_row: int = Field(3, gt=0, description="After this many spikes in a row, roll back to the newest "
                                                   "checkpoint saved before the first of them and skip the spiked "
                                                   "batches (recorded in RUN_DIR/spike_ledger.json).")
    lr_factor: float = Field(1.0, gt=0, le=1, description="After a rollback, multiply the LR by this factor ...")
    lr_steps: int = Field(0, ge=0, description="... for this many steps after the checkpoint rolled back to (0: the "
                                               "LR is not lowered).")
    max_rollbacks: int = Field(3, ge=0, description="Stop with exit code 2 when one more rollback than this would be "
                                                    "needed (counted over the run's whole ledger).")


class TrainConfig(Section):
    """The loop: steps, batch sizes, intervals."""

    steps: int = Field(gt=0, le=MAX_STEPS, description="Optimizer steps in this stage (T), at most 10**7 (the schedule "
                                                       "and the blend keep a value per step).")
    global_batch_size: int = Field(gt=0, description="Samples per optimizer step over all data-parallel ranks.")
    micro_batch_size: int = Field(1, gt=0, description="Samples per forward pass per rank.")
    seed: int = Field(1234, ge=0, le=MAX_SEED, description="Seed of the weight initialisation and dropout, in [0, "
                                                           "2**31 - 1].")
    log_interval: int = Field(10, gt=0, description="Steps between training records in metrics.jsonl and the console.")
    eval_interval: int = Field(0, ge=0,
                               description="Steps between evaluations on every validation set; 0 evaluates only at the "
                                           "end.")
    eval_position_bucket: int = Field(0, ge=0,
                                      description="N > 0: every evaluation record also carries eval_by_position, each "
                                                  "validation set's loss over positions 0..N-1, N..2N-1, ... of its "
                                                  "samples (e.g. the earlier stage's seq_length, to see the positions "
                                                  "past it); 0: none.")
    eval_samples: int = Field(64, gt=0,
                              description="Sequences per validation set per evaluation: the first eval_samples of "
                                          "each validation stream, whatever the world size; the eval record's "
                                          "eval_tokens says how many tokens they scored.")
    eval_batches: int | None = Field(None, gt=0,
                                     description="Deprecated alias: eval_samples = eval_batches x micro_batch_size "
                                                 "(at one data-parallel rank, as it used to be).")
    save_interval: int = Field(0, ge=0, description="Steps between checkpoints; 0 saves only at the end.")
    activation_checkpointing: bool = Field(False,
                                           description="Recompute each layer in the backward pass (megatron-core full "
                                                       "recompute).")
    compile: bool = Field(False,
                          description="Compile the model with torch.compile (DeepSpeed's engine.compile(): "
                                      "TorchInductor kernels for the forward and backward pass, on CPU and GPU). "
                                      "Losses equal the uncompiled model's to float rounding; checkpoints are the same "
                                      "files. The first steps pay the compilation (tens of seconds to minutes); "
                                      "BENCHMARKS.md has the measured speed.")
    freeze: FreezeConfig | None = Field(None, description="Train only the new vocabulary rows for the stage's first "
                                                          "steps; omit to train everything from the start.")
    max_skipped_steps: int = Field(10, gt=0,
                                   description="Stop after this many consecutive skipped steps (a non-finite loss or "
                                               "grad norm, or an fp16 overflow).")
    spike: SpikeConfig | None = Field(None, description="Loss-spike detection, skipping and rollback; omit to not "
                                                        "use it.")

    @model_validator(mode="before")
    @classmethod
    def _eval_batches_alias(cls, data):
        """The deprecated eval_batches becomes eval_samples (and is dropped, so a saved config reloads)."""
        if isinstance(data, dict) and data.get("eval_batches") is not None:
            if "eval_samples" in data:
                raise ValueError("set train.eval_samples only; train.eval_batches is its deprecated alias")
            data = {**data, "eval_samples": data["eval_batches"] * data.get("micro_batch_size", 1),
                    "eval_batches": None}
        return data


class InitConfig(Section):
    """Where the weights come from: a fresh init, or a checkpoint as a new stage."""

    checkpoint: str | None = Field(None, description="A checkpoints folder (its `latest`) or one tag folder in it.")
    mode: Literal["resume", "new_stage"] = Field(
        "new_stage", description="'new_stage' starts a new schedule on the loaded weights; 'resume' continues that "
                                 "checkpoint's stage.")
    load_optimizer: bool = Field(False,
                                 description="Keep Adam's moments and step counts from the checkpoint; LR, betas, eps "
                                             "and weight decay still come from this config.")
    load_scheduler: bool = Field(False,
                                 description="Continue the checkpoint's schedule position instead of starting at t = "
                                             "0.")
    load_data_position: bool = Field(False,
                                     description="Continue the checkpoint's data position instead of starting the data "
                                                 "at its beginning.")


class CheckpointConfig(Section):
    """Checkpoint retention, and which of RUN_DIR's tags a resume starts from."""

    async_save: bool = Field(False, description="Write DeepSpeed's files while the next steps compute, at ZeRO stage "
                                                "0, 1 and 2: each rank copies its share of the tag (model states, its "
                                                "optimizer partition) to host memory at the step boundary, and a "
                                                "background thread writes the copy (the same bytes as a synchronous "
                                                "save). The manifest and `latest` follow once every rank's files are "
                                                "written; the next save, the last step and a stop wait for it. Costs "
                                                "host memory for one copy of the rank's share of the tag.")

    keep_last: int | None = Field(None, gt=0,
                                  description="Keep only the newest N tags (older ones are removed after a new one is "
                                              "complete).")
    load_tag: str | None = Field(
        None, pattern=r"^step\d{8}$",
        description="Resume from this tag of RUN_DIR/checkpoints (e.g. 'step00001000') instead of the one `latest` "
                    "names, e.g. when a newer one fails verification; newer tags are moved aside to "
                    "NAME.superseded, never overwritten. Give it for one start (`--set`), not in the config file.")


class WandbConfig(Section):
    """A Weights & Biases run that receives every metrics.jsonl record (needs the 'wandb' extra)."""

    project: str = Field(description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (user or team); default: your W&B default entity.")
    name: str | None = Field(None, description="Run name; default: the run dir's folder name.")
    group: str | None = Field(
        None, description="Run group; default: the name of the first stage of the model's stage history, so that "
        "every stage of one chain lands in one group.")
    tags: list[str] = Field(default_factory=list, description="Run tags; `stage<N>` is always added.")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="'offline' writes RUN_DIR/wandb/offline-run-* for a later `wandb sync`; "
        "'online' needs a W&B login (WANDB_API_KEY or `wandb login`).")


class LoggingConfig(Section):
    """Where metrics go besides RUN_DIR/metrics.jsonl."""

    tensorboard: bool = Field(False,
                              description="Also write TensorBoard events to RUN_DIR/tensorboard (needs the 'tb' "
                                          "extra).")
    wandb: WandbConfig | None = Field(None, description="Also log to Weights & Biases; omit to not use it.")
    sample_ledger: bool = Field(False, description="Write RUN_DIR/samples.jsonl: per optimizer step, the ids of the "
                                "samples of each source it trained on (`megacpt data show RUN_DIR --step S` prints "
                                "them); rewritten up to the checkpoint's step on a resume.")


# Every top-level key DeepSpeed reads from its config (tests/test_faults.py checks the list against DeepSpeed's
# own reading of a config); any other key of the `deepspeed` section is a mistake, such as a typo.
DEEPSPEED_KEYS = frozenset({
    "activation_checkpointing", "aio", "amp", "autotuning", "bf16", "bfloat16", "checkpoint", "comet", "comms_logger",
    "communication_data_type", "compile", "compression_training", "csv_monitor", "curriculum_learning",
    "data_efficiency", "data_types", "dataloader_drop_last", "datastates_ckpt", "disable_allgather",
    "disable_python_gc", "dump_state", "eigenvalue", "elasticity", "expert_parallel", "flops_profiler", "fp16",
    "gradient_accumulation_steps", "gradient_allreduce_op", "gradient_clipping", "gradient_predivide_factor",
    "graph_harvesting", "hybrid_engine", "log_level", "managed_gradient_accumulation", "memory_breakdown", "nebula",
    "optimizer", "pipeline", "prescale_gradients", "progressive_layer_drop", "quantize_training", "scheduler",
    "seq_parallel_communication_data_type", "sequence_parallel_size", "sparse_attention", "sparse_gradients",
    "steps_per_print",
    "tensor_parallel", "tensorboard", "timers", "torch_autocast", "train_batch_size", "train_micro_batch_size_per_gpu",
    "use_data_before_expert_parallelism", "vocabulary_size", "wall_clock_breakdown", "wandb", "weight_quantization",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "zero_optimization"})


class DeepSpeedPart(BaseModel):
    """A part of the `deepspeed` section megacpt reads: its keys here are typed and checked (no conversions: 2 is
    not "2"; null: megacpt's default, see the JSON below); DeepSpeed's other keys of the part pass through."""

    model_config = ConfigDict(extra="allow", strict=True)


class ZeroSection(DeepSpeedPart):
    """ZeRO: the training state partitioned over the data-parallel ranks; DeepSpeed's other ZeRO keys (offload,
    bucket sizes, ...) pass through."""

    stage: int | None = Field(None, ge=0, le=3, description="0 off (megacpt's default), 1 partitions Adam's states, "
                                                            "2 also the gradients, 3 also the weights.")


class PrecisionSection(DeepSpeedPart):
    """bf16 or fp16 training (on a GPU; without one megacpt trains in fp32); DeepSpeed's other keys (loss
    scaling, ...) pass through."""

    enabled: bool | None = Field(None, description="Train in this precision; megacpt enables bf16 unless fp16 is "
                                                   "given.")


class AdamParams(BaseModel):
    """AdamW's arguments (torch's AdamW, or DeepSpeed's CPU Adam when the optimizer is offloaded); no others."""

    model_config = ConfigDict(extra="forbid", strict=True)

    lr: None = Field(None, description="Refused: schedule.max_lr and the schedule set the LR of every step.")
    betas: list[float] | None = Field(None, min_length=2, max_length=2, description="Adam's [beta1, beta2], each in "
                                                                                    "[0, 1); default [0.9, 0.95].")
    eps: float | None = Field(None, gt=0, description="Adam's epsilon; default 1e-8.")
    weight_decay: float | None = Field(None, ge=0, description="Decoupled weight decay of matrices (biases and norms "
                                                               "get none); default 0.1.")
    torch_adam: bool | None = Field(None, description="torch's AdamW instead of DeepSpeed's fused op; default true "
                                                      "unless the optimizer is offloaded.")
    fused: bool | None = Field(None, description="torch's fused AdamW kernel; default true unless offloaded.")
    adam_w_mode: bool | None = Field(None, description="Decoupled weight decay (AdamW); false is Adam's L2 penalty.")
    amsgrad: bool | None = Field(None, description="The AMSGrad variant.")

    @field_validator("lr", mode="before")
    @classmethod
    def _schedule_sets_lr(cls, value: Any) -> None:
        raise ValueError("is set by schedule.max_lr and the schedule before every step; remove it")

    @field_validator("betas")
    @classmethod
    def _betas_below_one(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and not all(0 <= beta < 1 for beta in value):
            raise ValueError(f"{value}: each beta must lie in [0, 1)")
        return value


class OptimizerSection(BaseModel):
    """The optimizer: AdamW only (megacpt's parameter groups and schedule assume it)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: str | None = Field(None, description="'AdamW' or 'Adam' (any case); default AdamW.")
    params: AdamParams | None = Field(None, description="AdamW's arguments.")

    @field_validator("type")
    @classmethod
    def _adam_only(cls, value: str | None) -> str | None:
        if value is not None and value.lower() not in ("adamw", "adam"):
            raise ValueError(f"'{value}' is not supported; use AdamW")
        return value


class DeepSpeedSection(DeepSpeedPart):
    """The keys of the `deepspeed` section that megacpt reads or fills."""

    train_batch_size: int | None = Field(None, gt=0, description="Filled from train.global_batch_size; a value that "
                                                                 "disagrees is refused.")
    train_micro_batch_size_per_gpu: int | None = Field(None, gt=0, description="Filled from train.micro_batch_size; "
                                                                               "a value that disagrees is refused.")
    gradient_accumulation_steps: int | None = Field(None, gt=0, description="Filled from the batch arithmetic; a "
                                                                            "value that disagrees is refused.")
    optimizer: OptimizerSection | None = Field(None, description="AdamW and its arguments.")
    scheduler: None = Field(None, description="Refused: megacpt's `schedule` section sets the LR.")
    gradient_clipping: float | None = Field(None, ge=0, description="Clip the global gradient norm to this value; 0 "
                                                                    "does not clip; default 1.0.")
    zero_optimization: ZeroSection | None = Field(None, description="ZeRO.")
    bf16: PrecisionSection | None = Field(None, description="bf16 training.")
    fp16: PrecisionSection | None = Field(None, description="fp16 training.")
    steps_per_print: int | None = Field(None, gt=0, description="DeepSpeed's own progress lines (megacpt logs its "
                                                                "own; default never).")
    wall_clock_breakdown: bool | None = Field(None, description="DeepSpeed's timing breakdown; default false.")

    @field_validator("scheduler", mode="before")
    @classmethod
    def _schedule_sets_lr(cls, value: Any) -> None:
        raise ValueError("megacpt's 'schedule' section sets the LR; remove DeepSpeed's scheduler")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        for key in data if isinstance(data, dict) else ():
            if key not in DEEPSPEED_KEYS:
                hint = _did_you_mean(key, DEEPSPEED_KEYS)
                raise ConfigError(f"deepspeed.{key}", f"is not a key of DeepSpeed's config{hint}")
        return data


class RunConfig(Section):
    """One training run (one stage)."""

    run_dir: str = Field(description="Folder for metrics.jsonl, the resolved config and checkpoints/.")
    model: ModelConfig = Field(description="Model dimensions.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Tensor/pipeline parallelism.")
    tokenizer: TokenizerConfig | None = Field(None, description="Tokenizer; omit for pre-tokenized data.")
    data: DataConfig = Field(description="Datasets.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="LR schedule of this stage.")
    train: TrainConfig = Field(description="Training loop.")
    init: InitConfig = Field(default_factory=InitConfig, description="Initial weights and what else to load.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoint retention.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Extra metric sinks.")
    deepspeed: dict[str, Any] = Field(default_factory=dict,
                                      description="Native DeepSpeed config; megacpt checks the keys it reads or fills "
                                                  "(below) and fills batch sizes, optimizer and defaults it derives.")

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Checked against DeepSpeedSection, kept as written (megacpt fills the rest when it builds the engine)."""
        try:
            DeepSpeedSection.model_validate(value)
        except ValidationError as e:
            raise _first_error(e, value, None, DeepSpeedSection, "deepspeed") from None
        return value

    @field_validator("run_dir")
    @classmethod
    def _run_dir_path(cls, value: str) -> str:
        return check_folder_path(value)

    @model_validator(mode="after")
    def _check_cross_section(self) -> "RunConfig":
        if self.parallel.pipeline != 1:
            raise ValueError("parallel.pipeline > 1 is not supported; use parallel.tensor and ZeRO "
                             "(deepspeed.zero_optimization.stage)")
        if self.model.num_attention_heads % self.parallel.tensor:
            raise ValueError(f"model.num_attention_heads {self.model.num_attention_heads} is not divisible by "
                             f"parallel.tensor {self.parallel.tensor}")
        if self.model.num_query_groups % self.parallel.tensor:
            raise ValueError(f"model.num_query_groups {self.model.num_query_groups} is not divisible by "
                             f"parallel.tensor {self.parallel.tensor}: tensor parallelism gives each rank whole "
                             "key/value groups")
        if self.model.ffn_hidden_size % self.parallel.tensor:
            raise ValueError(f"model.ffn_hidden_size {self.model.ffn_hidden_size} is not divisible by parallel.tensor "
                             f"{self.parallel.tensor}")
        if self.train.global_batch_size % self.train.micro_batch_size:
            raise ValueError(f"train.global_batch_size {self.train.global_batch_size} is not a multiple of "
                             f"train.micro_batch_size {self.train.micro_batch_size}")
        if self.init.mode == "resume" and self.init.checkpoint is None:
            raise ValueError("init.mode 'resume' needs init.checkpoint")
        check_mixture_schedules(self.data, self.train.steps)
        return self

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.model.vocab_size, self.parallel.tensor)

    @property
    def data_cache_dir(self) -> Path:
        return Path(self.data.cache_dir) if self.data.cache_dir else Path(self.run_dir) / DATA_CACHE


def check_mixture_schedules(data: DataConfig, steps: int) -> None:
    """Each schedule's points in increasing step order, and each group's weights summing to more than 0 at
    every step of the stage (raised as a ConfigError naming the key: pydantic passes it through)."""
    schedules = data.schedules()
    for key, points in schedules.items():
        at = point_steps(points, steps)
        for (x0, _), (x1, _), s0, s1 in zip(points, points[1:], at, at[1:]):
            if s1 <= s0:
                raise ConfigError(key, f"the steps must increase, but step {x1} (= step {s1:g} of train.steps "
                                       f"{steps}) comes after step {x0} (= step {s0:g}); {_POINTS_RULE}")
    every = np.arange(steps, dtype=np.float64)
    for key, items in (("data.sources", data.sources), ("data.replay.sources", data.replay.sources)):
        if not any(k.startswith(key + ".") for k in schedules) or (key == "data.replay.sources" and not items):
            continue
        total = sum(scheduled(s.weight, steps, every) for s in items)
        if (total <= 0).any():
            step = int(np.argmax(total <= 0))
            raise ConfigError(key, f"the weights sum to 0 at step {step}; at every step some source of the group "
                                   "needs a weight above 0")


def padded_vocab_size(vocab_size: int, tensor_parallel: int) -> int:
    """Pad the vocabulary to a multiple of 128 x TP, as GPT-NeoX/Pythia do."""
    multiple = 128 * tensor_parallel
    return int(math.ceil(vocab_size / multiple) * multiple)


def batch_arithmetic(train: TrainConfig, data_parallel: int) -> int:
    """Gradient accumulation steps for global = micro x accumulation x data parallel; error if it is not whole."""
    per_step = train.micro_batch_size * data_parallel
    if train.global_batch_size % per_step:
        raise ConfigError(
            "train.global_batch_size",
            f"{train.global_batch_size} must be a multiple of micro_batch_size x data-parallel size = "
            f"{train.micro_batch_size} x {data_parallel} = {per_step}",
        )
    return train.global_batch_size // per_step


# ---------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a JSON config, apply `dotted.key=value` overrides and validate it."""
    raw = read_config_file(path)
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw, source=str(path))


def read_config_file(path: str | Path) -> dict:
    """The JSON object of a config file, not yet validated (a sweep's base may lack what each run adds)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text: byte {e.start} is {e.object[e.start:e.start + 1]!r}; "
                        "save it as UTF-8") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"config file {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a JSON object at the top level")
    return raw


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in a raw config dict; the value is parsed as JSON when it can be, else kept as text."""
    key, sep, value_text = item.partition("=")
    if not sep or not key:
        raise UserError(f"--set expects dotted.key=value, got '{item}'")
    try:
        value = json.loads(value_text)
    except json.JSONDecodeError:
        value = value_text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(key, f"cannot set a field inside '{part}', which is not a section")
        node = child
    node[parts[-1]] = value


def validate_config(raw: dict, source: str | None = None) -> RunConfig:
    """Validate a raw dict against the schema, turning pydantic's report into one `ConfigError`."""
    refuse_non_finite(raw, "", source)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise _first_error(e, raw, source) from None
    except ConfigError as e:  # raised by a cross-section check, which does not know the file
        raise ConfigError(e.key, e.message, e.source or source) from None


def _first_error(e: ValidationError, raw: dict, source: str | None, root: type[BaseModel] | None = None,
                 prefix: str = "") -> ConfigError:
    """The first problem of a validation of `raw` against `root` (RunConfig), whose keys start with `prefix`."""
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"]]
    key = ".".join(([prefix] if prefix else []) + loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        section = _section_model(loc[:-1], root or RunConfig)
        known = list(section.model_fields) if section else []
        return ConfigError(key, f"unknown key{_did_you_mean(loc[-1], known)}", source)
    if err["type"] == "missing":
        return ConfigError(key, "is required", source)
    if err["type"] == "model_type":  # pydantic names the class; the user wrote JSON
        return ConfigError(key, f"must be a section (a JSON object), got {json.dumps(_lookup(raw, err['loc']))}",
                           source)
    message = err["msg"].removeprefix("Value error, ")
    given = _lookup(raw, err["loc"])
    if err["type"] != "value_error" and given is not _MISSING:
        message += f" (got {json.dumps(given)})"
    return ConfigError(key, message, source)


def refuse_non_finite(value: Any, key: str, source: str | None) -> None:
    """Infinity and NaN, which JSON readers (and so --set) accept, are the value of no key, the `deepspeed`
    section's included."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"is {json.dumps(value)}; give a finite number", source)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for part, item in items:
        refuse_non_finite(item, f"{key}.{part}" if key else str(part), source)


_MISSING = object()


def _lookup(raw: Any, loc: tuple) -> Any:
    for part in loc:
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return raw


def _section_model(loc: list[str], model: type[BaseModel]) -> type[BaseModel] | None:
    """The pydantic model under `model` that holds the field at `loc` (list indices skipped)."""
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = inner_model(field.annotation)
        if model is None:
            return None
    return model


def inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = inner_model(arg)
        if found:
            return found
    return None


def _did_you_mean(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def dump_config(config: RunConfig) -> dict:
    """The resolved config as plain JSON data (presets expanded)."""
    return config.model_dump(mode="json")
