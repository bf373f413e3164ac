"""Slurm for real: ``srun``, ``sbatch`` and a submitit sweep on a private one-node cluster (tools/cluster/slurm.py).

Skipped, with the reason, where Slurm or munge is not installed or the user is not root; ``.ci/run`` installs
them (and builds the MPICH environment), so these tests run there. Every launch is bounded by a timeout, checks
the world size inside the run, and the cluster's daemons stop with the module, also after a failure.

The rank code comes first (``python -m tests.mpi.test_slurm MODE OUT``, started by Slurm); the assertions follow it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from functools import cache
from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from lightning_mpi import MPIStrategy
from lightning_mpi.comm import mpi_library, world
from tests.helpers import BATCH, CASES, Regressor, quiet_trainer, reference_parameters, regression_data
from tests.mpi import test_allreduce as equivalence
from tests.mpirun import ROOT
from tools.cluster.slurm import SlurmCluster, pmix_unavailable, private_cluster, unavailable

#: steps of the run Slurm stops (a bound: it is stopped long before) and of the resumed run after the stop
STOPPED_STEPS, RESUMED_STEPS = 1000, 5
#: rank 0 writes this file into OUT once training is under way: the test then has Slurm end the job
MARKER = "training"


def launch(out: Path) -> None:
    """Record what Lightning is told before any communicator exists, and what MPI says; then train the cases."""
    trainer = quiet_trainer(strategy=MPIStrategy(), max_steps=1)
    before = {"world_size": trainer.world_size, "global_rank": trainer.global_rank}
    comm = world()
    record = {
        "world": comm.size,
        "rank": comm.rank,
        "node": (comm.local_size, comm.num_nodes),
        "before_fit": before,
        "library": mpi_library(),
        "slurm_procid": os.environ.get("SLURM_PROCID"),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
    }
    (out / f"launch.rank{comm.rank}.json").write_text(json.dumps(record))
    equivalence.main(out)


class Slow(Regressor):
    """Sleeps a little every step, so that the job is still training when Slurm signals it."""

    def __init__(self) -> None:
        super().__init__()
        self.out = Path(".")  # set by _fit (not an argument: checkpoints keep hyper-parameters, loaded weights-only)
        self.started_at: int | None = None

    def on_train_start(self) -> None:
        self.started_at = self.global_step

    def training_step(self, batch, batch_idx):
        if self.global_rank == 0 and self.global_step == (self.started_at or 0) + 5:
            (self.out / MARKER).touch()
        time.sleep(0.02)
        return super().training_step(batch, batch_idx)


def _fit(out: Path, max_steps: int, ckpt_path: Path | None) -> dict:
    comm = world()
    seed_everything(0)
    model = Slow()
    model.out = out
    checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", save_on_exception=True, save_last=True)
    trainer = quiet_trainer(
        strategy=MPIStrategy(), max_steps=max_steps, callbacks=[checkpoints], enable_checkpointing=True
    )
    data = regression_data(STOPPED_STEPS * BATCH * comm.size)
    stopped_at = None
    try:
        trainer.fit(model, DataLoader(data, batch_size=BATCH, shuffle=True), ckpt_path=ckpt_path)
    except SIGTERMException:
        stopped_at = trainer.global_step
    return {
        "world": comm.size,
        "rank": comm.rank,
        "started_at": model.started_at,
        "stopped_at": stopped_at,
        "global_step": trainer.global_step,
        "weights": [p.detach().double().sum().item() for p in model.parameters()],
    }


def stopped(out: Path) -> None:
    """Train until Slurm's SIGTERM (a time limit, scancel) stops every rank; record where each one stopped."""
    record = _fit(out, STOPPED_STEPS, None)
    (out / f"stopped.rank{record['rank']}.json").write_text(json.dumps(record))


def resumed(out: Path) -> None:
    """Continue from the checkpoint the stopped run left, for a few more steps."""
    saved = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    record = _fit(out, saved + RESUMED_STEPS, out / "checkpoints" / "last.ckpt")
    record["checkpoint_step"] = saved
    (out / f"resumed.rank{record['rank']}.json").write_text(json.dumps(record))


