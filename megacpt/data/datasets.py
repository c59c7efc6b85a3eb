"""Training and validation datasets over Megatron indexed files, with compute-equivalent replay.

The blend is megatron-core's own (`BlendedMegatronDatasetBuilder` -> `GPTDataset` / `BlendedDataset`, a
deterministic greedy interleave that keeps every prefix of the sample stream at the target mix). megacpt
adds the CPT policy on top: new sources share 1 - replay.fraction of the weight and replay sources share
replay.fraction, so replay takes part of the batch instead of adding compute. It also checks every file
before any compute is spent, and says for each sample which source it came from.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from megacpt.config import DataConfig
from megacpt.data.documents import DOCUMENT_BYTES_SUFFIX
from megacpt.errors import UserError
from megacpt.stages import StageRecord, TrainedStage

# Scan at most this many tokens for out-of-vocabulary ids (larger files are checked on evenly spaced chunks).
_FULL_SCAN_TOKENS = 1 << 28
_CHUNK_TOKENS = 1 << 22


@dataclass(frozen=True)
class WeightedSource:
    name: str
    prefix: str
    weight: float


def blend_weights(data: DataConfig) -> list[WeightedSource]:
    """Normalised blend: new sources share 1 - f, replay sources share f; zero-weight sources are left out."""
    fraction = data.replay.fraction
    groups = [(data.sources, 1.0 - fraction), (data.replay.sources, fraction)]
    blend = []
    for sources, share in groups:
        total = sum(s.weight for s in sources)
        for s in sources:
            weight = share * s.weight / total if total > 0 else 0.0
            if weight > 0:
                blend.append(WeightedSource(s.name, s.prefix, weight))
    return blend


_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count


def check_index_file(idx_path: str, key: str) -> None:
    """The .idx header is megatron's and its size matches the counts it declares.

    Checked by hand before megatron opens the file: a truncated or empty index otherwise fails inside
    IndexedDataset's constructor and its __del__ then prints a second traceback.
    """
    with open(idx_path, "rb") as f:
        header = f.read(_IDX_HEADER)
    if len(header) < _IDX_HEADER or header[:9] != _IDX_MAGIC:
        raise UserError(f"{key}: {idx_path} is not a Megatron index (it is {os.path.getsize(idx_path)} bytes and does "
                        f"not start with the MMIDIDX header); rebuild it with `megacpt preprocess`")
    sequences, documents = np.frombuffer(header[18:], dtype=np.uint64)
    expected = _IDX_HEADER + int(sequences) * (4 + 8) + int(documents) * 8
    actual = os.path.getsize(idx_path)
    if actual != expected:
        raise UserError(f"{key}: {idx_path} is {actual} bytes, but its header declares {sequences} sequences and "
                        f"{documents} document boundaries ({expected} bytes): truncated or overwritten; rebuild it "
                        f"with `megacpt preprocess`")


def check_indexed_dataset(prefix: str, key: str, vocab_size: int, seq_length: int | None = None) -> None:
    """Fail with the file's name before training if a dataset is missing, truncated, out of vocabulary or
    shorter than one sample of `seq_length` tokens (which megatron would silently repeat)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise UserError(f"{key}: dataset file {path} does not exist (prefix '{prefix}' needs {prefix}.bin and "
                            f"{prefix}.idx)")
    check_index_file(idx_path, key)
    if os.path.getsize(bin_path) == 0:
        raise UserError(f"{key}: {bin_path} is empty (0 bytes) while {idx_path} describes tokens; rebuild the pair "
                        "with `megacpt preprocess`")
    try:
        dataset = IndexedDataset(prefix, mmap=True)
    except (AssertionError, ValueError, OSError) as e:
        raise UserError(f"{key}: {idx_path} is not a valid Megatron index ({e or type(e).__name__})") from None
    index = dataset.index
    if len(index) == 0:
        raise UserError(f"{key}: {idx_path} holds no sequences")
    itemsize = np.dtype(index.dtype).itemsize
    expected = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * itemsize
    actual = os.path.getsize(bin_path)
    if actual < expected:
        raise UserError(f"{key}: {bin_path} is truncated: {actual} bytes, but {idx_path} describes {expected}")
    tokens = int(np.sum(index.sequence_lengths, dtype=np.int64))
    if seq_length is not None and tokens < seq_length + 1:
        raise UserError(f"{key}: {prefix} holds {tokens} tokens, fewer than one sample needs (model.seq_length "
                        f"{seq_length} + 1); megatron would repeat it over and over. Use more data or a shorter "
                        "model.seq_length")
    _check_token_range(bin_path, index.dtype, expected // itemsize, vocab_size, key)


def _check_token_range(bin_path: str, dtype, num_tokens: int, vocab_size: int, key: str) -> None:
    if np.iinfo(dtype).max < vocab_size:
        return  # every id the dtype can hold is in the vocabulary
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(num_tokens,))
    if num_tokens <= _FULL_SCAN_TOKENS:
        starts = range(0, num_tokens, _CHUNK_TOKENS)
    else:
        starts = np.linspace(0, num_tokens - _CHUNK_TOKENS, _FULL_SCAN_TOKENS // _CHUNK_TOKENS).astype(np.int64)
    for start in starts:
        chunk = tokens[start:start + _CHUNK_TOKENS]
        top = int(chunk.max())
        if top >= vocab_size:
            position = start + int(np.argmax(chunk >= vocab_size))
            raise UserError(f"{key}: {bin_path} holds token id {top} at token {position}, but model.vocab_size is "
                            f"{vocab_size}")


def check_data(data: DataConfig, vocab_size: int, seq_length: int) -> None:
    """Check every training, replay and validation dataset of the config."""
    for group, sources in (("data.sources", data.sources), ("data.replay.sources", data.replay.sources),
                           ("data.validation", data.validation)):
        for i, source in enumerate(sources):
            check_indexed_dataset(source.prefix, f"{group}[{i}] ({source.name})", vocab_size, seq_length)


class _DatasetTokenizer:
    """The two facts megatron's GPTDataset asks of a tokenizer (no padding token: samples are full length)."""

    def __init__(self, vocab_size: int, eod: int | None):
        self.vocab_size = vocab_size
        self.eod = eod
        self.unique_identifiers = {"vocab_size": vocab_size, "eod": eod}  # part of megatron's cache hash


class SourceTaggedDataset:
    """A training sample stream where every index also tells which source it came from."""

    def __init__(self, dataset, names: list[str]):
        self.dataset = dataset
        self.names = names
        # BlendedDataset knows each sample's source; a single GPTDataset has only one.
        index = getattr(dataset, "dataset_index", None)
        self.source_index = np.asarray(index) if index is not None else np.zeros(len(dataset), dtype=np.int16)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict:
        return self.dataset[idx]

    def samples_per_source(self, consumed: int) -> dict[str, int]:
        """How many of the first `consumed` samples came from each source."""
        counts = np.bincount(self.source_index[:consumed], minlength=len(self.names))
        return {name: int(n) for name, n in zip(self.names, counts)}


def files_cache_dir(cache_dir: str, prefixes: list[str]) -> str:
    """The cache folder for indices built over these files: keyed by each .bin/.idx's path, size and mtime.

    megatron's own cache key names the files but not their contents, so a dataset rewritten under the same
    prefix would reuse indices built for the old one (and fail with an IndexError, or silently read other
    samples). A new key rebuilds them instead.
    """
    identity = []
    for prefix in prefixes:
        for path in (prefix + ".idx", prefix + ".bin"):
            info = os.stat(path)
            identity.append([os.path.abspath(path), info.st_size, info.st_mtime_ns])
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"files-{digest}")


