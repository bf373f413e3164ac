"""What ``trainer.predict`` returns and what a prediction writer receives, at 2 and 3 ranks: over a map-style
dataset that the strategy shards, every prediction once in dataset order on every rank; over a loader left to the
user (an iterable dataset), each rank's own predictions as under DDP, never repeated world-size times.

``python -m tests.mpi.test_predictions OUT`` is the rank code; the assertions follow it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

pytestmark = pytest.mark.mpi


class Three(IterableDataset):
    """Three items on every rank, not sharded (as in Lightning's test_prediction_loop_with_iterable_dataset)."""

    def __iter__(self):
        return iter([torch.tensor([float(i)]) for i in range(3)])


def main(out: Path) -> None:
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import BasePredictionWriter

    from lightning_mpi import MPIStrategy

    class Identity(LightningModule):
        def predict_step(self, batch, batch_idx):
            return batch[0] if isinstance(batch, (list, tuple)) else batch

    class Writer(BasePredictionWriter):
        def __init__(self) -> None:
            super().__init__(write_interval="epoch")
            self.received: list[torch.Tensor] = []

        def write_on_epoch_end(self, trainer, module, predictions, batch_indices) -> None:
            self.received = [p for loader in [predictions] for p in loader]

    def trainer(writer: Writer) -> Trainer:
        return Trainer(strategy=MPIStrategy(), logger=False, enable_progress_bar=False, callbacks=[writer])

    writer = Writer()
    mapped = trainer(writer).predict(Identity(), DataLoader(TensorDataset(torch.arange(10.0)), batch_size=2))
    mapped_written = [t.clone() for t in writer.received]
    limited = Trainer(strategy=MPIStrategy(), logger=False, enable_progress_bar=False, limit_predict_batches=2)
    limited_predictions = limited.predict(Identity(), DataLoader(TensorDataset(torch.arange(20.0)), batch_size=2))
    writer = Writer()
    iterable_trainer = trainer(writer)
    streamed = iterable_trainer.predict(Identity(), DataLoader(Three(), batch_size=1))
    torch.save(
        {
            "world": iterable_trainer.world_size,
            "mapped": torch.cat(mapped).tolist(),
            "mapped_written": torch.cat(mapped_written).tolist(),
            "limited": torch.cat(limited_predictions).tolist(),
            "streamed": torch.cat(streamed).view(-1).tolist(),
            "streamed_written": torch.cat(writer.received).view(-1).tolist(),
        },
        out / f"predict.rank{iterable_trainer.global_rank}.pt",
    )


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def launched(request, tmp_path_factory):
    from tests.mpirun import launch_scenario

    out = tmp_path_factory.mktemp(f"predict{request.param}")
    return launch_scenario(__name__, request.param, out, timeout=300)


def test_sharded_predictions_come_back_once_in_dataset_order(launched):
    for r in launched.results("predict"):
        assert r["mapped"] == [float(i) for i in range(10)]


def test_limited_predictions_are_the_first_batches_one_process_predicts(launched):
    for r in launched.results("predict"):  # limit_predict_batches=2 per rank: one process's first 2 x world batches
        assert r["limited"] == [float(i) for i in range(2 * 2 * launched.world)]


def test_writer_receives_its_ranks_share_as_under_ddp(launched):
    ranks = launched.results("predict")
    written = [v for r in ranks for v in r["mapped_written"]]
    assert sorted(written) == [float(i) for i in range(10)]  # every sample once over all ranks' writers


def test_unsharded_iterable_predictions_are_not_repeated(launched):
    for r in launched.results("predict"):
        assert r["streamed"] == [0.0, 1.0, 2.0]  # this rank's own (DDP: the same); 6 or 9 items before
        assert r["streamed_written"] == [0.0, 1.0, 2.0]


if __name__ == "__main__":
    main(Path(sys.argv[1]))
