"""The training data order: a function of (seed, epoch, iteration), sharded over ranks, resumable."""

import numpy as np
import pytest

from mlla_fast.sampler import BatchStream, EpochIndexed


def flat(batches):
    return [pair for batch in batches for pair in batch]


def test_each_epoch_is_a_permutation_and_epochs_follow_each_other():
    stream = BatchStream(num_samples=10, global_batch=4, seed=3, stop=10)
    pairs = flat(stream)
    assert len(pairs) == 40
    for epoch in range(4):
        indices = [i for e, i in pairs if e == epoch]
        assert sorted(indices) == list(range(10))
    assert [e for e, _ in pairs] == sorted(e for e, _ in pairs)
    assert [i for e, i in pairs if e == 0] != [i for e, i in pairs if e == 1]


def test_order_depends_only_on_seed():
    assert flat(BatchStream(7, 3, seed=1, stop=5)) == flat(BatchStream(7, 3, seed=1, stop=5))
    assert flat(BatchStream(7, 3, seed=1, stop=5)) != flat(BatchStream(7, 3, seed=2, stop=5))


def test_resuming_at_an_iteration_continues_the_same_order():
    full = list(BatchStream(9, 4, seed=0, stop=12))
    assert list(BatchStream(9, 4, seed=0, stop=12, start=5)) == full[5:]


def test_ranks_take_disjoint_slices_of_the_same_global_batches():
    single = list(BatchStream(11, 6, seed=4, stop=8))
    ranks = [list(BatchStream(11, 6, seed=4, stop=8, rank=r, world_size=3)) for r in range(3)]
    for t in range(8):
        assert ranks[0][t] + ranks[1][t] + ranks[2][t] == single[t]


def test_bad_arguments_say_what_was_expected():
    with pytest.raises(ValueError, match="divisible"):
        BatchStream(10, 5, seed=0, stop=1, world_size=2)
    with pytest.raises(ValueError, match="at least one"):
        BatchStream(0, 4, seed=0, stop=1)
    with pytest.raises(ValueError, match="set_epoch"):
        EpochIndexed([1, 2, 3])


def test_epoch_indexed_sets_the_epoch_before_reading():
    class Recorder:
        epoch = None

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __len__(self):
            return 3

        def __getitem__(self, index):
            return (self.epoch, index)

    assert EpochIndexed(Recorder())[(5, 2)] == (5, 2)
    expected = np.random.default_rng([0, 0]).permutation(3)
    assert np.array_equal(BatchStream(3, 3, seed=0, stop=1).permutation(0), expected)