def _gpt_config(blend, seq_length: int, seed: int, cache_dir: str, vocab_size: int, eod: int | None):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split="100,0,0",
        path_to_cache=files_cache_dir(cache_dir, blend[0]),
        tokenizer=_DatasetTokenizer(vocab_size, eod),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )


def _build(config, num_samples: int) -> object:
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
    return train


def build_train_dataset(data: DataConfig, num_samples: int, seq_length: int, cache_dir: str,
                        vocab_size: int, eod: int | None,
                        earlier_stages: list[StageRecord] = ()) -> SourceTaggedDataset:
    """The blended training stream of at least `num_samples` samples. Call on every rank (rank 0 builds first).

    With `replay.seen_only`, each replay source yields only samples that an earlier stage (from the
    checkpoint's stage history) trained on; megatron's interleave still decides when a replay sample comes.
    """
    blend = blend_weights(data)
    os.makedirs(cache_dir, exist_ok=True)
    weights = [s.weight for s in blend] if len(blend) > 1 else None
    config = _gpt_config(([s.prefix for s in blend], weights), seq_length, data.seed, cache_dir, vocab_size, eod)
    dataset = _build(config, num_samples)
    if data.replay.seen_only:
        replay_names = {s.name for s in data.replay.sources}
        for i, source in enumerate(blend):
            if source.name in replay_names:
                dataset.datasets[i] = seen_samples(source, list(earlier_stages), cache_dir, vocab_size, eod, data.seed)
    return SourceTaggedDataset(dataset, [s.name for s in blend])


