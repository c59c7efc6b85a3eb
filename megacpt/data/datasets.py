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
import pickle
import shutil
from pathlib import Path

import numpy as np

from megacpt.checkpoint.manifest import checksum
from megacpt.config import DataConfig, DataSource, same_dataset
from megacpt.data.blend import Blend, batch_counts, batch_shares
from megacpt.data.documents import DOCUMENT_BYTES_SUFFIX
from megacpt.data.packing import mask_documents, sample_parts
from megacpt.errors import ConfigError, UserError
from megacpt.policy.stages import SourceFile, SourceUse, StageRecord, TrainedStage

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
_IDX_TOKEN_DTYPES = {1, 2, 3, 4, 5, 8}  # megatron's codes of uint8, int8, int16, int32, int64, uint16 (6, 7: floats)


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
    version, code = int(np.frombuffer(header[9:17], dtype=np.uint64)[0]), header[17]
    if version != 1 or code not in _IDX_TOKEN_DTYPES:
        what = f"version {version} (megatron writes 1)" if version != 1 else f"dtype code {code}, not an integer type"
        raise UserError(f"{key}: {idx_path} has the MMIDIDX header but {what}: damaged or written by another tool; "
                        "rebuild it with `megacpt preprocess`")
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


def check_validation_size(data: DataConfig, eval_samples: int, seq_length: int, option: str) -> None:
    """Each validation set holds `eval_samples` samples of `seq_length` tokens (`option` asks for that many):
    megatron would repeat a smaller one, scoring the same tokens over and over."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for i, val in enumerate(data.validation):
        dataset = IndexedDataset(val.prefix, mmap=True)  # alive while its memory-mapped lengths are read
        tokens = int(np.sum(dataset.sequence_lengths, dtype=np.int64))
        held = (tokens - 1) // seq_length
        if held < eval_samples:
            raise UserError(f"{option} is {eval_samples}, but validation set data.validation[{i}] ({val.name}) holds "
                            f"{held} samples of seq_length {seq_length} ({tokens} tokens); megatron would repeat it. "
                            f"Evaluate at most {held} samples or use a larger held-out file")


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


def _gpt_config(blend, seq_length: int, seed: int, cache_dir: str, vocab_size: int, eod: int | None,
                boost: tuple[int, int] = (1, 0)):
    """megatron's dataset config; a `boost` (factor, threshold tokens) factor above 1 upsamples long documents
    (megacpt.data.long_documents)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    from megacpt.data.long_documents import BoostedGPTDatasetConfig

    fields = dict(random_seed=seed, sequence_length=seq_length, blend=blend, split="100,0,0",
                  path_to_cache=files_cache_dir(cache_dir, blend[0]), tokenizer=_DatasetTokenizer(vocab_size, eod),
                  reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                  create_attention_mask=False)
    if boost[0] > 1:
        return BoostedGPTDatasetConfig(**fields, long_document_boost=boost[0], long_document_tokens=boost[1])
    return GPTDatasetConfig(**fields)


