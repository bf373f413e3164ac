"""MPIStrategy: data-parallel Lightning training over MPI (mpi4py); torch.distributed runs over MPI beside it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.types import ReduceOp
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.plugins.layer_sync import LayerSync
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_mpi import _lightning, distributed
from lightning_mpi import checkpoint as ckpt
from lightning_mpi._autograd import during_next_backward
from lightning_mpi.batching import TensorBatches
from lightning_mpi.checks import check_launch, check_replicas_match
from lightning_mpi.comm import Communicator, TrafficMeter, reduce_op_name, validate_timeout, world
from lightning_mpi.environment import MPICommEnvironment
from lightning_mpi.failure import DecideOnFailure, abort_on_uncaught_exceptions, end_job_unless_every_rank_failed
from lightning_mpi.join import UnevenInputs
from lightning_mpi.metrics import sync_metrics
from lightning_mpi.sampling import shard_layout
from lightning_mpi.nonfinite import NonFiniteGradients
from lightning_mpi.signals import StopAgreement
from lightning_mpi.sync import SyncPolicy, make_policy
from lightning_mpi.sync_batchnorm import MPISyncBatchNorm
from lightning_mpi.threads import choose_threads


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
        outer_optimizer: ``sync="average"`` as DiLoCo: a factory of the outer optimizer (e.g.
            ``functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)``; Hydra: ``_partial_``) that
            steps the averaged changes at every synchronisation (see :class:`~lightning_mpi.diloco.OuterStep`).
        pseudo_gradient_dtype: with ``outer_optimizer``: ``"bfloat16"`` or ``"float16"`` sends the changes in half
            precision (summed in float32).
        voting: ``"hard"`` (majority), ``"soft"`` (mean probability), ``"mean"`` or ``"median"`` (regression);
            only for ``sync="ensemble"``.
        seed: base seed of the ensemble members (default: the current torch seed); member ``r`` uses a seed
            derived from it and ``r``.
        bucket_mb: capacity of a flat communication buffer in MiB (default: 25 without overlap, 16 with it).
        overlap: reduce gradient buckets while backward goes on (``sync="allreduce"``); default: off, which
            measured faster (see :class:`~lightning_mpi.sync.GradientAllreduce`).
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
        bucket_mb: float | None = None,
        overlap: bool | None = None,
        outer_optimizer: Callable[[list[Tensor]], Optimizer] | None = None,
        pseudo_gradient_dtype: torch.dtype | str | None = None,
        num_threads: int | None = None,
        timeout: float | None = 600.0,
        on_nonfinite: str = "ignore",
        fast_tensor_batches: bool = True,
        communicator: Communicator | None = None,
        accelerator: Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        self._policy = make_policy(
            sync, every_n_steps, every_n_epochs, warmup_steps, average_optimizer_state, voting, seed, bucket_mb, overlap,
            outer_optimizer, pseudo_gradient_dtype,
        )
        self._timeout = validate_timeout(timeout)
        # Picklable (a Trainer, its loggers and callbacks pickle as under DDP): no lambdas held.
        factory: Callable[[], Communicator] = (
            functools.partial(_given, communicator) if communicator else functools.partial(world, self._timeout)
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
        self._evaluation: ExitStack | None = None
        # Lightning's accelerator connector sets this from Trainer(sync_batchnorm=True) (TorchSyncBatchNorm, which
        # refuses CPU tensors): setup uses MPISyncBatchNorm instead, on every device.
        self._layer_sync: LayerSync | None = None
        #: how each predict loader of the current predict was sharded (None: left to the user)
        self._prediction_layouts: list[str | None] = []

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

    # -- ranks and devices ---------------------------------------------------------------------------------

    @property
    def is_distributed(self) -> bool:
        """Lightning injects distributed samplers and honours ``sync_dist`` only if this is true.

        A single rank is not distributed: it then behaves exactly like a single-device Trainer. Neither is an
        ensemble's evaluation: every rank sees every sample and the same combined outputs, so samplers are left
        alone and logged values and metrics must not be reduced again (sums would count N times).
        """
        evaluating = self._stage() not in (None, RunningStage.TRAINING)
        return self.world_size > 1 and not (self._policy.evaluates_all_samples and evaluating)

    def _stage(self) -> RunningStage | None:
        trainer = _lightning.attached_trainer(self.lightning_module)
        return trainer.state.stage if trainer is not None else None

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
        if self._stage() == RunningStage.TRAINING:
            return {"num_replicas": self.world_size, "rank": self.global_rank}
        return {"num_replicas": 1, "rank": 0}

    def set_world_ranks(self) -> None:
        """Tell Lightning's rank-zero utilities who is rank 0 (no MPI call: the launcher's variables suffice)."""
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    @override
    def setup_environment(self) -> None:
        comm = self.comm
        check_launch(self.parallel_devices or [], self.num_nodes, comm)
        self._stop, self._uneven = StopAgreement(comm), UnevenInputs(comm)
        self.set_world_ranks()
        abort_on_uncaught_exceptions(comm)
        threads = choose_threads(self._num_threads, comm.local_size)
        torch.set_num_threads(threads.count)
        if comm.size > 1:  # as DDP: PL_GLOBAL_SEED again, so random streams (dropout, torch.rand) match DDP's;
            reset_seed()  # one rank is a single-device Trainer, which does not re-seed
        # torch.distributed for everybody else (samplers, user collectives, torchmetrics, SyncBatchNorm); the
        # strategy's own traffic stays on its communicator.
        distributed.init_process_group(self._timeout)
        comm.set_timeout(self._timeout)  # the job's communicator is shared: the strategy in use decides
        _announce_once(
            f"lightning-mpi: {comm.size} rank(s) on {comm.num_nodes} node(s), sync={self._policy.name}, "
            f"{threads.count} torch thread(s) per rank ({threads.reason})"
        )
        super().setup_environment()

    @override
    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        """On CPU, batches are where they must be: skip Lightning's walk over the batch unless a hook wants it."""
        if (device or self.root_device).type == "cpu" and self._batch_hooks_are_lightnings():
            return batch
        return super().batch_to_device(batch, device, dataloader_idx)

    def _batch_hooks_are_lightnings(self) -> bool:
        module = self.lightning_module
        trainer = _lightning.attached_trainer(module)
        owners = ((module, LightningModule), (trainer.datamodule if trainer else None, LightningDataModule))
        return all(
            _lightning.is_lightning_default(owner, parent, hook)
            for owner, parent in owners
            if owner is not None
            for hook in ("transfer_batch_to_device", "on_after_batch_transfer")
        )

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
            self._apply_layer_sync()
        if fitting and self._policy.identical_replicas:
            check_replicas_match(self.comm, module, self.optimizers)
        self._policy.setup(self.comm, module, fitting=fitting, resuming=trainer.ckpt_path is not None)
        sync_metrics(module, self.comm, functools.partial(getattr, self, "is_distributed"))

    def _apply_layer_sync(self) -> None:
        if self._policy.evaluates_all_samples:
            raise ValueError(
                f"Trainer(sync_batchnorm=True) does not apply to MPIStrategy(sync={self._policy.name!r}): every "
                "member normalises over its own data. Remove sync_batchnorm=True, or use sync='allreduce'."
            )
        if not isinstance(self._layer_sync, MPISyncBatchNorm):
            self._layer_sync = MPISyncBatchNorm()  # torch's SyncBatchNorm refuses CPU tensors
        assert self.model is not None
        self.model = self._layer_sync.apply(self.model)

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
            assert self._uneven is not None
            return self._uneven.loader(dataloader, self.lightning_module)
        processed = (self._policy.evaluation_loader(dataloader, _integer_evaluation_limit(trainer))
                     if _lightning.uses_distributed_sampler(trainer) else dataloader)
        if trainer.state.stage == RunningStage.PREDICTING:
            # Gathered at the end only where we sharded: a loader left to the user (iterable, own sampler) already
            # gives each rank what it should predict, as under DDP (gathering would repeat predictions N times).
            self._prediction_layouts.append(shard_layout(processed))
        return processed

    # -- communication for Lightning ---------------------------------------------------------------------

    @override
    def reduce(
        self, tensor: Tensor | Any, group: Any | None = None, reduce_op: ReduceOp | str | None = "mean"
    ) -> Tensor | Any:
        """Reduce ``tensor`` over all ranks; integer tensors averaged with ``"mean"`` come back as floats."""
        if not isinstance(tensor, Tensor):
            return tensor
        op = reduce_op_name(reduce_op)
        out = tensor.detach().clone()
        if op == "mean" and not out.is_floating_point():
            out = out.to(torch.get_default_dtype())  # Lightning's dtype for logged values
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
        trainer = self.lightning_module.trainer
        assert self._stop is not None and self._uneven is not None
        self.comm.context = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
        self._uneven.next_step(self.lightning_module.automatic_optimization)
        if self._stop.agreed(self._policy.flag_channel):
            _lightning.request_stop(trainer)  # Lightning stops at the end of this batch, on every rank alike
        if batch_idx == 0:
            self._policy.on_train_epoch_start(self.lightning_module, self.optimizers, trainer.current_epoch)
            self._traffic.start_epoch(self.comm)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self.lightning_module is not None and self._uneven is not None
        self._policy.before_training_step(self.lightning_module, self._sync_gradients, self._uneven.source)
        if self._uneven.joined:  # no batch of its own: step with the others, contributing nothing
            return self._uneven.placeholder_loss(self.root_device)
        return super().training_step(*args, **kwargs)

    @override
    def pre_backward(self, closure_loss: Tensor) -> None:
        """Before every backward through the strategy. A synchronised backward ends with the policy's reduction,
        inside autograd (as DDP's), so that ``on_after_backward``, gradient clipping and AMP unscaling all see
        averaged gradients; the policy's loss scale spares that reduction a division."""
        module, uneven = self.lightning_module, self._uneven
        assert module is not None and uneven is not None
        self._policy.before_backward(module, self._sync_gradients)
        uneven.count_backward()
        synchronise = self._synchronise_gradients if self._sync_gradients else None
        during_next_backward(closure_loss, self._policy.loss_scale, synchronise)

    def _synchronise_gradients(self) -> None:
        module, uneven = self.lightning_module, self._uneven
        assert module is not None and uneven is not None
        self._policy.after_backward(module, weight=uneven.gradient_weight())
        self._nonfinite.check(self._policy, module)

    @override
    def optimizer_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], model: LightningModule | Module | None = None, **kwargs: Any
    ) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.optimizers and _unwrap(optimizer) is _unwrap(self.optimizers[0]):
            self._policy.after_optimizer_step(self.lightning_module, self.optimizers)
        return output

    @override
    def on_train_end(self) -> None:
        assert self._uneven is not None
        self._uneven.stop_checking()
        self._policy.on_train_end(self.lightning_module, self.optimizers)
        self._traffic.end_epoch(self.comm)

    # -- evaluation ----------------------------------------------------------------------------------------

    def _enter_evaluation(self) -> None:
        assert self.lightning_module is not None and self._uneven is not None
        self._uneven.stop_checking()
        sync_metrics(self.lightning_module, self.comm, functools.partial(getattr, self, "is_distributed"))
        self._evaluation = ExitStack()
        self._evaluation.enter_context(self._policy.evaluation(self.lightning_module))

    def _exit_evaluation(self) -> None:
        if self._evaluation is not None:
            evaluation, self._evaluation = self._evaluation, None
            evaluation.close()

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        self._policy.before_evaluation_step(self.lightning_module)
        return super().validation_step(*args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        self._policy.before_evaluation_step(self.lightning_module)
        return super().test_step(*args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        self._policy.before_evaluation_step(self.lightning_module)
        return super().predict_step(*args, **kwargs)

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
        layouts, self._prediction_layouts = self._prediction_layouts, []
        if self.world_size > 1 and layouts and None not in layouts:
            predictions = _lightning.cached_predictions(self.lightning_module.trainer)
            self._policy.collect_predictions(predictions, interleaved="interleaved" in layouts)

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
            ckpt.save(self.checkpoint_io, {**checkpoint, "lightning_mpi": extra} if extra else checkpoint, filepath,
                      storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        stored = checkpoint.get("lightning_mpi", {})
        if stored.get("sync") == "ensemble" and self._policy.name != "ensemble":
            rank_zero_warn(
                f"{checkpoint_path} is an ensemble checkpoint of {len(stored.get('ranks', []))} member(s), loaded "
                f"under MPIStrategy(sync={self._policy.name!r}): the model is member 0 alone. Evaluate the ensemble "
                "with MPIStrategy(sync='ensemble') (any world size) or lightning_mpi.load_ensemble(path, MyModule)."
            )
        self._policy.load_state_dict(checkpoint.get("lightning_mpi", {}).get("policy", {}))
        trainer = _lightning.attached_trainer(self.lightning_module)
        if self._policy.restores_rank_states(fitting=trainer is not None and trainer.state.fn == TrainerFn.FITTING):
            ckpt.restore_rank_state(checkpoint, self.global_rank, self.world_size)
        return checkpoint

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
        self._launcher = DecideOnFailure(self._ready_communicator)

    def _ready_communicator(self) -> Communicator | None:
        assert isinstance(self.cluster_environment, MPICommEnvironment)
        return self.cluster_environment.communicator if self.cluster_environment.ready else None

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="Data-parallel training over MPI (mpi4py)", override=True
        )


def _given(communicator: Communicator) -> Communicator:
    return communicator


def _unwrap(optimizer: Any) -> Any:
    return getattr(optimizer, "_optimizer", optimizer)


_ANNOUNCED: set[str] = set()


def _announce_once(message: str) -> None:
    """Rank 0 prints ``message`` the first time only (fit, test and predict each set the environment up)."""
    if message not in _ANNOUNCED:
        _ANNOUNCED.add(message)
        rank_zero_info(message)


def _integer_evaluation_limit(trainer: Trainer) -> int | None:
    """The number of batches per rank that an integer ``limit_val_batches`` / ``limit_test_batches`` /
    ``limit_predict_batches`` allows in the current stage (``None``: no integer limit; fractions are left to
    Lightning). The sanity check
    prepares the validation loader that fit's validation then reuses."""
    limit = {
        RunningStage.SANITY_CHECKING: trainer.limit_val_batches,
        RunningStage.VALIDATING: trainer.limit_val_batches,
        RunningStage.TESTING: trainer.limit_test_batches,
        RunningStage.PREDICTING: trainer.limit_predict_batches,
    }.get(trainer.state.stage)  # type: ignore[arg-type]
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None
