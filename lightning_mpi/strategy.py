"""MPIStrategy: data-parallel Lightning training over MPI (mpi4py), without a torch.distributed process group."""

from __future__ import annotations

import signal
import sys
import threading
import warnings
from collections.abc import Callable, Generator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.types import ReduceOp
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_mpi import checkpoint as ckpt
from lightning_mpi.batching import TensorBatches
from lightning_mpi.buffers import DEFAULT_BUCKET_MB
from lightning_mpi.checks import check_launch, check_replicas_match
from lightning_mpi.comm import Communicator, validate_timeout, world
from lightning_mpi.environment import MPICommEnvironment
from lightning_mpi.failure import AbortOnFailure, abort_on_uncaught_exceptions, end_job_unless_every_rank_failed
from lightning_mpi.join import JoinedBatches, StepStatus, UnevenInputs
from lightning_mpi.metrics import sync_metrics
from lightning_mpi.sampling import shard_evaluation_dataloader
from lightning_mpi.sync import Ensemble, GradientAllreduce, ParameterAveraging, SyncPolicy
from lightning_mpi.threads import choose_threads

_REDUCE_OPS = {"mean": "mean", "avg": "mean", "sum": "sum", "max": "max", "min": "min"}


class MPIStrategy(ParallelStrategy):
    """Train one model replica per MPI rank; launch with ``mpirun -n N python train.py`` (or ``srun``).

    Args:
        sync: how ranks are combined. ``"allreduce"``: gradients averaged after every stepping backward
            (synchronous data parallel). ``"average"``: local SGD, parameters and buffers averaged every
            ``every_n_steps`` optimizer steps and/or ``every_n_epochs`` epochs, and always at the end of fit
            (both ``None``: only then). ``"ensemble"``: every rank trains its own member, evaluation and
            prediction combine the members by ``voting``.
        every_n_steps, every_n_epochs, warmup_steps, average_optimizer_state: options of ``sync="average"``,
            see :class:`~lightning_mpi.sync.ParameterAveraging`.
        voting: ``"hard"`` (majority), ``"soft"`` (mean probability), ``"mean"`` or ``"median"`` (regression);
            only for ``sync="ensemble"``.
        seed: base seed of the ensemble members (default: the current torch seed); member ``r`` uses a seed
            derived from it and ``r``.
        bucket_mb: capacity of a flat communication buffer in MiB.
        num_threads: torch threads per rank. Default: ``OMP_NUM_THREADS`` if set, else the cores this rank may
            use divided by the ranks sharing them.
        timeout: seconds any collective may take before the job is reported as stalled and aborted
            (``None`` or ``0``: wait forever). The job's communicator is shared by all strategies of a process: the
            strategy that sets up last decides.
        on_nonfinite: what to do when any rank's gradients hold NaN or inf after backward: ``"ignore"`` (the
            default; e.g. AMP's gradient scaler handles them), ``"skip"`` (every rank drops this step's
            gradients, so the optimizer does not move; listed in ``skipped_steps``) or ``"raise"``
            (``FloatingPointError`` on every rank). The decision is the same on every rank.
        fast_tensor_batches: serve the training batches of a plain ``DataLoader`` over a ``TensorDataset`` by
            indexing the tensors (identical batches, without per-sample fetching and collation).
        communicator: the :class:`~lightning_mpi.comm.Communicator` to use (default: all ranks of the job).
    """

    strategy_name = "mpi"

    def __init__(
        self,
        sync: str = "allreduce",
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        warmup_steps: int = 0,
        average_optimizer_state: bool = False,
        voting: str | None = None,
        seed: int | None = None,
        bucket_mb: float = DEFAULT_BUCKET_MB,
        num_threads: int | None = None,
        timeout: float | None = 600.0,
        on_nonfinite: str = "ignore",
        fast_tensor_batches: bool = True,
        communicator: Communicator | None = None,
        accelerator: Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        self._policy = _make_policy(
            sync, every_n_steps, every_n_epochs, warmup_steps, average_optimizer_state, voting, seed, bucket_mb
        )
        self._timeout = validate_timeout(timeout)
        factory: Callable[[], Communicator] = (lambda: communicator) if communicator else (lambda: world(self._timeout))
        super().__init__(
            accelerator=accelerator,
            cluster_environment=MPICommEnvironment(factory),
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        if on_nonfinite not in ("ignore", "skip", "raise"):
            raise ValueError(f"on_nonfinite={on_nonfinite!r} is not known: choose 'ignore', 'skip' or 'raise'.")
        self._on_nonfinite = on_nonfinite
        #: global steps whose gradients were dropped because some rank's were not finite (``on_nonfinite="skip"``)
        self.skipped_steps: list[int] = []
        self._num_threads = num_threads
        self._fast_tensor_batches = fast_tensor_batches
        self._num_nodes = 1
        self._sync_gradients = True
        self._sigterm_pending = False
        self._batches_seen = 0
        self._evaluation: ExitStack | None = None
        self._uneven: UnevenInputs | None = None
        #: payload bytes this rank sent in collectives during each training epoch (see ``sync="average"``)
        self.bytes_per_epoch: list[int] = []
        self._bytes_at_epoch_start: int | None = None

    # -- ranks and devices ---------------------------------------------------------------------------------

    @property
    def comm(self) -> Communicator:
        assert isinstance(self.cluster_environment, MPICommEnvironment)
        return self.cluster_environment.communicator

    @property
    def policy(self) -> SyncPolicy:
        """The object that decides how ranks are combined (gradient allreduce, averaging or ensemble)."""
        return self._policy

    @property
    def member_outputs(self) -> Any:
        """Under ``sync="ensemble"``: every member's output of the last evaluation forward, ``[members, batch, ...]``
        (the same on every rank; the same structure as ``forward``'s output if that is a tuple or dict); ``None``
        otherwise."""
        return getattr(self._policy, "member_outputs", None)

    @property
    def is_distributed(self) -> bool:
        """Lightning injects distributed samplers and honours ``sync_dist`` only if this is true.

        A single rank is not distributed: it then behaves exactly like a single-device Trainer. Neither is an
        ensemble's evaluation: every rank sees every sample and the same combined outputs, so samplers are left
        alone and logged values and metrics must not be reduced again (sums would count N times).
        """
        return self.world_size > 1 and not (self._policy.evaluates_all_samples and self._evaluating())

    def _evaluating(self) -> bool:
        module = self.lightning_module
        trainer = module._trainer if module is not None else None
        return trainer is not None and trainer.state.stage not in (None, RunningStage.TRAINING)

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        device = self.parallel_devices[0]
        if device.type == "cuda":
            return torch.device("cuda", self.local_rank % max(1, torch.cuda.device_count()))
        return torch.device("cpu")

    @property
    def _comm_ready(self) -> bool:
        assert isinstance(self.cluster_environment, MPICommEnvironment)
        return self.cluster_environment.ready

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def set_world_ranks(self) -> None:
        """Tell Lightning's rank-zero utilities who is rank 0 (no MPI call: the launcher's variables suffice)."""
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    @override
    def setup_environment(self) -> None:
        check_launch(self.parallel_devices or [], self.num_nodes, self.comm)
        self.comm.set_timeout(self._timeout)  # the job's communicator is shared: the strategy in use decides
        self.set_world_ranks()
        abort_on_uncaught_exceptions(self.comm)
        # Lightning warns that evaluation samplers pad and duplicate samples; ours do not (process_dataloader).
        warnings.filterwarnings("ignore", message="Using `DistributedSampler` with the dataloaders")
        threads = choose_threads(self._num_threads, self.comm.local_size)
        torch.set_num_threads(threads.count)
        _announce_once(
            f"lightning-mpi: {self.comm.size} rank(s) on {self.comm.num_nodes} node(s), sync={self._policy.name}, {threads.count} torch thread(s) per rank ({threads.reason})"
        )
        super().setup_environment()

    @override
    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        """On CPU, batches are where they must be: skip Lightning's walk over the batch unless a hook wants it."""
        if (device or self.root_device).type == "cpu" and not self._batch_hooks_overridden():
            return batch
        return super().batch_to_device(batch, device, dataloader_idx)

    def _batch_hooks_overridden(self) -> bool:
        module = self.lightning_module
        datamodule = getattr(module._trainer, "datamodule", None) if module is not None and module._trainer else None
        return not all(
            _is_lightning_default(owner, parent, hook)
            for owner, parent in ((module, LightningModule), (datamodule, LightningDataModule))
            if owner is not None
            for hook in ("transfer_batch_to_device", "on_after_batch_transfer")
        )

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    # -- setup and teardown ------------------------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        assert self.lightning_module is not None
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and self._policy.identical_replicas:
            check_replicas_match(self.comm, self.lightning_module, self.optimizers)
        self._policy.setup(self.comm, self.lightning_module, fitting=fitting, resuming=trainer.ckpt_path is not None)
        self._uneven = UnevenInputs(self.comm)
        sync_metrics(self.lightning_module, self.comm, lambda: self.is_distributed)
        if not any(isinstance(cb, AbortOnFailure) for cb in trainer.callbacks):
            trainer.callbacks.insert(0, AbortOnFailure(self.comm))

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """Evaluation and prediction get unpadded contiguous shards (or, for an ensemble, every sample)."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        stage = trainer.state.stage if trainer is not None else None
        if stage == RunningStage.TRAINING:
            if self._fast_tensor_batches and TensorBatches.applies_to(dataloader):
                dataloader = TensorBatches(dataloader)  # type: ignore[arg-type]
            if self.world_size > 1 and self._uneven is not None and not _takes_dataloader_iter(self.lightning_module):
                dataloader = JoinedBatches(dataloader, self.comm, self._uneven)
            return dataloader
        if stage is None or not trainer._accelerator_connector.use_distributed_sampler:
            return dataloader
        replicas = 1 if self._policy.evaluates_all_samples else self.world_size
        return shard_evaluation_dataloader(dataloader, replicas, self.global_rank if replicas > 1 else 0)

    # -- communication for Lightning ---------------------------------------------------------------------

    @override
    def reduce(
        self, tensor: Tensor | Any, group: Any | None = None, reduce_op: ReduceOp | str | None = "mean"
    ) -> Tensor | Any:
        """Reduce ``tensor`` over all ranks; integer tensors averaged with ``"mean"`` come back as floats."""
        if not isinstance(tensor, Tensor):
            return tensor
        op = _reduce_op_name(reduce_op)
        out = tensor.detach().clone()
        if op == "mean" and not out.is_floating_point():
            out = out.double()
        return self.comm.allreduce_(out, op)

    @override
    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        """Stack every rank's tensor along a new first dimension (shapes must match, as under DDP)."""
        if sync_grads:
            raise NotImplementedError("MPIStrategy.all_gather does not propagate gradients (sync_grads=True).")
        return torch.stack(self.comm.allgather(tensor.detach()))

    @override
    def barrier(self, name: str | None = None) -> None:
        self.comm.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return self.comm.broadcast_object(obj, src)

    # -- gradients and steps -----------------------------------------------------------------------------

    @contextmanager
    @override
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Skip the gradient allreduce on micro-batches that do not step (gradient accumulation)."""
        previous, self._sync_gradients = self._sync_gradients, False
        try:
            yield None
        finally:
            self._sync_gradients = previous

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self.lightning_module is not None and self._uneven is not None
        status = self._uneven.current
        self._policy.before_training_step(
            self.lightning_module, synchronised=self._sync_gradients, source=status.source if status else 0
        )
        if self._uneven.joined:  # no batch of its own: step with the others, contributing nothing
            return torch.zeros((), device=self.root_device, requires_grad=True)
        return super().training_step(*args, **kwargs)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        # Reduce between the precision plugin's backward and post_backward so that on_after_backward, gradient
        # clipping and AMP unscaling all see averaged gradients.
        self.pre_backward(closure_loss)
        assert self.lightning_module is not None and self._uneven is not None
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        self._policy.before_backward(self.lightning_module)
        self._uneven.count_backward()
        if not self._uneven.joined:
            scale = self._policy.loss_scale  # the policy's gradient reduction then needs no division
            scaled = closure_loss * scale if scale != 1.0 else closure_loss
            self.precision_plugin.backward(scaled, self.lightning_module, optimizer, *args, **kwargs)
        if self._sync_gradients:
            self._policy.after_backward(self.lightning_module, weight=self._uneven.gradient_weight())
        if self._sync_gradients and self._on_nonfinite != "ignore":
            self._handle_nonfinite()
        closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        self.post_backward(closure_loss)
        return closure_loss

    def _handle_nonfinite(self) -> None:
        module = self.lightning_module
        assert module is not None
        if self._policy.gradients_finite(module):
            return
        step = module.trainer.global_step
        if self._on_nonfinite == "raise":
            raise FloatingPointError(f"Non-finite gradients at global step {step} on at least one rank.")
        module.zero_grad(set_to_none=True)
        self.skipped_steps.append(step)
        rank_zero_info(f"lightning-mpi: non-finite gradients at global step {step}; every rank skips this step.")

    @override
    def optimizer_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], model: LightningModule | Module | None = None, **kwargs: Any
    ) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.optimizers and _unwrap(optimizer) is _unwrap(self.optimizers[0]):
            self._policy.after_optimizer_step(self.lightning_module, self.optimizers)
        return output

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        trainer = self.lightning_module.trainer
        self.comm.context = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
        assert self._uneven is not None
        status = self._uneven.next_step(self.lightning_module.automatic_optimization)
        self.comm.require_same_calls(_uneven_calls_reason(status) if status is not None and status.uneven else None)
        if self._policy.agree_on_stop(self._sigterm_pending, self._batches_seen):
            # Lightning raises SIGTERMException at the end of this batch, on every rank alike.
            trainer._signal_connector.received_sigterm = True
        self._batches_seen += 1
        if batch_idx == 0:
            self._policy.on_train_epoch_start(self.lightning_module, self.optimizers, trainer.current_epoch)
            self._close_epoch_bytes()
            self._bytes_at_epoch_start = self.comm.bytes_sent()

    @override
    def on_train_start(self) -> None:
        # Lightning reacts to SIGTERM where it arrives and shares it through torch.distributed only: the signalled
        # rank would leave alone. Keep the signal to ourselves until all ranks agree (see SyncPolicy.agree_on_stop).
        self._sigterm_pending = False
        self._batches_seen = 0
        if self.comm.size > 1 and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._note_sigterm)

    def _note_sigterm(self, signum: int, frame: Any) -> None:
        print(f"[lightning-mpi] rank {self.global_rank} received SIGTERM: every rank stops after the same batch soon",
              file=sys.stderr, flush=True)
        self._sigterm_pending = True

    def _close_epoch_bytes(self) -> None:
        if self._bytes_at_epoch_start is not None:
            self.bytes_per_epoch.append(self.comm.bytes_sent() - self._bytes_at_epoch_start)
            self._bytes_at_epoch_start = None

    @override
    def on_train_end(self) -> None:
        self.comm.require_same_calls(None)
        self._policy.on_train_end(self.lightning_module, self.optimizers)
        self._close_epoch_bytes()

    # -- evaluation ----------------------------------------------------------------------------------------

    def _enter_evaluation(self) -> None:
        assert self.lightning_module is not None
        self.comm.require_same_calls(None)  # evaluation runs in lockstep, also after uneven training batches
        sync_metrics(self.lightning_module, self.comm, lambda: self.is_distributed)
        self._evaluation = ExitStack()
        self._evaluation.enter_context(self._policy.evaluation(self.lightning_module))

    def _exit_evaluation(self) -> None:
        if self._evaluation is not None:
            evaluation, self._evaluation = self._evaluation, None
            evaluation.close()

    @override
    def on_validation_start(self) -> None:
        self._enter_evaluation()

    @override
    def on_validation_end(self) -> None:
        self._exit_evaluation()

    @override
    def on_test_start(self) -> None:
        self._enter_evaluation()

    @override
    def on_test_end(self) -> None:
        self._exit_evaluation()

    @override
    def on_predict_start(self) -> None:
        self._enter_evaluation()

    @override
    def on_predict_end(self) -> None:
        self._exit_evaluation()
        trainer = self.lightning_module.trainer
        if not self._policy.evaluates_all_samples and self.world_size > 1:
            ckpt.gather_predictions(trainer.predict_loop, self.comm)

    # -- checkpoints -----------------------------------------------------------------------------------------

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        assert self.lightning_module is not None
        return self._policy.model_state_dict(self.lightning_module)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Write once (rank 0); local files of the default IO atomically; an ensemble checkpoint holds every member."""
        assert self.lightning_module is not None
        extra = ckpt.strategy_state(self._policy, self.comm, self.lightning_module, checkpoint.get("optimizer_states", []))
        if self.is_global_zero:  # a new dict: callbacks' on_save_checkpoint saw the dict they were given
            ckpt.save(self.checkpoint_io, {**checkpoint, "lightning_mpi": extra}, filepath, storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        state = checkpoint.get("lightning_mpi", {})
        self._policy.load_state_dict(state.get("policy", {}))
        if self._policy.restores_rank_states(fitting=self._fitting()):
            ckpt.restore_rank_state(checkpoint, self.global_rank, self.world_size)
        return checkpoint

    def _fitting(self) -> bool:
        module = self.lightning_module
        trainer = module._trainer if module is not None else None
        return trainer is not None and trainer.state.fn == TrainerFn.FITTING

    # -- failures ------------------------------------------------------------------------------------------

    @override
    def on_exception(self, exception: BaseException) -> None:
        """Let the exception propagate if every rank failed; otherwise end the whole job (a rank that leaves alone
        would leave the others waiting forever)."""
        # Usually AbortOnFailure decided already; this covers failures before setup() installed it.
        if self._comm_ready:
            end_job_unless_every_rank_failed(self.comm, exception)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="Data-parallel training over MPI (mpi4py)", override=True
        )


def _make_policy(
    sync: str,
    every_n_steps: int | None,
    every_n_epochs: int | None,
    warmup_steps: int,
    average_optimizer_state: bool,
    voting: str | None,
    seed: int | None,
    bucket_mb: float,
) -> SyncPolicy:
    averaging_options = every_n_steps is not None or every_n_epochs is not None or warmup_steps or average_optimizer_state
    if sync != "average" and averaging_options:
        raise ValueError(
            "every_n_steps, every_n_epochs, warmup_steps and average_optimizer_state only apply to "
            f"MPIStrategy(sync='average', ...), not sync={sync!r}."
        )
    if sync != "ensemble" and voting is not None:
        raise ValueError(f"voting={voting!r} only applies to MPIStrategy(sync='ensemble'), not sync={sync!r}.")
    if sync == "allreduce":
        return GradientAllreduce(bucket_mb)
    if sync == "average":
        return ParameterAveraging(every_n_steps, every_n_epochs, warmup_steps, average_optimizer_state, bucket_mb)
    if sync == "ensemble":
        return Ensemble(voting or "hard", seed)
    raise ValueError(f"sync={sync!r} is not known: choose 'allreduce', 'average' or 'ensemble'.")


def _reduce_op_name(reduce_op: ReduceOp | str | None) -> str:
    if reduce_op is None:
        return "mean"
    if isinstance(reduce_op, str):
        key = reduce_op.lower()
    else:
        key = {ReduceOp.SUM: "sum", ReduceOp.MAX: "max", ReduceOp.MIN: "min"}.get(reduce_op, "")
        if getattr(ReduceOp, "AVG", None) is not None and reduce_op == ReduceOp.AVG:
            key = "mean"
    if key not in _REDUCE_OPS:
        raise ValueError(f"MPIStrategy.reduce does not support reduce_op={reduce_op!r}: use mean, sum, max or min.")
    return _REDUCE_OPS[key]


def _takes_dataloader_iter(module: LightningModule | None) -> bool:
    """``training_step(dataloader_iter)`` pulls its own batches: there is no batch per step to bridge."""
    return module is not None and is_param_in_hook_signature(module.training_step, "dataloader_iter", explicit=True)


def _uneven_calls_reason(status: StepStatus) -> str:
    joined = [r for r, active in enumerate(status.active) if not active]
    training = [r for r, active in enumerate(status.active) if active]
    return (
        f"Uneven inputs: ranks {joined} have run out of training batches and step on with the others without running "
        f"training_step, while ranks {training} still train. A collective inside training_step (self.log(..., "
        "on_step=True, sync_dist=True), self.all_gather, a metric's compute) cannot be answered by the ranks without "
        "data. Give every rank the same number of batches, or keep per-step collectives out of training_step (for "
        "example log with on_step=False, on_epoch=True)."
    )


def _is_lightning_default(owner: object, parent: type, hook: str) -> bool:
    """Whether ``owner.hook`` is Lightning's own default: not overridden in a subclass, nor replaced or wrapped on
    the instance (a ``Mock``, a ``partial``), which ``is_overridden`` would not notice."""
    return getattr(getattr(owner, hook, None), "__func__", None) is getattr(parent, hook)


def _unwrap(optimizer: Any) -> Any:
    return getattr(optimizer, "_optimizer", optimizer)


_ANNOUNCED: set[str] = set()


def _announce_once(message: str) -> None:
    """Rank 0 prints ``message`` the first time only (fit, test and predict each set the environment up)."""
    if message not in _ANNOUNCED:
        _ANNOUNCED.add(message)
        rank_zero_info(message)
