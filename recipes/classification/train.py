"""Image and tabular classification over MPI: CNN ensembles, data-parallel MLPs, parallel k-fold.

    mpirun -n 2 python -m recipes.classification experiment=ensemble_table
    mpirun -n 2 python -m recipes.classification experiment=mlp_speedup
    mpirun -n 2 python -m recipes.classification experiment=kfold

Rank 0 writes ``result.json`` (metrics of the model or ensemble and of every member, times, ranks, config)
and ``confusion_matrix.png`` into the run directory, and ends with one line (console and the job's log): the
accuracy, the training time and where the files are. The logic is :func:`run`, importable without Hydra's
command line.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.strategies import Strategy
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from lightning_mpi import MPIStrategy, hard_vote
from lightning_mpi.comm import Communicator, world
from lightning_mpi.files import write_json
from lightning_mpi.hydra import check_strategy_fits_job, job_output_dir, mpi_hydra_main
from lightning_mpi.threads import choose_threads
from recipes.classification.data import ClassificationDataModule, stratified_folds, stratified_split
from recipes.classification.report import plot_confusion_matrix
from recipes.configs import Mode, trainer_options
from recipes.configs import register as register_configs
from recipes.runs import shown

register_configs()  # the schemas and shared settings conf/ refers to


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and evaluate as ``cfg.mode`` says (``"train"`` or ``"kfold"``); return the result on every rank
    (k-fold: the fold scores and the combined models' scores on rank 0 only).

    Rank 0 also writes it, with the confusion matrix, to ``cfg.output_dir`` (default: Hydra's run directory).
    """
    start = time.perf_counter()
    result = _kfold(cfg) if cfg.mode == Mode.kfold else _train(cfg)  # the schema admits only these two
    result["wall_time_s"] = time.perf_counter() - start
    result["machine"] = machine_load(world().local_size)
    result["config"] = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if world().rank == 0:
        _write(result, job_output_dir(cfg))
    return result


def machine_load(ranks_on_node: int) -> dict[str, Any]:
    """What else ran beside the job, for the report to judge its wall times: the node's cores, this job's ranks
    on it and the 1-minute load average at the end of the run (which counts this job's busy ranks too)."""
    return {
        "cores": os.cpu_count() or 1,
        "ranks_on_node": ranks_on_node,
        "load_1min": os.getloadavg()[0],
        "host": platform.node(),
    }


# -- one model (or one ensemble) trained by all ranks ----------------------------------------------------------


def _train(cfg: DictConfig) -> dict[str, Any]:
    comm = world()
    seed_everything(cfg.seed, workers=True)
    features, labels = instantiate(cfg.data.source)
    data = ClassificationDataModule.split(
        features, labels, cfg.data.train_size, cfg.data.test_size, cfg.data.batch_size, cfg.seed
    )
    model: LightningModule = instantiate(cfg.model)
    strategy = instantiate(cfg.strategy)
    check_strategy_fits_job(strategy, comm.size)
    trainer = _trainer(cfg, strategy)
    began, cpu_began = time.perf_counter(), time.process_time()
    trainer.fit(model, datamodule=data)
    # CPU seconds show the work each rank did even when other jobs share the cores and stretch the wall time.
    train_times = comm.allgather_object((time.perf_counter() - began, time.process_time() - cpu_began))
    logged = trainer.test(model, datamodule=data, verbose=False)[0]
    logits, members, target = _predict(trainer, model, data)
    return {
        "mode": "train",
        "experiment": cfg.name,
        "data": cfg.data.name,
        "ranks": comm.size,
        "sync": _sync_name(trainer),
        "train_samples": len(data.train_set),
        "test_samples": len(data.test_set),
        "epochs": trainer.current_epoch,
        "train_time_s": max(wall for wall, _ in train_times),
        "train_time_per_rank_s": [wall for wall, _ in train_times],
        "train_cpu_per_rank_s": [cpu for _, cpu in train_times],
        "metrics": scores(logits.argmax(-1), target, cfg.model.num_classes),
        "members": [scores(m.argmax(-1), target, cfg.model.num_classes) for m in members],
        "logged": {k: float(v) for k, v in logged.items()},
        "confusion_matrix": confusion(logits.argmax(-1), target, cfg.model.num_classes).tolist(),
    }


