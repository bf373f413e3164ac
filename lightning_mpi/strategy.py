"""MPIStrategy: data-parallel Lightning training over MPI (mpi4py); torch.distributed runs over MPI beside it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import ReduceOp
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.layer_sync import LayerSync
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_mpi import _lightning, distributed
from lightning_mpi import checkpoint as ckpt
from lightning_mpi._autograd import during_next_backward
from lightning_mpi.batching import TensorBatches
from lightning_mpi.checks import check_launch, check_replicas_match
from lightning_mpi.comm import Communicator, TrafficMeter, validate_timeout, world
from lightning_mpi.console import announce_once
from lightning_mpi.environment import MPICommEnvironment, given
from lightning_mpi.evaluation import Evaluation, distributed_flag
from lightning_mpi.failure import DecideOnFailure, abort_on_uncaught_exceptions, end_job_unless_every_rank_failed
from lightning_mpi.join import UnevenInputs
from lightning_mpi.metrics import reduce_logged, sync_metrics
from lightning_mpi.nonfinite import NonFiniteGradients
from lightning_mpi.policies import SyncPolicy, make_policy
from lightning_mpi.signals import StopAgreement
from lightning_mpi.sync_batchnorm import layer_sync_for
from lightning_mpi.threads import choose_threads


class MPIStrategy(ParallelStrategy):
    """Train one model replica per MPI rank; launch with ``mpirun -n N python train.py`` (or ``srun``).

    Args:
        sync: ``"allreduce"`` (:class:`~lightning_mpi.policies.GradientAllreduce`), ``"average"`` (local SGD and
            DiLoCo: :class:`~lightning_mpi.policies.ParameterAveraging`), ``"ensemble"``
            (:class:`~lightning_mpi.policies.Ensemble`), or a policy object.
        **options: the options of the mode ``sync`` names, documented by its class; one of another mode is refused.
        num_threads: torch threads per rank (default: ``OMP_NUM_THREADS``, else this rank's share of its cores).
        timeout: seconds a collective may take before the job is reported as stalled and aborted (``None`` or
            ``0``: never); the job's communicator is shared: the strategy that sets up last decides.
        on_nonfinite: when any rank's gradients hold NaN or inf after backward: ``"ignore"``, ``"skip"`` or
            ``"raise"``, the same decision on every rank (see :class:`~lightning_mpi.nonfinite.NonFiniteGradients`).
        fast_tensor_batches: serve the training batches of a plain ``DataLoader`` over a ``TensorDataset`` by
            indexing the tensors (identical batches, without per-sample fetching and collation).
        communicator: the :class:`~lightning_mpi.comm.Communicator` to use (default: all ranks of the job).
    """

    strategy_name = "mpi"

    def __init__(
        self,
        sync: str | SyncPolicy = "allreduce",
        *,
        num_threads: int | None = None,
        timeout: float | None = 600.0,
        on_nonfinite: str = "ignore",
        fast_tensor_batches: bool = True,
        communicator: Communicator | None = None,
        accelerator: Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        **options: Any,
    ) -> None:
        self._policy = make_policy(sync, options)
        self._timeout = validate_timeout(timeout)
        # Picklable (a Trainer, its loggers and callbacks pickle as under DDP): no lambdas held.
        factory: Callable[[], Communicator] = (
            functools.partial(given, communicator) if communicator else functools.partial(world, self._timeout)
        )
        super().__init__(
            accelerator=accelerator,
            cluster_environment=MPICommEnvironment(factory),
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self._nonfinite = NonFiniteGradients(on_nonfinite)
        self._num_threads = num_threads
        self._fast_tensor_batches = fast_tensor_batches
        self._num_nodes = 1
        self._sync_gradients = True
        self._traffic = TrafficMeter()
        # Created with the communicator, in setup_environment: building the strategy must not initialise MPI.
        self._stop: StopAgreement | None = None
        self._uneven: UnevenInputs | None = None
        self._evaluation = Evaluation()
        # Lightning's accelerator connector sets this from Trainer(sync_batchnorm=True) (TorchSyncBatchNorm, which
        # refuses CPU tensors): setup uses MPISyncBatchNorm instead, on every device.
        self._layer_sync: LayerSync | None = None

    # -- what users read -----------------------------------------------------------------------------------

    @property
    def comm(self) -> Communicator:
        """The communicator over the job's ranks (creating it initialises MPI under a launcher)."""
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
    def skipped_steps(self) -> list[int]:
        """Global steps whose gradients were dropped because some rank's were not finite (``on_nonfinite="skip"``)."""
        return self._nonfinite.skipped_steps

    @property
    def bytes_per_epoch(self) -> list[int]:
        """Payload bytes this rank sent in collectives during each training epoch (see ``sync="average"``)."""
        return self._traffic.per_epoch

    @property
    def _module(self) -> LightningModule:
        module = self.lightning_module
        assert module is not None, "MPIStrategy's hooks run with a LightningModule attached"
        return module

    # -- ranks and devices ---------------------------------------------------------------------------------

    @property
    def is_distributed(self) -> bool:
        """Lightning injects distributed samplers and honours ``sync_dist`` only if this is true.

        A single rank is not distributed: it then behaves exactly like a single-device Trainer. Neither is an
        ensemble's evaluation: every rank sees every sample and the same combined outputs, so samplers are left
        alone and logged values and metrics must not be reduced again (sums would count N times).
        """
        evaluating = _lightning.stage(self.lightning_module) not in (None, RunningStage.TRAINING)
        return self.world_size > 1 and not (self._policy.evaluates_all_samples and evaluating)

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
        if self.parallel_devices[0].type == "cuda":
            return torch.device("cuda", self.local_rank % max(1, torch.cuda.device_count()))
        return torch.device("cpu")

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Lightning's samplers shard (and pad) for training only; evaluation shards are ours (process_dataloader).
        if _lightning.stage(self.lightning_module) == RunningStage.TRAINING:
            return {"num_replicas": self.world_size, "rank": self.global_rank}
        return {"num_replicas": 1, "rank": 0}

    @override
    def setup_environment(self) -> None:
        comm = self.comm
        check_launch(self.parallel_devices or [], self.num_nodes, comm)
        self._stop, self._uneven = StopAgreement(comm), UnevenInputs(comm)
        _lightning.set_rank_zero(self.global_rank)
        abort_on_uncaught_exceptions(comm)
        threads = choose_threads(self._num_threads, comm.local_size)
        torch.set_num_threads(threads.number)
        if comm.size > 1:  # as DDP: PL_GLOBAL_SEED again, so random streams (dropout, torch.rand) match DDP's;
            reset_seed()  # one rank is a single-device Trainer, which does not re-seed
        # torch.distributed for everybody else (samplers, user collectives, torchmetrics, SyncBatchNorm); the
        # strategy's own traffic stays on its communicator.
        distributed.init_process_group(self._timeout)
        comm.set_timeout(self._timeout)  # the job's communicator is shared: the strategy in use decides
        announce_once(
            f"lightning-mpi: {comm.size} rank(s) on {comm.num_nodes} node(s), sync={self._policy.name}, "
            f"{threads.number} torch thread(s) per rank ({threads.reason})"
        )
        super().setup_environment()

    @override
    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        """On CPU, batches are where they must be: skip Lightning's walk over the batch unless a hook wants it."""
        if (device or self.root_device).type == "cpu" and _lightning.batch_hooks_are_lightnings(self._module):
            return batch
        return super().batch_to_device(batch, device, dataloader_idx)

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    # -- setup ---------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        module = self.lightning_module
        assert module is not None
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and self._layer_sync is not None:
            self._layer_sync = layer_sync_for(self._policy, self._layer_sync)
            assert self.model is not None
            self.model = self._layer_sync.apply(self.model)
        if fitting and self._policy.identical_replicas:
            check_replicas_match(self.comm, module, self.optimizers)
        self._policy.setup(self.comm, module, fitting=fitting, resuming=trainer.ckpt_path is not None)
        sync_metrics(module, self.comm, distributed_flag(self))

    @override
    def teardown(self) -> None:
        module = self.lightning_module
        trainer = _lightning.attached_trainer(module) if module is not None else None
        if self._layer_sync is not None and trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            assert self.model is not None
            self.model = self._layer_sync.revert(self.model)
        super().teardown()

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """Training: batches of tensor datasets by indexing, and every rank iterating in lockstep. Evaluation and
        prediction: each rank's share of the samples, as the policy decides."""
        trainer = _lightning.attached_trainer(self.lightning_module)
        if trainer is None or trainer.state.stage is None or self.world_size == 1:
            return dataloader  # one rank is a single-device Trainer: the user's loaders as they are
        if trainer.state.stage == RunningStage.TRAINING:
            if self._fast_tensor_batches and TensorBatches.applies_to(dataloader):
                dataloader = TensorBatches(dataloader)  # type: ignore[arg-type]
            # Loaders prepared before the strategy's setup (Lightning's own tests do) stay as they are.
            return self._uneven.loader(dataloader, self._module) if self._uneven is not None else dataloader
        return self._evaluation.loader(self._policy, trainer, dataloader)

    # -- communication for Lightning ---------------------------------------------------------------------

    @override
    def reduce(
        self, tensor: Tensor | Any, group: Any | None = None, reduce_op: ReduceOp | str | None = "mean"
    ) -> Tensor | Any:
        """Reduce ``tensor`` over all ranks; integer tensors averaged with ``"mean"`` come back as floats."""
        return reduce_logged(self.comm, tensor, reduce_op)

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

    # -- training steps --------------------------------------------------------------------------------------

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
    def on_train_start(self) -> None:
        assert self._stop is not None
        self._stop.start()

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        trainer = self._module.trainer
        assert self._stop is not None
        assert self._uneven is not None
        self.comm.context = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
        self._uneven.next_step(self._module.automatic_optimization)
        if self._stop.agreed(self._policy.flag_channel):
            _lightning.request_stop(trainer)  # Lightning stops at the end of this batch, on every rank alike
        if batch_idx == 0:
            self._policy.on_train_epoch_start(self._module, self.optimizers, trainer.current_epoch)
            self._traffic.start_epoch(self.comm)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self._uneven is not None
        self._policy.before_training_step(self._module, self._sync_gradients, self._uneven.source)
        if self._uneven.joined:  # no batch of its own: step with the others, contributing nothing
            return self._uneven.placeholder_loss(self.root_device)
        return super().training_step(*args, **kwargs)

    @override
    def pre_backward(self, closure_loss: Tensor) -> None:
        """Before every backward through the strategy. A synchronised backward ends with the policy's reduction,
        inside autograd (as DDP's), so that ``on_after_backward``, gradient clipping and AMP unscaling all see
        averaged gradients; the policy's loss scale spares that reduction a division."""
        module, uneven = self.lightning_module, self._uneven
        assert module is not None
        assert uneven is not None
        self._policy.before_backward(module, self._sync_gradients)
        uneven.count_backward()
        synchronise = self._synchronise_gradients if self._sync_gradients else None
        during_next_backward(closure_loss, self._policy.loss_scale, synchronise)

    def _synchronise_gradients(self) -> None:
        module, uneven = self.lightning_module, self._uneven
        assert module is not None
        assert uneven is not None
        self._policy.after_backward(module, weight=uneven.gradient_weight())
        self._nonfinite.check(self._policy, module)

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: LightningModule | Module | None = None,
        **kwargs: Any,
    ) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.optimizers and _lightning.unwrap_optimizer(optimizer) is _lightning.unwrap_optimizer(
            self.optimizers[0]
        ):
            self._policy.after_optimizer_step(self._module, self.optimizers)
        return output

    @override
    def on_train_end(self) -> None:
        assert self._uneven is not None
        self._uneven.stop_checking()
        self._policy.on_train_end(self._module, self.optimizers)
        self._traffic.end_epoch(self.comm)

    # -- evaluation ----------------------------------------------------------------------------------------

    def _enter_evaluation(self) -> None:
        assert self._uneven is not None
        self._uneven.stop_checking()
        self._evaluation.enter(self._policy, self._module, self.comm, distributed_flag(self))

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        self._policy.before_evaluation_step(self._module)
        return super().validation_step(*args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        self._policy.before_evaluation_step(self._module)
        return super().test_step(*args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        self._policy.before_evaluation_step(self._module)
        return super().predict_step(*args, **kwargs)

    @override
    def on_validation_start(self) -> None:
        self._enter_evaluation()

    @override
    def on_validation_end(self) -> None:
        self._evaluation.exit()

    @override
    def on_test_start(self) -> None:
        self._enter_evaluation()

    @override
    def on_test_end(self) -> None:
        self._evaluation.exit()

    @override
    def on_predict_start(self) -> None:
        self._enter_evaluation()

    @override
    def on_predict_end(self) -> None:
        self._evaluation.exit()
        self._evaluation.end_prediction(self._policy, self._module.trainer, self.world_size)

    # -- checkpoints -----------------------------------------------------------------------------------------

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        return self._policy.model_state_dict(self._module)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Collective: see :mod:`lightning_mpi.checkpoint` (one ordinary file by rank 0, each rank's own state
        beside it where ranks differ)."""
        ckpt.write(self.checkpoint_io, checkpoint, filepath, storage_options, self._policy, self.comm, self._module)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        trainer = _lightning.attached_trainer(self.lightning_module)
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        ckpt.restore(
            checkpoint, self._policy, self.checkpoint_io, self.global_rank, self.world_size, fitting, checkpoint_path
        )
        return checkpoint

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        super().remove_checkpoint(filepath)
        if self.is_global_zero:
            ckpt.remove_shards(filepath)

    # -- failures ------------------------------------------------------------------------------------------

    @override
    def on_exception(self, exception: BaseException) -> None:
        """Let the exception propagate if every rank failed; otherwise end the whole job (a rank that leaves alone
        would leave the others waiting forever)."""
        assert isinstance(self.cluster_environment, MPICommEnvironment)
        if self.cluster_environment.ready:  # usually the launcher decided already (then this returns at once)
            end_job_unless_every_rank_failed(self.comm, exception)

    @override
    def _configure_launcher(self) -> None:
        assert isinstance(self.cluster_environment, MPICommEnvironment)
        self._launcher = DecideOnFailure(self.cluster_environment.ready_communicator)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="Data-parallel training over MPI (mpi4py)", override=True
        )
