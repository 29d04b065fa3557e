"""Epoch sampling: plain shuffling or the paper's balanced epochs, sharded across DDP ranks, resumable.

The sampler yields ``(index, epoch)`` pairs rather than bare indices so that the dataset can derive each
sample's augmentation RNG from ``(seed, epoch, index)``: augmentation is then identical with any number of
DataLoader workers, after a resume, and on any rank layout.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

__all__ = ["EpochSampler"]


class EpochSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """Deterministic per-epoch index order, optionally balanced, sharded like ``DistributedSampler``.

    Each epoch's order depends only on ``(seed, epoch)``: with ``balanced`` it holds every positive plus as many
    negatives drawn without replacement (all negatives if there are fewer), shuffled. With several ranks the list
    is padded by repeating its head to a multiple of ``world_size`` and rank ``r`` takes ``list[r::world_size]``
    (the same rule as :class:`torch.utils.data.DistributedSampler`), so every rank sees the same number of
    batches.

    Args:
        positives: per dataset item, whether it is positive (used only when ``balanced``).
        balanced: the paper's balanced epochs.
        shuffle: shuffle each epoch (evaluation uses ``False``).
        seed: base seed.
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(
        self,
        positives: Sequence[bool] | np.ndarray,
        *,
        balanced: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.positives = np.asarray(positives, dtype=bool)
        self.balanced = balanced
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and skip the first ``start`` samples of this rank's share (to resume mid-epoch)."""
        self.epoch = epoch
        self.start = start

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The whole epoch's order (all ranks, before sharding)."""
        rng = np.random.default_rng([self.seed, epoch, 0x5A3])
        n = len(self.positives)
        if self.balanced:
            pos = np.flatnonzero(self.positives)
            neg = np.flatnonzero(~self.positives)
            take = min(len(pos), len(neg)) if len(pos) else len(neg)
            chosen = rng.choice(neg, size=take, replace=False) if take < len(neg) else neg
            order = np.concatenate([pos, np.sort(chosen)])
        else:
            order = np.arange(n)
        if self.shuffle:
            order = rng.permutation(order)
        return order.astype(np.int64)

    def rank_indices(self, epoch: int) -> np.ndarray:
        """This rank's share of the epoch (padded so all ranks have equal length)."""
        order = self.epoch_indices(epoch)
        if self.world_size > 1:
            total = -(-len(order) // self.world_size) * self.world_size
            if total > len(order):
                order = np.concatenate([order, order[: total - len(order)]])
            order = order[self.rank :: self.world_size]
        return order

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for idx in self.rank_indices(self.epoch)[self.start :]:
            yield int(idx), self.epoch

    def __len__(self) -> int:
        return max(0, len(self.rank_indices(self.epoch)) - self.start)
