"""Training and validation datasets over Megatron indexed files, with compute-equivalent replay.

Each source is megatron-core's own `GPTDataset` (its document and sample shuffle, cached indices), one epoch
at a time. Which source each position of the stream takes is megacpt's exact per-batch apportionment
(megacpt.data.blend) instead of megatron's `BlendedDataset`, whose greedy interleave keeps only prefixes of
the whole stream at the mix. The CPT policy: new sources share 1 - replay.fraction of every batch and replay
sources share replay.fraction (either may follow a mixture schedule over the stage's steps), so replay takes
part of the batch instead of adding compute. Every file is
checked before any compute is spent, and the stream says for each sample which source it came from.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from megacpt.config import DataConfig, DataSource
from megacpt.data.blend import Blend, batch_counts, batch_shares
from megacpt.data.documents import DOCUMENT_BYTES_SUFFIX
from megacpt.errors import UserError
from megacpt.stages import StageRecord, TrainedStage

# Scan at most this many tokens for out-of-vocabulary ids (larger files are checked on evenly spaced chunks).
_FULL_SCAN_TOKENS = 1 << 28
_CHUNK_TOKENS = 1 << 22


def blend_members(data: DataConfig) -> tuple[list[DataSource], list[DataSource]]:
    """The new and the replay sources that take part in the blend: a source whose weight is a constant 0, and
    every replay source at a constant replay.fraction of 0, are left out."""
    new = [s for s in data.sources if s.weight != 0]
    replay = [s for s in data.replay.sources if s.weight != 0] if data.replay.fraction != 0 else []
    return new, replay


def build_blend(data: DataConfig, stage_steps: int, batch_size: int, num_samples: int) -> tuple[Blend, list[str]]:
    """The blend of a stream of at least `num_samples` samples (batch b follows the mix of step b of a stage of
    `stage_steps` steps) and the names of its sources, in the blend's order."""
    new, replay = blend_members(data)
    num_batches = -(-num_samples // batch_size)
    shares = batch_shares(data.replay.fraction, [s.weight for s in new], [s.weight for s in replay], stage_steps,
                          num_batches)
    return Blend(batch_counts(shares, [len(new), len(replay)], batch_size), batch_size), [s.name for s in new + replay]


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


def _build(config, num_samples: int | None) -> object:
    """megatron's GPTDataset for one prefix: `num_samples` samples, or exactly one epoch for None."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
    return train


class SourceStream:
    """The samples of one source in order: epoch e is megatron's one-epoch GPTDataset built with seed + e.

    Sample n never depends on how many samples are asked for, so a longer stage reads the same first samples.
    """

    def __init__(self, prefix: str, num_samples: int, seq_length: int, seed: int, cache_dir: str, vocab_size: int,
                 eod: int | None):
        def epoch(e: int):
            return _build(_gpt_config(([prefix], None), seq_length, seed + e, cache_dir, vocab_size, eod), None)

        first = epoch(0)
        self.epoch_size = len(first)
        self.epochs = [first] + [epoch(e) for e in range(1, -(-num_samples // self.epoch_size))]

    def __getitem__(self, n: int) -> dict:
        e, i = divmod(n, self.epoch_size)
        return self.epochs[e][i]


class SeenSamples:
    """The first `count` samples of an earlier stage's source stream, replayed in a seeded order per pass."""

    def __init__(self, stream: SourceStream, count: int, seed: int):
        self.stream, self.count, self.seed = stream, count, seed
        self._order: tuple[int, np.ndarray] | None = None

    def __getitem__(self, n: int) -> dict:
        rounds, position = divmod(int(n), self.count)
        if self._order is None or self._order[0] != rounds:
            self._order = (rounds, np.random.default_rng([self.seed, rounds]).permutation(self.count))
        return self.stream[int(self._order[1][position])]


class BlendedStream:
    """The training sample stream: the blend says which source each position takes, the source streams what."""

    def __init__(self, blend: Blend, sources: list, names: list[str]):
        self.blend, self.sources, self.names = blend, sources, names

    def __len__(self) -> int:
        return len(self.blend)

    def __getitem__(self, p: int) -> dict:
        source, n = self.blend.locate(int(p))
        return self.sources[source][n]

    def source_of(self, p: int) -> str:
        return self.names[self.blend.locate(int(p))[0]]

    def samples_per_source(self, consumed: int) -> dict[str, int]:
        """How many of the first `consumed` samples came from each source."""
        return {name: int(n) for name, n in zip(self.names, self.blend.consumed_per_source(consumed))}


def build_train_dataset(data: DataConfig, num_samples: int, global_batch_size: int, seq_length: int, cache_dir: str,
                        vocab_size: int, eod: int | None, earlier_stages: list[StageRecord] = (),
                        stage_steps: int | None = None) -> BlendedStream:
    """The blended training stream of at least `num_samples` samples. Call on every rank (rank 0 builds first).

    Mixture schedules are laid over a stage of `stage_steps` steps (default: the stream's batches). With
    `replay.seen_only`, each replay source yields only samples that an earlier stage (from the checkpoint's
    stage history) trained on; the blend still decides when a replay sample comes.
    """
    os.makedirs(cache_dir, exist_ok=True)
    steps = stage_steps if stage_steps is not None else -(-num_samples // global_batch_size)
    blend, names = build_blend(data, steps, global_batch_size, num_samples)
    members = {s.name: s for s in data.sources + data.replay.sources}
    needed = blend.consumed_per_source(len(blend))
    replay_names = {s.name for s in data.replay.sources} if data.replay.seen_only else set()
    sources = [seen_samples(members[name], list(earlier_stages), cache_dir, vocab_size, eod, data.seed)
               if name in replay_names
               else SourceStream(members[name].prefix, int(n), seq_length, data.seed, cache_dir, vocab_size, eod)
               for name, n in zip(names, needed)]
    return BlendedStream(blend, sources, names)


def seen_samples(source: DataSource, stages: list[StageRecord], cache_dir: str, vocab_size: int, eod: int | None,
                 seed: int) -> SeenSamples:
    """The samples of `source.prefix` that the latest earlier megacpt stage reading it consumed: the first ones of
    that stage's stream of the source (an imported stage has no data megacpt could replay)."""
    for stage in reversed(stages):
        if not isinstance(stage, TrainedStage):
            continue
        names = [s.name for s in stage.data.sources + stage.data.replay.sources if s.prefix == source.prefix]
        count = stage.samples.get(names[0], 0) if names else 0
        if count:
            stream = SourceStream(source.prefix, count, stage.seq_length, stage.data.seed, cache_dir, vocab_size, eod)
            return SeenSamples(stream, count, seed)
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