def _build(config, num_samples: int | None) -> object:
    """megatron's GPTDataset for one prefix: `num_samples` samples, or exactly one epoch for None."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from megacpt.data.long_documents import BoostedGPTDataset, BoostedGPTDatasetConfig

    kind = BoostedGPTDataset if isinstance(config, BoostedGPTDatasetConfig) else GPTDataset
    fresh = not os.path.exists(config.path_to_cache)
    try:
        train, _, _ = BlendedMegatronDatasetBuilder(kind, [num_samples, 0, 0], lambda: True, config).build()
    except Exception as e:  # megatron wraps a failed write in a bare Exception
        cause = e if isinstance(e, OSError) else e.__cause__
        if isinstance(cause, OSError):
            if fresh:  # what megatron wrote before it failed: a folder that would only confuse
                shutil.rmtree(config.path_to_cache, ignore_errors=True)
            raise UserError(f"data.cache_dir: cannot write the dataset indices of {config.blend[0][0]} to "
                            f"{config.path_to_cache}: {cause.strerror or cause}; give data.cache_dir a folder with "
                            "free space that this process can write") from None
        if isinstance(e, (ValueError, EOFError, pickle.UnpicklingError)):  # np.load of a cut or overwritten file
            raise UserError(f"the cached dataset indices of {config.blend[0][0]} in {config.path_to_cache} are "
                            f"damaged ({e}); remove that folder and megacpt builds them again") from None
        raise
    return train


class SourceStream:
    """The samples of one source in order: epoch e is megatron's one-epoch GPTDataset built with seed + e.

    Sample n of the stream never depends on how many samples are asked for, so a longer stage reads the same
    first samples. A stream that continues an earlier stage's (`start`) yields its samples start, start + 1, ...;
    `id_of` gives a sample's number in the whole stream (its id in the ledger). `boost` (factor, threshold
    tokens) puts each document longer than the threshold factor times into every epoch.
    """

    def __init__(self, prefix: str, num_samples: int, seq_length: int, seed: int, cache_dir: str, vocab_size: int,
                 eod: int | None, start: int = 0, document_mask: bool = False, boost: tuple[int, int] = (1, 0)):
        self._epoch = lambda e: _build(_gpt_config(([prefix], None), seq_length, seed + e, cache_dir, vocab_size,
                                                   eod, boost), None)
        first = self._epoch(0)
        self.prefix, self.seed, self.start, self.epoch_size = prefix, seed, start, len(first)
        self.document_mask = document_mask
        self.epochs = [first] + [self._epoch(e) for e in range(1, -(-(start + num_samples) // self.epoch_size))]

    def id_of(self, n: int) -> int:
        return self.start + n

    def sample(self, sample_id: int) -> dict:
        """Sample `sample_id` of the stream. Training builds every epoch it reads up front (on every rank);
        a later one is built here only for a reader such as `megacpt data show`."""
        e, i = divmod(sample_id, self.epoch_size)
        while e >= len(self.epochs):
            self.epochs.append(self._epoch(len(self.epochs)))
        item = self.epochs[e][i]
        return mask_documents(item, sample_parts(self.epochs[e], i)) if self.document_mask else item

    def __getitem__(self, n: int) -> dict:
        return self.sample(self.id_of(n))

    def long_token_share(self, first: int, stop: int, threshold: int) -> float:
        """Share of the tokens of samples [first, stop) of the stream from documents longer than `threshold`."""
        from megacpt.data.long_documents import long_token_share

        for e in range(len(self.epochs), -(-stop // self.epoch_size)):
            self.epochs.append(self._epoch(e))
        return long_token_share(((self.epochs[i // self.epoch_size], i % self.epoch_size) for i in range(first, stop)),
                                threshold)


class SeenSamples:
    """Samples `ids` of an earlier stage's stream of a source, replayed in a seeded order reshuffled per pass."""

    def __init__(self, stream: SourceStream, ids: np.ndarray, seed: int):
        self.stream, self.ids, self.seed = stream, ids, seed
        self._order: tuple[int, np.ndarray] | None = None

    def id_of(self, n: int) -> int:
        rounds, position = divmod(int(n), len(self.ids))
        if self._order is None or self._order[0] != rounds:
            self._order = (rounds, np.random.default_rng([self.seed, rounds]).permutation(len(self.ids)))
        return int(self.ids[self._order[1][position]])

    def sample(self, sample_id: int) -> dict:
        return self.stream.sample(sample_id)

    def __getitem__(self, n: int) -> dict:
        return self.sample(self.id_of(n))


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

    def ids(self, positions: range) -> dict[str, list[int]]:
        """{source: the ids (in its own stream) of the samples at `positions`}, sources in the blend's order."""
        out: dict[str, list[int]] = {name: [] for name in self.names}
        for p in positions:
            source, n = self.blend.locate(p)
            out[self.names[source]].append(self.sources[source].id_of(n))
        return {name: ids for name, ids in out.items() if ids}

    def uses(self, begin: int, consumed: int) -> dict[str, tuple[SourceStream, int, int]]:
        """{source: (its stream, first id, one past the last id)} read by positions [begin, consumed); seen-only
        replay sources, which read no stream of their own, are left out."""
        first, last = self.blend.consumed_per_source(begin), self.blend.consumed_per_source(consumed)
        return {name: (source, source.id_of(int(a)), source.id_of(int(b)))
                for name, source, a, b in zip(self.names, self.sources, first, last)
                if isinstance(source, SourceStream)}