def _trainer(cfg: DictConfig, strategy: Strategy) -> Trainer:
    options = trainer_options(cfg.trainer)
    options.update(strategy=strategy, logger=False, enable_checkpointing=False, enable_model_summary=False)
    options.setdefault("default_root_dir", str(job_output_dir(cfg)))
    return Trainer(**options)


def _sync_name(trainer: Trainer) -> str:
    policy = getattr(trainer.strategy, "policy", None)
    return policy.name if policy is not None else "single"


def _predict(trainer: Trainer, model: LightningModule, data: ClassificationDataModule) -> tuple[Tensor, Tensor, Tensor]:
    """Outputs over the whole test set on every rank: ``logits``, ``members`` ``[members, N, classes]``, ``target``."""
    batches = trainer.predict(model, datamodule=data)
    assert batches is not None
    return (
        torch.cat([b["logits"] for b in batches]),
        torch.cat([b["members"] for b in batches], dim=1),
        torch.cat([b["target"] for b in batches]),
    )


# -- parallel k-fold cross-validation ---------------------------------------------------------------------------


def _kfold(cfg: DictConfig) -> dict[str, Any]:
    """Folds are dealt round-robin to the ranks; each rank trains its folds alone, rank 0 combines them."""
    comm = world()
    features, labels = instantiate(cfg.data.source)
    train, test = stratified_split(labels, cfg.data.train_size, cfg.data.test_size, cfg.seed)
    x, y = features[train], labels[train]
    folds = stratified_folds(y, cfg.kfold.folds, cfg.seed)
    began = time.perf_counter()
    mine = [_fit_fold(cfg, x, y, folds[k], k) for k in range(comm.rank, len(folds), comm.size)]
    phase_times = comm.allgather_object(time.perf_counter() - began)
    gathered = comm.gather_object(mine, root=0)
    result: dict[str, Any] = {
        "mode": "kfold",
        "experiment": cfg.name,
        "data": cfg.data.name,
        "ranks": comm.size,
        "folds": cfg.kfold.folds,
        "train_samples": len(train),
        "test_samples": len(test),
        "kfold_time_s": max(phase_times),
    }
    if gathered is not None:
        fits = sorted((fit for part in gathered for fit in part), key=lambda fit: fit["fold"])
        result.update(_combine_folds(cfg, fits, features[test], labels[test]))
    return result


def _fit_fold(cfg: DictConfig, x: Tensor, y: Tensor, fold: tuple[Tensor, Tensor], k: int) -> dict[str, Any]:
    # Every fold starts from the same initial weights, so that averaging the trained weights is meaningful.
    seed_everything(cfg.seed, workers=True)
    model: LightningModule = instantiate(cfg.model)
    data = ClassificationDataModule(x, y, fold[0], fold[1], cfg.data.batch_size)
    # A one-rank communicator: this rank trains the fold alone, whatever the other ranks do meanwhile.
    threads = choose_threads(None, world().local_size).number  # the fold trainers share this node's cores
    strategy = MPIStrategy(communicator=Communicator(), num_threads=threads)
    trainer = _trainer(cfg, strategy)
    began = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - began
    logits, _, target = _predict(trainer, model, data)
    return {
        "fold": k,
        "rank": world().rank,
        "train_time_s": seconds,
        "held_out": scores(logits.argmax(-1), target, cfg.model.num_classes),
        "state": {name: value.detach().clone() for name, value in model.state_dict().items()},
    }