class SeenSamples:
    """The samples of one source that an earlier stage trained on, replayed in a seeded order (reshuffled per pass)."""

    def __init__(self, dataset, sample_ids: np.ndarray, seed: int):
        self.dataset, self.sample_ids, self.seed = dataset, sample_ids, seed

    def __getitem__(self, idx: int) -> dict:
        rounds, position = divmod(int(idx), len(self.sample_ids))
        order = np.random.default_rng([self.seed, rounds]).permutation(len(self.sample_ids))
        return self.dataset[int(self.sample_ids[order[position]])]


def seen_samples(source: WeightedSource, stages: list[StageRecord], cache_dir: str, vocab_size: int, eod: int | None,
                 seed: int) -> SeenSamples:
    """Rebuild the latest earlier megacpt stage that read `source.prefix` and keep the samples it consumed from it
    (an imported stage has no data megacpt could replay)."""
    for stage in reversed(stages):
        if not isinstance(stage, TrainedStage) or stage.steps_done == 0:
            continue
        earlier = stage.data
        names = [s.name for s in earlier.sources + earlier.replay.sources if s.prefix == source.prefix]
        if not names:
            continue
        consumed = stage.steps_done * stage.global_batch_size
        old = build_train_dataset(earlier, stage.steps * stage.global_batch_size, stage.seq_length,
                                  cache_dir, vocab_size, eod, stages[: stage.index])
        k = old.names.index(names[0])
        positions = np.flatnonzero(old.source_index[:consumed] == k)
        blended = hasattr(old.dataset, "dataset_sample_index")
        sample_ids = np.asarray(old.dataset.dataset_sample_index)[positions] if blended else positions
        if len(sample_ids) == 0:
            continue
        return SeenSamples(old.dataset.datasets[k] if blended else old.dataset, sample_ids, seed)
    raise UserError(f"data.replay.seen_only: no earlier stage in the checkpoint's stage history trained on "
                    f"'{source.name}' ({source.prefix}); set init.checkpoint to a megacpt checkpoint whose history "
                    f"includes it, or set data.replay.seen_only to false")


def build_validation_datasets(data: DataConfig, num_samples: int, seq_length: int, cache_dir: str,
                              vocab_size: int, eod: int | None) -> dict[str, object]:
    """One dataset per validation set, each of `num_samples` samples, evaluated separately."""
    os.makedirs(cache_dir, exist_ok=True)
    out = {}
    for val in data.validation:
        config = _gpt_config(([val.prefix], None), seq_length, data.seed, cache_dir, vocab_size, eod)
        out[val.name] = _build(config, num_samples)
    return out


def validation_bytes(dataset, num_samples: int) -> tuple[int, float] | None:
    """(label tokens, UTF-8 bytes of the text they encode) of samples 0..num_samples-1 of a validation GPTDataset,
    or None when its data has no PREFIX.bytes.npy (preprocessed before megacpt recorded bytes).

    A sample is a window of seq_length + 1 tokens across documents; its seq_length labels are all of it but the
    first token. Each label token is counted as its document's bytes per token (document bytes / document
    tokens), so the bytes of a sample are exact for every document the evaluated samples hold entirely and a
    document-average share for a document cut by a window edge: exact in total when windows tile whole
    documents, and within the byte-per-token variation inside a document otherwise.
    """
    path = dataset.dataset.path_prefix + DOCUMENT_BYTES_SUFFIX
    if not os.path.isfile(path):
        return None
    doc_bytes = np.load(path)
    doc_tokens = dataset.dataset.sequence_lengths
    if len(doc_bytes) != len(doc_tokens):
        raise UserError(f"{path} has {len(doc_bytes)} documents, {dataset.dataset.path_prefix}.idx has "
                        f"{len(doc_tokens)}; preprocess the data again")
    per_token = doc_bytes / np.maximum(doc_tokens, 1)
    documents, samples = dataset.document_index, dataset.sample_index
    tokens, size = 0, 0.0
    for i in range(num_samples):
        j = dataset.shuffle_index[i]
        (first, first_offset), (last, last_offset) = samples[j], samples[j + 1]
        for k in range(first, last + 1):
            doc = documents[k]
            start = first_offset + 1 if k == first else 0  # the window's first token is no label
            stop = last_offset + 1 if k == last else doc_tokens[doc]
            tokens += int(stop - start)
            size += (stop - start) * per_token[doc]
    return tokens, size
