"""A per-token statistic summarised in bounded memory: exact moments and extremes, and a uniform
sample for quantiles and histograms.

A trace keeps one RPV value per token per (layer, route, group). Kept whole, that grows with the
tokens traced: a training window of 100 logged steps at 256 x 4096 tokens is 100M values, 400 MB
per group. Here the count, mean, standard deviation, min and max are exact (Chan et al.'s pairwise
update, in float64), and the quantiles come from a uniform sample without replacement of at most
`SAMPLE_SIZE` values, the whole data below that. The sample keeps the values of smallest random key
(Efraimidis and Spirakis with equal weights), so it is the same whatever the batch sizes, and the
keys come from a generator seeded here, so the same values give the same sample, as a resumed run
must. At 2^16 values, a p99 is off by at most ~0.1 percentile points (three standard errors).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SAMPLE_SIZE = 1 << 16
# Not 0: keys drawn from the same stream as values a test (or a user) drew with the common seed 0
# would be correlated with them; with seed 0 on both, a sample of randn().exp() has its median at p64.
KEY_SEED = 0x5EED


class RunningSummary:
    def __init__(self, sample_size: int = SAMPLE_SIZE, seed: int = KEY_SEED):
        self.sample_size = sample_size
        self.count, self.mean, self.m2 = 0, 0.0, 0.0
        self.min, self.max = math.inf, -math.inf
        self._generator = torch.Generator().manual_seed(seed)
        self._values, self._keys = [], []  # pending parts, merged into the sample past 2x its size
        self._pending = 0

    def __len__(self) -> int:
        return self.count

    def add(self, values: Tensor) -> None:
        values = values.detach().float().cpu().reshape(-1)
        n = len(values)
        if n == 0:
            return
        batch = values.double()
        batch_mean = batch.mean()
        mean, m2 = float(batch_mean), float((batch - batch_mean).square().sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total
        self.min, self.max = min(self.min, float(values.min())), max(self.max, float(values.max()))
        self._values.append(values)
        self._keys.append(torch.rand(n, generator=self._generator))
        self._pending += n
        if self._pending > 2 * self.sample_size:  # amortised: one selection per sample size added
            self._merge()

    @property
    def std(self) -> float:
        """Population standard deviation (correction 0)."""
        return math.sqrt(self.m2 / self.count) if self.count else math.nan

    def sample(self) -> Tensor:
        """The sampled values (all of them while fewer than `sample_size`), in no particular order."""
        self._merge()
        return self._values[0] if self._values else torch.zeros(0)

    def _merge(self) -> None:
        if len(self._values) <= 1 and self._pending <= self.sample_size:
            return
        values, keys = torch.cat(self._values), torch.cat(self._keys)
        if len(values) > self.sample_size:
            keep = keys.topk(self.sample_size, largest=False).indices
            values, keys = values[keep], keys[keep]
        self._values, self._keys, self._pending = [values], [keys], len(values)