def _combine_folds(cfg: DictConfig, fits: list[dict[str, Any]], x: Tensor, y: Tensor) -> dict[str, Any]:
    """Fold scores' mean and spread, and the test scores of the fold ensemble and of the averaged weights."""
    classes = cfg.model.num_classes
    accuracies = [fit["held_out"]["acc"] for fit in fits]
    members = torch.stack([_logits(cfg, fit["state"], x) for fit in fits])
    votes = hard_vote(members)
    averaged = {name: torch.stack([fit["state"][name].float() for fit in fits]).mean(0) for name in fits[0]["state"]}
    return {
        "fold_scores": [{k: v for k, v in fit.items() if k != "state"} for fit in fits],
        "fold_acc_mean": statistics.fmean(accuracies),
        "fold_acc_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "train_time_sum_s": sum(fit["train_time_s"] for fit in fits),
        "metrics": scores(votes, y, classes),
        "members": [scores(m.argmax(-1), y, classes) for m in members],
        "averaged_weights": scores(_logits(cfg, averaged, x).argmax(-1), y, classes),
        "confusion_matrix": confusion(votes, y, classes).tolist(),
    }


def _logits(cfg: DictConfig, state: dict[str, Tensor], x: Tensor) -> Tensor:
    model: LightningModule = instantiate(cfg.model)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return torch.cat([model(chunk) for chunk in x.split(1024)])


# -- scores and files -------------------------------------------------------------------------------------------


def scores(predicted: Tensor, target: Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy and macro precision, recall and F1 of class predictions."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    return {
        "acc": float(multiclass_accuracy(predicted, target, num_classes, average="micro")),
        "precision": float(multiclass_precision(predicted, target, num_classes, average="macro")),
        "recall": float(multiclass_recall(predicted, target, num_classes, average="macro")),
        "f1": float(multiclass_f1_score(predicted, target, num_classes, average="macro")),
    }


def confusion(predicted: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Counts ``[true class, predicted class]``."""
    flat = target * num_classes + predicted
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _write(result: dict[str, Any], out: Path) -> None:
    write_json(out / "result.json", result)
    accuracy = result["metrics"]["acc"]
    title = f"{result['experiment']} on {result['data']}, {result['ranks']} rank(s): accuracy {accuracy:.4f}"
    plot_confusion_matrix(result["confusion_matrix"], out / "confusion_matrix.png", title)


def summary(result: dict[str, Any], out: Path) -> str:
    """The run in one line: what ran on how many ranks, its test accuracy, its time, where the files are."""
    ranks = "1 process" if result["ranks"] == 1 else f"{result['ranks']} ranks"
    head = f"{result['experiment']} on {result['data']}, {ranks}"
    where = f"; results in {shown(out)}"
    if result["mode"] == "kfold":
        if "metrics" not in result:  # ranks > 0: rank 0 combines the folds
            return f"{head}: k-fold {result['kfold_time_s']:.1f} s (scores on rank 0){where}"
        return (
            f"{head}, {result['folds']} folds: held-out accuracy {100 * result['fold_acc_mean']:.2f} ± "
            f"{100 * result['fold_acc_std']:.2f} %, fold ensemble {100 * result['metrics']['acc']:.2f} %, averaged "
            f"weights {100 * result['averaged_weights']['acc']:.2f} %, k-fold {result['kfold_time_s']:.1f} s{where}"
        )
    members = [100 * m["acc"] for m in result["members"]]
    spread = f" (members {min(members):.2f}-{max(members):.2f} %)" if len(members) > 1 else ""
    return (
        f"{head}, {result['sync']}: test accuracy {100 * result['metrics']['acc']:.2f} %{spread}, "
        f"F1 {result['metrics']['f1']:.4f}, training {result['train_time_s']:.1f} s{where}"
    )


@mpi_hydra_main(config_path=str(Path(__file__).with_name("conf")), config_name="config")
def main(cfg: DictConfig) -> None:
    result = run(cfg)
    # Hydra's job logging: rank 0's console and the job's log; ranks > 0 their own <job>.rank<r>.log
    logging.getLogger(__name__).info(summary(result, job_output_dir(cfg)))