# -- the assertions -------------------------------------------------------------------------------------------


#: a Python whose mpi4py loads MPICH: the `mpich` extra in its own environment (.ci/run creates it)
MPICH_PYTHON = Path(os.environ.get("LIGHTNING_MPI_MPICH_PYTHON", ROOT / "build" / "mpich-venv" / "bin" / "python"))
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
# Start-up (imports, MPI_Init) takes ~10 s per launch here: these bound hangs, not the expected time.
LAUNCH_TIMEOUT = 180

# Not marked `mpi`: it launches Open MPI and MPICH itself, so .ci/run's MPICH pass (-m mpi) would only repeat it.
pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"no private Slurm cluster: {unavailable()}")

JOB_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_btl": "^ofi",  # as in tests/mpirun.py: no libfabric probing
    # Under srun --mpi=pmix, Open MPI 5 learns no local peers from Slurm's PMIx 4 server, so its ranks talk TCP
    # even on one node: keep that on the loopback interface.
    "OMPI_MCA_btl_tcp_if_include": "lo",
    "PYTHONPATH": str(ROOT),
    "PYTHONUNBUFFERED": "1",
}


@pytest.fixture(scope="module")
def cluster(request):
    from tools.announce import announce

    announce(request, "starting a private one-node Slurm cluster on this host (slurmctld, slurmd, munged in a "
             "temporary directory, stopped afterwards)")  # fmt: skip
    with private_cluster() as started:
        yield started


def needs_pmix() -> None:
    reason = pmix_unavailable()
    if reason:
        pytest.skip(reason)


@cache
def reference(case: str) -> dict[str, torch.Tensor]:
    return reference_parameters(case, 2)


def check_launch_scenario(out: Path, library: str) -> list[dict]:
    """Both ranks saw a world of 2 (also Lightning before fit), and trained every case equal to one process."""
    records = [json.loads((out / f"launch.rank{r}.json").read_text()) for r in range(2)]
    for rank, record in enumerate(records):
        assert (record["world"], record["rank"]) == (2, rank), record
        assert record["node"] == [2, 1], record  # both ranks on this one node (also where PMIx tells MPI nothing)
        assert record["before_fit"] == {"world_size": 2, "global_rank": rank}, record
        assert record["library"].startswith(library), record
    for case, (_, _, dtype) in CASES.items():
        states = [torch.load(out / f"{case}.rank{r}.pt", weights_only=False) for r in range(2)]
        assert [s["world"] for s in states] == [2, 2], case
        for name, expected in reference(case).items():
            diff = (states[0]["state"][name] - expected).abs().max().item()
            assert diff <= TOLERANCE[dtype], f"{case}: {name} differs from one process by {diff}"
            assert torch.equal(states[0]["state"][name], states[1]["state"][name]), f"{case}: replicas differ"
    return records


def srun(
    cluster: SlurmCluster,
    options: list[str],
    argv: list[str],
    python: str | Path = sys.executable,
    check: bool = True,
    cwd: Path | None = None,
):
    """``srun OPTIONS python ARGV`` in a new allocation, bounded by a timeout."""
    return cluster.run(
        ["srun", *options, str(python), *argv], check=check, env=JOB_ENV, timeout=LAUNCH_TIMEOUT, cwd=cwd or ROOT
    )


def batch_script(out: Path, *commands: str) -> Path:
    """A batch script of two tasks that runs ``commands`` and writes its output to ``out/slurm-<job>.out``."""
    script = out / "job.sh"
    script.write_text(
        "\n".join(
            [
                "#!/bin/bash",
                "#SBATCH --ntasks=2",
                "#SBATCH --time=5",  # minutes: Slurm's own bound, next to the tests' timeouts
                f"#SBATCH --output={out}/slurm-%j.out",
                *commands,
            ]
        )
        + "\n"
    )
    return script


def job_output(out: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(out.glob("slurm-*.out")))


def scenario(mode: str, out: Path) -> list[str]:
    return ["-m", __name__, mode, str(out)]


