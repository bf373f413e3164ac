"""Metrics, predictions, EarlyStopping and SIGTERM over 2 and 3 ranks equal / agree with one process."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader

from tests.helpers import quiet_trainer
from tests.mpirun import Launch
from tests.scenarios.evaluation import SAMPLES, Evaluated, dataset

pytestmark = pytest.mark.mpi  # every test here launches several MPI ranks


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def launched(request, suite_launches) -> Launch:
    return suite_launches(request.param)


@pytest.fixture(scope="module")
def reference():
    seed_everything(0)
    model = Evaluated()
    trainer = quiet_trainer(devices=1, limit_val_batches=None)
    logged = trainer.validate(model, DataLoader(dataset(), batch_size=7), verbose=False)[0]
    with torch.no_grad():
        predictions = model(dataset().tensors[0])
    return logged, model.all_errors, predictions


def test_metrics_equal_single_process(launched, reference):
    expected, _, _ = reference
    assert set(expected) >= {"val_acc", "val_f1", "val_mse", "val_rmse", "val_auroc", "val_loss"}
    for rank in launched.results("metrics"):
        for name, value in expected.items():
            if name == "val_count":
                continue
            assert rank["logged"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_every_sample_counted_once(launched):
    for rank in launched.results("metrics"):
        assert rank["logged"]["val_count"] == SAMPLES


def test_cat_state_metric_gathers_every_rank(launched, reference):
    _, errors, _ = reference
    for rank in launched.results("metrics"):
        assert rank["errors"].shape == (SAMPLES,)
        assert torch.allclose(rank["errors"], errors, atol=1e-6)  # contiguous shards: even the order matches


def test_predictions_whole_dataset_in_order_on_every_rank(launched, reference):
    _, _, predictions = reference
    for rank in launched.results("metrics"):
        assert torch.allclose(rank["predictions"], predictions, atol=1e-6)


def test_early_stopping_stops_all_ranks_together(launched):
    epochs = [r["epoch"] for r in launched.results("early")]
    assert len(set(epochs)) == 1, epochs
    assert epochs[0] < 20  # rank 0 plateaus first and stops everyone


def test_sigterm_on_one_rank_stops_all_at_the_same_step_and_resumes(launched):
    sigterm = launched.results("sigterm")
    steps = [r["stopped_at"] for r in sigterm]
    assert steps[0] is not None and len(set(steps)) == 1, steps
    assert "rank 1 received SIGTERM" in launched.result.stderr
    assert "last.ckpt" in sigterm[0]["saved"]
    assert all(r["resumed_epoch"] == 3 for r in sigterm)
