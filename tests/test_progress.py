"""EpochLines, the progress display under an MPI launcher: one line per epoch, and the API of Lightning's bar."""

from __future__ import annotations

import re

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_mpi import EpochLines


class Printing(BoringModel):
    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.print(f"printed in epoch {self.current_epoch}")  # goes through the progress bar's print
        out = super().training_step(batch, batch_idx)
        self.log("train_loss", out["loss"], on_step=False, on_epoch=True)
        return out


def test_one_line_per_epoch_with_the_metrics_and_self_print(capsys):
    bar = EpochLines()
    trainer = Trainer(accelerator="cpu", max_epochs=3, limit_train_batches=4, limit_val_batches=2, callbacks=[bar],
                      logger=False, enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(Printing())
    out = capsys.readouterr().out
    lines = re.findall(r"^epoch (\d)/3 \| step (\d+) \| [\d.]+ s \| train_loss [\d.e-]+$", out, re.M)
    assert lines == [("1", "4"), ("2", "8"), ("3", "12")], out
    assert [f"printed in epoch {e}" in out for e in range(3)] == [True] * 3
    # code written for Lightning's default bar keeps working: it is one, whose bars count without drawing
    assert isinstance(trainer.progress_bar_callback, TQDMProgressBar)
    assert trainer.progress_bar_callback.train_progress_bar.disable
    assert "\r" not in out


def test_the_default_bar_is_replaced_and_a_bar_passed_in_callbacks_stays():
    from lightning_mpi import MPIStrategy
    from lightning_mpi.progress import use_epoch_lines_under_a_launcher  # what import does under a launcher

    trainer = Trainer(strategy=MPIStrategy(), accelerator="cpu", logger=False)
    use_epoch_lines_under_a_launcher(trainer, {})
    assert type(trainer.progress_bar_callback) is EpochLines
    mine = TQDMProgressBar(refresh_rate=5)
    trainer = Trainer(strategy=MPIStrategy(), accelerator="cpu", logger=False, callbacks=[mine])
    use_epoch_lines_under_a_launcher(trainer, {"callbacks": [mine]})
    assert trainer.progress_bar_callback is mine
    plain = Trainer(accelerator="cpu", logger=False)  # another strategy: left as Lightning made it
    use_epoch_lines_under_a_launcher(plain, {})
    assert type(plain.progress_bar_callback) is TQDMProgressBar