def test_srun_pmix_with_open_mpi_trains_like_one_process(cluster, tmp_path):
    needs_pmix()
    srun(cluster, ["--mpi=pmix", "-n", "2"], scenario("launch", tmp_path))
    records = check_launch_scenario(tmp_path, "Open MPI")
    assert [r["slurm_procid"] for r in records] == ["0", "1"]  # srun's task numbers are the MPI ranks


def test_srun_pmi2_with_mpich_trains_like_one_process(cluster, tmp_path):
    if not MPICH_PYTHON.exists():
        pytest.skip(
            f"no MPICH environment at {MPICH_PYTHON}: .ci/run creates it (a virtual environment that sees this one's "
            "packages, plus pip install -e '.[mpich]')"
        )
    srun(cluster, ["--mpi=pmi2", "-n", "2"], scenario("launch", tmp_path), python=MPICH_PYTHON)
    records = check_launch_scenario(tmp_path, "MPICH")
    assert [r["slurm_procid"] for r in records] == ["0", "1"]


def test_sbatch_scripts_with_mpirun_and_with_srun_train_like_one_process(cluster, tmp_path):
    needs_pmix()
    commands = {
        "mpirun": f"{shutil.which('mpirun')} -n 2 {sys.executable} -m tests.mpi.test_slurm launch",
        "srun": f"srun --mpi=pmix {sys.executable} -m tests.mpi.test_slurm launch",
    }
    jobs = {}
    for name, command in commands.items():  # both queued at once: each takes the node's 2 CPUs in turn
        out = tmp_path / name
        out.mkdir()
        jobs[name] = (out, cluster.sbatch([str(batch_script(out, f"{command} {out}"))], cwd=ROOT, env=JOB_ENV))
    deadline = time.monotonic() + 2 * LAUNCH_TIMEOUT
    for name, (out, job) in jobs.items():
        state = cluster.wait_job(job, max(1.0, deadline - time.monotonic()))
        assert state == "COMPLETED", f"{name}: job {job} {state}\n{job_output(out)}"
        records = check_launch_scenario(out, "Open MPI")
        assert [r["slurm_job"] for r in records] == [job, job]
        if name == "mpirun":  # the ranks inherit the batch step's task number: it must not count
            assert [r["slurm_procid"] for r in records] == ["0", "0"]


@pytest.mark.parametrize("options", [["-n", "2"], ["--mpi=pmi2", "-n", "2"]], ids=["no-plugin", "pmi2-open-mpi"])
def test_srun_whose_tasks_are_not_one_mpi_world_fails_on_every_rank(cluster, tmp_path, options):
    result = srun(cluster, options, scenario("launch", tmp_path), check=False)
    assert result.returncode != 0, result.stdout
    # every process stops, before training, with what happened and what to do
    assert result.stderr.count("but they do not form one MPI world") == 2, result.stderr
    for fix in ("--mpi=pmix", "--mpi=pmi2", "SLURM_MPI_TYPE", "srun --mpi=list"):
        assert fix in result.stderr
    cause = "without an MPI plugin" if options == ["-n", "2"] else "srun's MPI plugin 'pmi2' does not fit Open MPI"
    assert cause in result.stderr
    assert not list(tmp_path.glob("*.pt"))


