"""The policies' arithmetic on N ranks in one process (threads: lightning_mpi.comm.threaded), against hand
computations; no mpirun. Each test body runs on every rank; expectations come from the rank and the world size."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from lightning_mpi.comm.threaded import ThreadCommunicator, run_ranks
from lightning_mpi.policies import Ensemble, GradientAllreduce, ParameterAveraging
from lightning_mpi.voting import soft_vote_log_probs

WORLD_SIZES = [2, 3]


def net(seed: int) -> nn.Module:
    """Built before the ranks start: torch's global generator is one for all threads."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)).double()


def nets(size: int, seed: int | None = None) -> list[nn.Module]:
    """One model per rank: the same (``seed``) or a different one on every rank."""
    return [net(seed if seed is not None else r) for r in range(size)]


def local_change(module: nn.Module, rank: int) -> None:
    """What local steps would do: a different change on every rank (parameters and buffers)."""
    with torch.no_grad():
        for i, tensor in enumerate([*module.parameters(), module[1].running_mean]):
            tensor.add_((rank + 1) * (i + 1) * 0.01)


def mean_of_changes(size: int) -> float:
    return sum(r + 1 for r in range(size)) / size * 0.01


@pytest.mark.parametrize("size", WORLD_SIZES)
def test_collectives_give_what_mpi_gives(size: int) -> None:
    def body(comm: ThreadCommunicator) -> None:
        r, n = comm.rank, comm.size
        assert comm.allreduce_(torch.tensor([r + 1.0]), "sum").item() == n * (n + 1) / 2
        assert comm.allreduce_(torch.tensor([r + 1.0]), "mean").item() == (n + 1) / 2
        assert comm.allreduce_(torch.tensor([r]), "max").item() == n - 1
        assert comm.allreduce_(torch.tensor([1 << r]), "bor").item() == 2**n - 1
        assert comm.broadcast_(torch.tensor([r]), root=n - 1).item() == n - 1
        gathered = comm.allgather(torch.full((r + 1,), r))  # first dimensions differ between ranks
        assert [g.tolist() for g in gathered] == [[s] * (s + 1) for s in range(n)]
        assert comm.allgather_object({"rank": r}) == [{"rank": s} for s in range(n)]
        assert comm.gather_object(r, root=0) == (list(range(n)) if r == 0 else None)
        # alltoallv: rank s sends s + 1 copies of 10 * s + d to rank d
        out = torch.empty(sum(s + 1 for s in range(n)), dtype=torch.long)
        sent = torch.cat([torch.full((r + 1,), 10 * r + d) for d in range(n)])
        comm.alltoallv_(out, sent, [s + 1 for s in range(n)], [r + 1] * n)
        assert out.tolist() == [10 * s + r for s in range(n) for _ in range(s + 1)]
        mine = torch.empty(2)
        comm.reduce_scatter_(mine, torch.arange(2.0 * n), [2] * n, "sum")
        assert mine.tolist() == [n * 2.0 * r, n * (2.0 * r + 1)]

    run_ranks(size, body)


def test_a_rank_that_skips_a_collective_fails_every_rank_instead_of_hanging() -> None:
    def body(comm: ThreadCommunicator) -> None:
        if comm.rank == 0:
            comm.barrier()

    with pytest.raises(RuntimeError, match="never called it"):
        run_ranks(2, body, timeout=2)


@pytest.mark.parametrize("size", WORLD_SIZES)
def test_averaging_makes_every_rank_the_mean_of_their_models(size: int) -> None:
    models = nets(size)  # different on every rank: setup starts all from rank 0's

    def body(comm: ThreadCommunicator) -> dict[str, torch.Tensor]:
        module = models[comm.rank]
        policy = ParameterAveraging(every_n_steps=1)
        policy.setup(comm, module, fitting=True, resuming=False)
        start = {k: v.clone() for k, v in module.state_dict().items()}
        local_change(module, comm.rank)
        policy.average()
        changed = dict(zip([n for n, _ in module.named_parameters()], module.parameters()))
        for name, value in changed.items():
            assert torch.allclose(value, start[name] + (list(changed).index(name) + 1) * mean_of_changes(size))
        return {k: v.clone() for k, v in module.state_dict().items()}

    states = run_ranks(size, body)
    assert all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in s)
    assert states[0]["0.weight"].sum() != net(seed=0)[0].weight.sum()  # the change arrived


