"""The blend: which source each sample of the training stream comes from, batch by batch.

Every global batch of G samples is apportioned exactly: first between the new data and the replay group
(shares 1 - replay.fraction and replay.fraction), then inside each group between its sources. A weight or the
fraction may be a mixture schedule, piecewise linear over the stage's steps (`scheduled`), so each batch has
its own shares (`batch_shares`, the one place that turns weights into shares). Each count is
the floor or the ceiling of its quota (share x G), so every batch holds every source's and every group's share
to within one sample, for any number of sources; which counts get the ceiling is decided by the largest
carried remainder (the samples a source is owed from earlier batches), so over many batches the totals stay
on target too. Batch b's composition depends only on b, never on the length of the stream: a longer stream
(a lengthened stage, a continued data position) keeps every earlier batch unchanged.

Inside a batch the sources are interleaved evenly; the n-th sample a source contributes is its sample n, so
a source's samples are read in its own (megatron's) order. This module is pure arithmetic: no files, no torch.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megacpt.config import scheduled

# A number, or [step, value] points: an int step is an optimizer step, a float one a fraction of the stage.
Schedule = float | Sequence[Sequence[float]]

# Quotas are integers in units of 1 / _SCALE of a sample, so the apportionment is exact and the same everywhere.
_SCALE = 10**9


def _apportion(total: int, quotas: list[int], owed: list[int]) -> list[int]:
    """Split `total` samples by `quotas` (in 1/_SCALE units): floor or ceiling each, updating `owed` in place.

    The samples left after the floors go to the sources with a fractional quota that are owed the most
    (ties to the lower index).
    """
    base = [q // _SCALE for q in quotas]
    claims = [o + q % _SCALE for o, q in zip(owed, quotas)]
    extra = total - sum(base)
    candidates = [i for i, q in enumerate(quotas) if q % _SCALE] or list(range(len(quotas)))
    if not 0 <= extra <= len(candidates):
        raise ValueError(f"cannot apportion {total} samples by quotas {quotas}")
    for i in sorted(candidates, key=lambda i: (-claims[i], i))[:extra]:
        base[i] += 1
    for i, q in enumerate(quotas):
        owed[i] = claims[i] - (base[i] - q // _SCALE) * _SCALE
    return base


def batch_shares(fraction: Schedule, new: list[Schedule], replay: list[Schedule], stage_steps: int,
                 num_batches: int) -> np.ndarray:
    """[num_batches, sources] share of the batch of each source (new sources, then replay): at step b the new
    sources share 1 - fraction(b), the replay sources fraction(b), each by its weight(b) over its group's."""
    steps = np.arange(num_batches, dtype=np.float64)
    f = scheduled(fraction, stage_steps, steps)
    parts = []
    for weights, share in ((new, 1.0 - f), (replay, f)):
        w = np.stack([scheduled(s, stage_steps, steps) for s in weights], axis=1) if weights else \
            np.zeros((num_batches, 0))
        total = w.sum(axis=1, keepdims=True)
        parts.append(np.divide(w * share[:, None], total, out=np.zeros_like(w), where=total > 0))
    return np.concatenate(parts, axis=1)


def batch_counts(shares: np.ndarray, group_sizes: list[int], batch_size: int) -> np.ndarray:
    """[batches, sources] samples of each source in each batch; sources are numbered group after group.

    Row b of `shares` holds each source's share of batch b (a row sums to 1).
    """
    members, start = [], 0
    for size in group_sizes:
        members.append(list(range(start, start + size)))
        start += size
    group_owed, owed = [0] * len(group_sizes), [0] * start
    counts = np.zeros(shares.shape, dtype=np.int64)
    for b, row in enumerate(shares):
        quotas = [round(s * batch_size * _SCALE) for s in row.tolist()]
        quotas[int(np.argmax(quotas))] += batch_size * _SCALE - sum(quotas)  # float rounding, a few units at most
        group_quotas = [sum(quotas[i] for i in m) for m in members]
        for m, n in zip(members, _apportion(batch_size, group_quotas, group_owed)):
            part = [owed[i] for i in m]
            counts[b, m] = _apportion(n, [quotas[i] for i in m], part)
            for i, o in zip(m, part):
                owed[i] = o
    return counts


def batch_order(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source, k) of each position of one batch: source i's k-th sample sits at (k + 1/2) / counts[i] of it."""
    sources = np.repeat(np.arange(len(counts)), counts)
    ks = np.concatenate([np.arange(c) for c in counts]) if len(counts) else np.zeros(0, dtype=np.int64)
    order = np.lexsort((sources, (ks + 0.5) / counts[sources]))
    return sources[order], ks[order]


class Blend:
    """Maps position p of the stream to (source, n): the n-th sample that source contributes."""

    def __init__(self, counts: np.ndarray, batch_size: int):
        self.batch_size = batch_size
        self.counts = counts
        self.before = np.vstack([np.zeros((1, self.counts.shape[1]), dtype=np.int64), np.cumsum(self.counts, axis=0)])
        self._cached: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None

    def __len__(self) -> int:
        return len(self.counts) * self.batch_size

    def _order(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cached is None or self._cached[0] != b:
            self._cached = (b, batch_order(self.counts[b]))
        return self._cached[1]

    def locate(self, p: int) -> tuple[int, int]:
        if not 0 <= p < len(self):
            raise IndexError(f"sample {p} is outside the stream of {len(self)} samples")
        b, position = divmod(p, self.batch_size)
        sources, ks = self._order(b)
        source = int(sources[position])
        return source, int(self.before[b, source] + ks[position])

    def consumed_per_source(self, consumed: int) -> np.ndarray:
        """How many of the first `consumed` samples came from each source."""
        b, position = divmod(consumed, self.batch_size)
        if b == len(self.counts):
            return self.before[b].copy()
        sources, _ = self._order(b)
        return self.before[b] + np.bincount(sources[:position], minlength=self.counts.shape[1])