def test_slurm_ending_a_job_stops_every_rank_after_the_same_batch_and_leaves_a_resumable_checkpoint(cluster, tmp_path):
    needs_pmix()
    script = batch_script(tmp_path, f"srun --mpi=pmix {sys.executable} -m tests.mpi.test_slurm stopped {tmp_path}")
    job = cluster.sbatch([str(script)], cwd=ROOT, env=JOB_ENV)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not (tmp_path / MARKER).exists():
        state = cluster.job_state(job)
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job} {state}\n{job_output(tmp_path)}"
        assert time.monotonic() < deadline, f"job {job} did not start training\n{job_output(tmp_path)}"
        time.sleep(0.2)
    # What a time limit does: SIGTERM to every process of the job (batch script, srun, ranks), SIGKILL after
    # KillWait. The ranks must agree on one last batch, save and leave before that.
    cluster.run(["scancel", job])
    state = cluster.wait_job(job, 60)
    log = job_output(tmp_path)
    assert state == "CANCELLED", f"job {job} {state}\n{log}"
    stopped = [json.loads((tmp_path / f"stopped.rank{r}.json").read_text()) for r in range(2)]
    assert [s["world"] for s in stopped] == [2, 2], stopped
    steps = {s["stopped_at"] for s in stopped}
    assert len(steps) == 1 and None not in steps, f"{stopped}\n{log}"
    step = steps.pop()
    assert 5 <= step < STOPPED_STEPS
    assert stopped[0]["weights"] == stopped[1]["weights"]  # and as the same replica
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == step

    srun(cluster, ["--mpi=pmix", "-n", "2"], scenario("resumed", tmp_path))
    resumed = [json.loads((tmp_path / f"resumed.rank{r}.json").read_text()) for r in range(2)]
    for record in resumed:
        assert record["world"] == 2
        assert record["checkpoint_step"] == step
        assert (record["started_at"], record["global_step"]) == (step, step + RESUMED_STEPS)
    assert resumed[0]["weights"] == resumed[1]["weights"]


def test_hydra_recipe_under_srun_writes_one_directory_and_one_result(cluster, tmp_path):
    needs_pmix()
    recipe = [
        "-m",
        "recipes.forecasting",
        "strategy=average",
        "trainer.max_epochs=2",
        "data.days=200",
        "plot=false",
    ]
    srun(cluster, ["--mpi=pmix", "-n", "2"], recipe, cwd=tmp_path)
    runs = list((tmp_path / "outputs" / "forecast").iterdir())
    assert len(runs) == 1, runs  # one stamp for both ranks
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("result.json")] == [
        runs[0].relative_to(tmp_path) / "result.json"
    ]
    assert len(list(tmp_path.rglob(".hydra"))) == 1
    assert (runs[0] / "train.log").exists()
    assert (runs[0] / "train.rank1.log").exists()
    result = json.loads((runs[0] / "result.json").read_text())
    assert (result["ranks"], result["strategy"]) == (2, "average")


def test_submitit_sweep_runs_each_job_as_a_slurm_job_of_two_ranks(cluster, tmp_path):
    needs_pmix()
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")
    sweep = [
        sys.executable,
        "-m",
        "recipes.forecasting",
        "-m",
        "hydra/launcher=submitit_slurm",
        "model=lstm,gru",
        "strategy=average",
        "trainer.max_epochs=2",
        "data.days=200",
        "plot=false",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.timeout_min=5",
        '+hydra.launcher.srun_args=["--mpi=pmix"]',
    ]
    # The sweep runs in this one process (no MPI): it submits each job once and waits for them.
    cluster.run(sweep, cwd=tmp_path, env=JOB_ENV, timeout=3 * LAUNCH_TIMEOUT)
    sweeps = list((tmp_path / "multirun" / "forecast").iterdir())
    assert len(sweeps) == 1, sweeps  # the jobs resolved the sweep's stamp
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [job.name[:2] for job in jobs] == ["0_", "1_"], jobs
    assert len(list(sweeps[0].rglob("result.json"))) == 2
    assert len(list(sweeps[0].rglob(".hydra"))) == 2
    for job, model in zip(jobs, ["LSTM", "GRU"]):
        result = json.loads((job / "result.json").read_text())
        assert (result["ranks"], result["model"], result["strategy"]) == (2, model, "average")
        assert (job / "train.log").exists()
        assert (job / "train.rank1.log").exists()
    # two Slurm jobs (an array), two srun tasks each
    tasks = sorted(p.name for p in (sweeps[0] / ".submitit").rglob("*_log.out"))
    assert len(tasks) == 4 and len({re.sub(r"_\d+_log.out$", "", t) for t in tasks}) == 2, tasks


if __name__ == "__main__":
    {"launch": launch, "stopped": stopped, "resumed": resumed}[sys.argv[1]](Path(sys.argv[2]))
