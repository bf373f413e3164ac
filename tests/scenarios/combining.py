"""Under mpirun: periodic parameter averaging and ensembles (issue: averaging and voting)."""

import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, seed_everything
from torch.utils.data import DataLoader

from lightning_mpi import MPIStrategy
from lightning_mpi.comm import world
from lightning_mpi.voting import hard_vote_scores
from tests.helpers import (
    BATCH,
    DigitClassifier,
    build,
    digits_data,
    quiet_trainer,
    regression_data,
    save_rank_results,
)


class GatherLocalModels(Callback):
    """Before the strategy's end-of-fit averaging, keep every rank's local model (rank order)."""

    def on_train_end(self, trainer, pl_module):
        self.members = world().allgather_object({k: v.clone() for k, v in pl_module.state_dict().items()})


def averaging(out: Path) -> None:
    comm = world()
    results = {}
    # Plain SGD: averaging after every step is gradient allreduce.
    variants = (
        ("allreduce", MPIStrategy()),
        ("every_step", MPIStrategy(sync="average", every_n_steps=1)),
        ("warmup_throughout", MPIStrategy(sync="average", warmup_steps=20)),  # post-local SGD, never local
    )
    for name, strategy in variants:
        model, _, _ = build("sgd_momentum")
        model.configure_optimizers = lambda m=model: torch.optim.SGD(m.parameters(), lr=0.05)
        trainer = quiet_trainer(strategy=strategy, max_steps=20)
        trainer.fit(model, DataLoader(regression_data(20 * BATCH * comm.size), batch_size=BATCH, shuffle=True))
        results[name] = model.state_dict()
    # One-shot: train locally (with BatchNorm), average once at the end.
    seed_everything(0)
    model = DigitClassifier()
    gather = GatherLocalModels()
    strategy = MPIStrategy(sync="average", every_n_steps=None)
    trainer = quiet_trainer(strategy=strategy, max_epochs=2, callbacks=[gather])
    train, _ = digits_data()
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True))
    results["one_shot"] = model.state_dict()
    results["one_shot_members"] = gather.members
    results["bytes_per_epoch"] = strategy.bytes_per_epoch
    save_rank_results(out, "averaging", results)


def ensemble(out: Path) -> None:
    comm = world()
    seed_everything(0)  # same seed everywhere: the strategy must still make the members differ
    model = DigitClassifier(lr=0.1)
    strategy = MPIStrategy(sync="ensemble", voting="hard")
    trainer = quiet_trainer(strategy=strategy, max_epochs=4)
    train, test = digits_data()
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True))
    test_loader = DataLoader(test, batch_size=64)
    tested = trainer.test(model, test_loader, verbose=False)[0]
    ensemble_acc = tested["test_acc"]
    predictions = torch.cat(trainer.predict(model, test_loader))
    # Each member's own logits, outside the strategy's evaluation (plain forward), and their accuracies.
    model.eval()
    with torch.no_grad():
        own = model(test.tensors[0])
    members = torch.stack(comm.allgather(own))
    member_acc = [(m.argmax(-1) == test.tensors[1]).float().mean().item() for m in members]
    path = out / "ensemble.ckpt"
    trainer.save_checkpoint(path)
    save_rank_results(
        out,
        "ensemble",
        {
            "state": model.state_dict(),
            "predictions": predictions,
            "local_vote": hard_vote_scores(members),
            "ensemble_acc": ensemble_acc,
            "counts": (tested["test_seen"], tested["test_logged_count"]),
            "member_acc": member_acc,
        },
    )


def main(out: Path) -> None:
    averaging(out)
    ensemble(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
