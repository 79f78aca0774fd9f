"""The training data order: a deterministic function of (seed, epoch), resumable at any iteration.

Samples are drawn from an endless stream: epoch e is ``numpy.random.default_rng([seed,
e]).permutation(n)``, and the epochs follow one another. Iteration t takes the global batch at
stream positions [t·G, (t+1)·G); in a distributed run rank r takes its contiguous slice
[t·G + r·b, t·G + (r+1)·b) of it, b = G / world size. So the order depends on nothing but the
seed and the iteration: resuming at iteration t needs only t, and 1 or N processes see the same
global batches. Each sample travels as (epoch, index) so that :class:`EpochIndexed` can draw its
augmentation for that epoch (``SliceDataset.set_epoch``) in any process.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Dataset, Sampler


class BatchStream(Sampler[list[tuple[int, int]]]):
    """Batches of (epoch, index) for iterations ``start .. stop - 1`` of this rank (module docstring)."""

    def __init__(self, num_samples: int, global_batch: int, seed: int, stop: int, start: int = 0, rank: int = 0,
                 world_size: int = 1):
        if num_samples < 1:
            raise ValueError(f"need at least one training sample, got {num_samples}")
        if global_batch % world_size:
            raise ValueError(f"the batch size {global_batch} must be divisible by the number of processes {world_size}")
        if not 0 <= rank < world_size or not 0 <= start <= stop:
            raise ValueError(f"need 0 <= rank < world_size and 0 <= start <= stop, got {rank}, {world_size}, "
                             f"{start}, {stop}")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.seed = seed
        self.start, self.stop = start, stop
        self.rank = rank
        self._epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        """The sample order of one epoch."""
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._epoch = epoch
        return self._order

    def batch(self, iteration: int) -> list[tuple[int, int]]:
        """This rank's (epoch, index) pairs of one iteration."""
        first = iteration * self.global_batch + self.rank * self.local_batch
        out = []
        for position in range(first, first + self.local_batch):
            epoch, offset = divmod(position, self.num_samples)
            out.append((epoch, int(self.permutation(epoch)[offset])))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for iteration in range(self.start, self.stop):
            yield self.batch(iteration)

    def __len__(self) -> int:
        return self.stop - self.start


class EpochIndexed(Dataset):
    """Wraps a dataset with ``set_epoch``: item (epoch, index) is ``dataset[index]`` drawn for that epoch."""

    def __init__(self, dataset: Dataset):
        if not hasattr(dataset, "set_epoch"):
            raise ValueError(f"expected a dataset with set_epoch(epoch), got {type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]
