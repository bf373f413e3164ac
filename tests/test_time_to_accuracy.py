"""The time-to-accuracy recipe (recipes.time_to_accuracy): its pure logic and its report (a tiny 2-rank run over
shared memory: tests/mpi/test_recipes.py; the emulated network needs root and minutes: the recipe's full run)."""

from __future__ import annotations

import doctest

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import recipes.time_to_accuracy.run as tta
from tests.mpirun import ROOT

PARAMETERS = 93_322  # the study CNN's


def _compose(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "recipes" / "time_to_accuracy" / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_doctests() -> None:
    assert doctest.testmod(tta).failed == 0


def test_the_default_runs_the_issues_variants_on_both_networks() -> None:
    cfg = _compose()
    assert list(cfg.networks) == ["shm", "1gbit"]
    assert cfg.ranks == 2
    assert tta.check_config(cfg) == [
        "allreduce", "average_8", "average_32", "average_128", "diloco_8", "diloco_32", "diloco_128", "diloco_32_bf16",
    ]  # fmt: skip
    assert cfg.variants.diloco_32.outer_optimizer == {
        "_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.7, "momentum": 0.9, "nesterov": True,
    }  # fmt: skip
    assert cfg.variants.diloco_32_bf16.pseudo_gradient_dtype == "bfloat16"
    assert (cfg.data.train_size, cfg.data.val_size) == (8000, 2000)


def test_a_run_that_cannot_be_measured_fairly_is_refused() -> None:
    with pytest.raises(ValueError, match="not a multiple of variant average_128's evaluation interval"):
        tta.check_config(_compose("steps=96"))
    with pytest.raises(ValueError, match="reference 'allreduce' must run"):
        tta.check_config(_compose("only=[diloco_8]"))
    with pytest.raises(ValueError, match=r"only=\['diloco_9'\]"):
        tta.check_config(_compose("only=[allreduce,diloco_9]"))
    with pytest.raises(ValueError, match="variant typo: Key 'every_n_step' not in 'MPIStrategyConfig'"):
        tta.check_config(_compose("+variants.typo={sync:average,every_n_step:16}"))
    added = _compose("+variants.average_16={sync:average,every_n_steps:16}", "only=[allreduce,average_16]")
    assert tta.check_config(added) == ["allreduce", "average_16"]


def test_the_emulated_network_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from tools.cluster import emulate

    monkeypatch.setattr(
        emulate, "unavailable", lambda: "an emulated cluster needs root (network and UTS namespaces, tc)"
    )
    with pytest.raises(
        RuntimeError, match=r"networks \['1gbit'\] run on the emulated cluster.*needs root.*networks=\[shm\]"
    ):
        tta.drive(_compose("networks=[shm,1gbit]"))
    with pytest.raises(ValueError, match="neither 'shm' nor a link rate"):
        tta._check_emulation(["fast"])


def _curve(*rows: tuple[int, float, int, float]) -> list[dict]:
    return [dict(zip(("step", "time_s", "bytes", "acc"), row)) for row in rows]


def test_time_and_bytes_to_target() -> None:
    network = {"variants": {
        "allreduce": {
            "points": _curve((0, 0, 0, 0.1), (32, 10, 3200, 0.95), (64, 20, 6400, 0.97), (96, 30, 9600, 0.98))
        },
        "average_32": {"points": _curve((0, 0, 0, 0.1), (32, 9, 100, 0.9), (64, 18, 200, 0.93), (96, 27, 300, 0.96))},
        "diloco_32": {"points": _curve((0, 0, 0, 0.1), (32, 8, 100, 0.96), (64, 16, 200, 0.99), (96, 24, 300, 0.985))},
    }}  # fmt: skip
    analysis = tta.analyse(network, "allreduce", 0.01)
    assert analysis["target"] == pytest.approx(0.97)
    rows = analysis["variants"]
    # the first evaluation at or above the target, even where the accuracy sits exactly on it
    assert (rows["allreduce"]["step_to_target"], rows["allreduce"]["time_to_target_s"]) == (64, 20)
    assert rows["diloco_32"]["bytes_to_target"] == 200
    assert rows["diloco_32"]["final_acc"] == 0.985
    assert rows["diloco_32"]["bytes_factor"] == 32.0
    assert rows["diloco_32"]["time_factor"] == 0.8
    assert not rows["average_32"]["reached"]
    assert rows["average_32"]["bytes_factor"] is None
    assert tta.verdict(analysis, ["diloco_32"]) == {"met": True, "passing": ["diloco_32"]}
    slower = tta.analyse({"variants": {**network["variants"], "diloco_32": {"points": _curve(
        (0, 0, 0, 0.1), (64, 25, 200, 0.975))}}}, "allreduce", 0.01)  # fmt: skip
    assert tta.verdict(slower, ["diloco_32"])["met"] is False  # fewer bytes, but later than allreduce
    with pytest.raises(ValueError, match="reference 'allreduce' did not run"):
        tta.analyse({"variants": {"diloco_32": network["variants"]["diloco_32"]}}, "allreduce", 0.01)
