"""Slurm for real: ``srun``, ``sbatch`` and a submitit sweep on a private one-node cluster (tools/cluster/slurm.py).

Skipped, with the reason, where Slurm or munge is not installed or the user is not root; ``.ci/run`` installs
them (and builds the MPICH environment), so these tests run there. Every launch is bounded by a timeout, checks
the world size inside the run, and the cluster's daemons stop with the module, also after a failure.
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

from tests.helpers import CASES, reference_parameters
from tests.scenarios.slurm import MARKER, RESUMED_STEPS, STOPPED_STEPS
from tools.cluster.slurm import SlurmCluster, pmix_unavailable, private_cluster, unavailable

ROOT = Path(__file__).resolve().parents[1]
#: a Python whose mpi4py loads MPICH: the `mpich` extra in its own environment (.ci/run creates it)
MPICH_PYTHON = Path(os.environ.get("LIGHTNING_MPI_MPICH_PYTHON", ROOT / "build" / "mpich-venv" / "bin" / "python"))
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
# Start-up (imports, MPI_Init) takes ~10 s per launch here: these bound hangs, not the expected time.
LAUNCH_TIMEOUT = 180

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
    return ["-m", "tests.scenarios.slurm", mode, str(out)]


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
        "mpirun": f"{shutil.which('mpirun')} -n 2 {sys.executable} -m tests.scenarios.slurm launch",
        "srun": f"srun --mpi=pmix {sys.executable} -m tests.scenarios.slurm launch",
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
    script = batch_script(tmp_path, f"srun --mpi=pmix {sys.executable} -m tests.scenarios.slurm stopped {tmp_path}")
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
        str(ROOT / "recipes" / "train.py"),
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
        str(ROOT / "recipes" / "train.py"),
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