def build_train_dataset(data: DataConfig, num_samples: int, global_batch_size: int, seq_length: int, cache_dir: str,
                        vocab_size: int, eod: int | None, earlier_stages: list[StageRecord] = (),
                        stage_steps: int | None = None) -> BlendedStream:
    """The blended training stream of at least `num_samples` samples. Call on every rank (rank 0 builds first).

    Mixture schedules are laid over a stage of `stage_steps` steps (default: the stream's batches). With
    `replay.seen_only`, each replay source yields only samples that earlier stages (from the checkpoint's
    stage history) trained on; the blend still decides when a replay sample comes. With `continue_sources`,
    a source an earlier stage read starts where that stage stopped.
    """
    os.makedirs(cache_dir, exist_ok=True)
    steps = stage_steps if stage_steps is not None else -(-num_samples // global_batch_size)
    blend, names = build_blend(data, steps, global_batch_size, num_samples)
    members = {s.name: s for s in data.sources + data.replay.sources}
    needed = blend.consumed_per_source(len(blend))
    replay_names = {s.name for s in data.replay.sources} if data.replay.seen_only else set()
    continued = continued_uses(data, list(earlier_stages), seq_length) if data.continue_sources else {}
    sources = []
    for name, n in zip(names, needed):
        if name in replay_names:
            sources.append(seen_samples(members[name], list(earlier_stages), cache_dir, vocab_size, eod, data.seed,
                                        data.document_mask))
            continue
        use = continued.get(name)
        seed, start = (use.seed, use.stop) if use else (data.seed, 0)
        sources.append(SourceStream(members[name].prefix, int(n), seq_length, seed, cache_dir, vocab_size, eod, start,
                                    data.document_mask, (members[name].long_document_boost, data.long_document_tokens)))
    return BlendedStream(blend, sources, names)


def _trained_uses(stages: list[StageRecord], prefix: str) -> list[tuple[TrainedStage, SourceUse]]:
    """(stage, use) of every earlier megacpt stage that read `prefix`'s stream, oldest first (an imported stage
    has no data megacpt could know of)."""
    return [(stage, use) for stage in stages if isinstance(stage, TrainedStage)
            for use in stage.uses().values() if same_dataset(use.prefix, prefix)]


def continued_uses(data: DataConfig, stages: list[StageRecord], seq_length: int) -> dict[str, SourceUse]:
    """{source name: the latest earlier use of its prefix} for every source `continue_sources` continues (all but
    seen-only replay sources): its stream goes on at that use's `stop`, with that use's seed."""
    seen_only = {s.name for s in data.replay.sources} if data.replay.seen_only else set()
    out = {}
    for source in data.sources + data.replay.sources:
        uses = _trained_uses(stages, source.prefix) if source.name not in seen_only else []
        if not uses:
            continue
        stage, use = uses[-1]
        if stage.seq_length != seq_length:
            raise ConfigError("data.continue_sources", f"'{source.name}' ({source.prefix}) was read by stage "
                              f"{stage.index} ({stage.name}) in samples of model.seq_length {stage.seq_length}, this "
                              f"config has {seq_length}: samples cut another way cannot continue where those "
                              "stopped; use the same seq_length or set data.continue_sources to false")
        out[source.name] = use
    return out


def check_continued_files(uses: dict[str, SourceUse], checksums: bool = True) -> None:
    """Every continued source's files are the ones its earlier stage read (size, and CRC32C with `checksums`)."""
    for name, use in uses.items():
        for saw in use.files:
            change = file_change(saw, "since an earlier stage read it", checksums)
            if change:
                raise UserError(f"data.continue_sources: {saw.path} of source '{name}' {change}, so 'the first sample "
                                "not yet used' means nothing any more; restore the file, or set "
                                "data.continue_sources to false and start the source over")


def check_resumed_files(stage: TrainedStage, tag: str, checksums: bool = True) -> None:
    """A resume trains the rest of `stage` on the files the stage started on (their size and CRC32C, recorded in
    its checkpoint `tag`): a source rewritten under the same prefix would change what the stage means."""
    for name, use in stage.uses().items():
        for saw in use.files:
            change = file_change(saw, f"since this stage started on it (as checkpoint {tag} records)", checksums)
            if change:
                raise UserError(f"{saw.path} of source '{name}' {change}: the resumed stage would train its remaining "
                                "steps on other data than its first ones. Restore the file to resume, or train on the "
                                "new files as a new stage: init.checkpoint set to this checkpoint, in another run_dir")


def file_change(saw: SourceFile, since: str, checksums: bool) -> str | None:
    """How the file `saw` recorded differs from it now ('is gone', or both sizes and CRC32Cs); None when it is the
    same (the CRC32C is compared only with `checksums`, else the size)."""
    if not os.path.isfile(saw.path):
        return "is gone"
    size = os.path.getsize(saw.path)
    now = file_checksum(saw.path) if checksums else saw.checksum
    if (size, now) == (saw.size, saw.checksum):
        return None
    return f"changed {since} ({saw.size} bytes, CRC32C {saw.checksum}; now {size} bytes, CRC32C {now})"


# Files up to this size are checksummed whole; a larger .bin by evenly spaced chunks (with its size and the whole
# .idx, which holds every document's length, that tells a regenerated dataset from the one a stage read).
_WHOLE_FILE = 1 << 30
_CHUNKS, _CHUNK_BYTES = 256, 1 << 20


def file_checksum(path: str) -> str:
    """CRC32C of a dataset file: all of it up to 1 GiB, else of 256 evenly spaced MiB."""
    import crc32c

    size = os.path.getsize(path)
    if size <= _WHOLE_FILE:
        return checksum(Path(path))
    value = 0
    with open(path, "rb") as f:
        for offset in np.linspace(0, size - _CHUNK_BYTES, _CHUNKS).astype(np.int64):
            f.seek(int(offset))
            value = crc32c.crc32c(f.read(_CHUNK_BYTES), value)
    return f"{value:08x}"


def source_files(prefix: str) -> list[SourceFile]:
    """The identity of a source's .idx and .bin, for a stage record."""
    return [SourceFile(path=os.path.abspath(path), size=os.path.getsize(path), checksum=file_checksum(path))
            for path in (prefix + ".idx", prefix + ".bin")]


def seen_samples(source: DataSource, stages: list[StageRecord], cache_dir: str, vocab_size: int, eod: int | None,
                 seed: int, document_mask: bool = False) -> SeenSamples:
    """The samples of `source.prefix` that earlier megacpt stages trained on: the ranges their records keep of
    the stream of the latest stage that read it (earlier stages' ranges of the same stream included)."""
    uses = [(stage, use) for stage, use in _trained_uses(stages, source.prefix) if use.stop > use.start]
    if uses:
        last_stage, last = uses[-1]
        same = [u for stage, u in uses if u.seed == last.seed and stage.seq_length == last_stage.seq_length]
        ids = np.unique(np.concatenate([np.arange(u.start, u.stop) for u in same]))
        stream = SourceStream(source.prefix, int(ids[-1]) + 1, last_stage.seq_length, last.seed, cache_dir,
                              vocab_size, eod, document_mask=document_mask)
        return SeenSamples(stream, ids, seed)
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
    tokens, size = 0, 0.0
    for i in range(num_samples):
        for k, part in enumerate(sample_parts(dataset, i)):
            count = part.stop - part.start - (k == 0)  # the window's first token is no label
            tokens += count
            size += count * per_token[part.document]
    return tokens, size