@pytest.mark.parametrize("size", WORLD_SIZES)
def test_evaluation_sees_the_average_and_training_goes_on_from_the_local_model(size: int) -> None:
    models = nets(size, seed=0)

    def body(comm: ThreadCommunicator) -> None:
        module = models[comm.rank]
        policy = ParameterAveraging(every_n_steps=10)
        policy.setup(comm, module, fitting=True, resuming=False)
        policy.after_optimizer_step(module, [])  # one local step: out of sync
        local_change(module, comm.rank)
        local = {k: v.clone() for k, v in module.state_dict().items()}
        with policy.evaluation(module):
            averaged = [t.clone() for t in comm.allgather(module[0].weight.detach())]
            assert all(torch.equal(averaged[0], other) for other in averaged)  # every rank the same model
        assert all(torch.equal(module.state_dict()[k], local[k]) for k in local)

    run_ranks(size, body)


@pytest.mark.parametrize("size", WORLD_SIZES)
def test_diloco_outer_steps_equal_the_hand_computed_ones(size: int) -> None:
    lr, momentum = 0.7, 0.9

    models = nets(size, seed=0)

    def body(comm: ThreadCommunicator) -> None:
        module = models[comm.rank]
        nesterov = functools.partial(torch.optim.SGD, lr=lr, momentum=momentum, nesterov=True)
        policy = ParameterAveraging(every_n_steps=1, outer_optimizer=nesterov)
        policy.setup(comm, module, fitting=True, resuming=False)
        anchor = module[0].weight.detach().clone()
        buffer = torch.zeros_like(anchor)
        for _ in range(2):  # the second step uses the momentum of the first
            local_change(module, comm.rank)
            delta = anchor - (anchor + mean_of_changes(size))  # the mean pseudo-gradient
            buffer = momentum * buffer + delta
            anchor = anchor - lr * (delta + momentum * buffer)
            policy.average()
            assert torch.allclose(module[0].weight, anchor, atol=1e-12)
        # buffers are averaged, not stepped
        gathered = comm.allgather(module[1].running_mean.detach())
        assert all(torch.equal(gathered[0], other) for other in gathered)

    run_ranks(size, body)


@pytest.mark.parametrize("size", WORLD_SIZES)
def test_gradient_allreduce_leaves_the_mean_gradient_on_every_rank(size: int) -> None:
    x = torch.randn(8 * size, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # the mean over ranks of each rank's own gradient, by hand
    reference = net(seed=0)
    expected = []
    for r in range(size):
        reference.zero_grad()
        reference(x[8 * r : 8 * r + 8]).pow(2).mean().backward()
        expected.append([p.grad.clone() for p in reference.parameters()])
    models = nets(size, seed=0)

    def body(comm: ThreadCommunicator) -> None:
        module = models[comm.rank]
        policy = GradientAllreduce()
        policy.setup(comm, module, fitting=True, resuming=False)
        policy.before_training_step(module, synchronised=True)
        policy.before_backward(module, synchronised=True)
        (module(x[8 * comm.rank : 8 * comm.rank + 8]).pow(2).mean() * policy.loss_scale).backward()
        policy.after_backward(module)
        for i, p in enumerate(module.parameters()):
            assert torch.allclose(p.grad, sum(e[i] for e in expected) / size, atol=1e-12)

    run_ranks(size, body)


@pytest.mark.parametrize("size", WORLD_SIZES)
def test_ensemble_members_differ_and_their_vote_is_the_same_on_every_rank(size: int) -> None:
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 3)).double() for _ in range(size)]  # the LightningModule's place
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())  # the same model everywhere: the ensemble makes them differ

    def body(comm: ThreadCommunicator) -> torch.Tensor:
        module = models[comm.rank]
        policy = Ensemble(voting="soft", seed=0)
        policy.setup(comm, module, fitting=True, resuming=False)  # each rank re-initialised from its own seed
        weights = comm.allgather(module[0].weight.detach())
        assert all(not torch.equal(weights[0], w) for w in weights[1:])
        x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        with policy.evaluation(module):
            voted = module(x)
        members = policy.member_outputs  # every rank's member, in rank order
        assert members.shape == (size, 5, 3)
        assert torch.equal(members[comm.rank], module(x).detach())  # this rank's own, forward restored
        assert torch.equal(voted, soft_vote_log_probs(members))  # soft voting's logits
        return voted

    voted = run_ranks(size, body)
    assert all(torch.equal(voted[0], v) for v in voted[1:])
