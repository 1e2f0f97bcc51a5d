"""Batched reads of a DataLoader's batches: the same batches, in the same order, from the same RNG draws."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from torchslim._data import BatchedReads, DataStream, iterate


def tensor_dataset():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(50, 3, generator=g), torch.randint(0, 5, (50,), generator=g),
                         torch.rand(50, generator=g).to(torch.float64))


class Rows(Dataset):
    """A map-style dataset that reads a whole batch at once, counting its reads."""

    def __init__(self, n: int) -> None:
        self.data = torch.arange(n * 2, dtype=torch.float32).view(n, 2)
        self.single_reads = self.batch_reads = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        self.single_reads += 1
        return {"x": self.data[i], "i": i}

    def __getitems__(self, indices: list[int]) -> list[dict]:
        self.batch_reads += 1
        return [{"x": self.data[i], "i": i} for i in indices]


def epochs_of(stream_or_loader, n_batches):
    it = iter(stream_or_loader)
    return [next(it) for _ in range(n_batches)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert type(x) is type(y)
        if isinstance(x, dict):
            assert x.keys() == y.keys()
            x, y = list(x.values()), list(y.values())
        for u, v in zip(x, y):
            assert u.dtype == v.dtype and torch.equal(u, v)


@pytest.mark.parametrize("drop_last", [False, True])
def test_two_shuffled_epochs_are_the_loaders_batches_from_the_same_rng_draws(drop_last):
    def loader():
        return DataLoader(tensor_dataset(), batch_size=8, shuffle=True, drop_last=drop_last)

    assert isinstance(iterate(loader()), BatchedReads)
    per_epoch = len(loader())
    torch.manual_seed(3)
    expected = []
    for _ in range(2):
        expected += list(loader())  # the DataLoader's own per-sample reads and collate
    rng_after_loader = torch.get_rng_state()
    torch.manual_seed(3)
    got = epochs_of(DataStream(loader()), 2 * per_epoch)
    assert_same_batches(got, expected)
    assert torch.equal(torch.get_rng_state(), rng_after_loader)  # the same draws: dropout etc. see the same RNG


def test_a_loader_generator_gives_the_same_order():
    def loader():
        return DataLoader(tensor_dataset(), batch_size=7, shuffle=True, generator=torch.Generator().manual_seed(5))

    expected = list(loader()) + list(loader())  # fresh generators: one epoch each
    got = list(iterate(loader())) + list(iterate(loader()))
    assert_same_batches(got, expected)


def test_a_dataset_with_getitems_is_read_once_per_batch_and_collated_as_the_loader_does():
    torch.manual_seed(0)
    expected = list(DataLoader(Rows(20), batch_size=6, shuffle=True))
    torch.manual_seed(0)
    rows = Rows(20)
    got = list(iterate(DataLoader(rows, batch_size=6, shuffle=True)))
    assert_same_batches(got, expected)
    assert (rows.batch_reads, rows.single_reads) == (4, 0)


def test_resume_mid_epoch_skips_by_index_and_continues_with_the_same_batches():
    def loader():
        return DataLoader(tensor_dataset(), batch_size=8, shuffle=True)

    torch.manual_seed(1)
    stream = DataStream(loader())
    it = iter(stream)
    for _ in range(10):  # 7 batches an epoch: into the second one
        next(it)
    state = stream.state_dict()
    expected = [next(it) for _ in range(6)]
    torch.manual_seed(99)
    resumed = DataStream(loader())
    resumed.load_state_dict(state)
    assert_same_batches(epochs_of(resumed, 6), expected)


class Doubled(TensorDataset):
    def __getitem__(self, i):
        return tuple(2 * t[i] for t in self.tensors)


class Stream(IterableDataset):
    def __iter__(self):
        return iter(torch.arange(10).split(1))


@pytest.mark.filterwarnings("ignore:'pin_memory' argument")
@pytest.mark.parametrize("make", [
    lambda: DataLoader(tensor_dataset(), batch_size=4, num_workers=2),
    lambda: DataLoader(tensor_dataset(), batch_size=4, collate_fn=lambda items: items),
    lambda: DataLoader(tensor_dataset(), batch_size=4, pin_memory=True),
    lambda: DataLoader(tensor_dataset(), batch_size=None),
    lambda: DataLoader(Doubled(torch.arange(10.0)), batch_size=4),
    lambda: DataLoader(Stream(), batch_size=2),
    lambda: [torch.ones(2)],
], ids=["workers", "custom-collate", "pin-memory", "unbatched", "overridden-getitem", "iterable", "list"])
def test_anything_else_is_iterated_as_it_is(make):
    assert not isinstance(iterate(make()), BatchedReads)


def test_an_overridden_getitem_still_gives_its_own_items():
    got = next(iter(DataStream(DataLoader(Doubled(torch.arange(4.0)), batch_size=4))))
    assert torch.equal(got[0], torch.tensor([0.0, 2.0, 4.0, 6.0]))
