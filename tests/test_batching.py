"""TensorBatches yields exactly the DataLoader's batches and leaves the random stream as the DataLoader does."""

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_mpi.batching import TensorBatches


def test_same_batches_and_random_stream_as_the_dataloader():
    data = TensorDataset(torch.randn(37, 3), torch.arange(37))
    loader = DataLoader(data, batch_size=8, shuffle=True)
    assert TensorBatches.applies_to(loader)
    torch.manual_seed(3)
    expected = [list(b) for _ in range(2) for b in loader]
    after_expected = torch.rand(1)
    torch.manual_seed(3)
    got = [b for _ in range(2) for b in TensorBatches(loader)]
    assert torch.equal(torch.rand(1), after_expected)
    assert len(got) == len(expected) == 10
    for (x1, y1), (x2, y2) in zip(got, expected):
        assert torch.equal(x1, x2)
        assert torch.equal(y1, y2)


def test_only_plain_tensor_loaders_qualify():
    data = TensorDataset(torch.randn(4, 2))
    assert not TensorBatches.applies_to(DataLoader(data, batch_size=2, collate_fn=lambda b: b))
    assert not TensorBatches.applies_to(DataLoader(data, batch_size=None))
    assert not TensorBatches.applies_to(DataLoader(list(range(4)), batch_size=2))
