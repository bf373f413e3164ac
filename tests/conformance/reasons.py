"""Why each selected Lightning test that passes with the default strategy does not pass under 2 MPI ranks.

Matched against test ids (regular expressions, first match wins); the report shows the reason next to the test
and marks any failure that has none, so that a new one cannot hide among the known ones.
"""

from __future__ import annotations

import re

RANK_ZERO_WARNING = "Lightning warns on rank 0 only (rank_zero_warn); the test expects the warning on every rank."
DIVERGED = (
    " Rank 1 then leaves the test while rank 0 goes on to its next collective and waits for rank 1: the stall detector "
    "ends the job, as it must."
)

# -- the wider selection (November 2026 run of 1,918 tests); the report shows DDP's outcome beside each -------------

RANK_ZERO_MESSAGE = (
    "Lightning prints this message or gives this warning on rank 0 only (rank_zero_info / rank_zero_warn, also "
    "ModelPruning's and the Timer's messages); the test looks for it on every rank."
)
LOGGER_ON_RANK_ZERO = (
    "Lightning's loggers act on rank 0 only (log_metrics, log_hyperparams, save and finalize are rank_zero_only, "
    "the experiment is rank_zero_experiment, the version and directories are made by rank 0); the test inspects the "
    "logger's calls, files or version on every rank."
)
DTYPE_LEFT_BY_AN_EARLIER_TEST = (
    "core/test_metric_result_integration.py::test_metric_result_respects_dtype fails on rank 1 (it expects a warning "
    "Lightning gives on rank 0) before it sets torch's default dtype back, so every later test builds float64 models "
    "on rank 1 and float32 ones on rank 0: MPIStrategy refuses replicas that differ (DDP fails these with the dtype "
    "mismatch too, or times out). The harness now resets the default dtype after each test."
)
TUNER_REFUSES_DISTRIBUTED = (
    "Lightning's tuner refuses distributed strategies ('Tuning the batch size is currently not supported with "
    "distributed strategies', the BatchSizeFinder callback likewise), and the learning-rate finder's suggestion "
    "comes from each rank's half of the data."
)
HARNESS_REPLACED_THE_STRATEGY = (
    "The test checks which strategy, launcher or sampler Lightning's connectors choose for the arguments it gives; "
    "the harness replaced that choice with MPIStrategy (the harness's own artifact)."
)
HALF_THE_BATCHES_PER_RANK = (
    "Each of 2 ranks takes half the data (Lightning's distributed sampler), so counts of batches, steps, updates or "
    "validation runs are half of one process's (or a time-based trigger fires at other batches)."
)
NONE_FROM_TRAINING_STEP = (
    "Lightning refuses a training_step that returns None with every distributed strategy ('Skipping the "
    "training_step by returning None in distributed training is not supported')."
)
DISTRIBUTED_SAMPLER_INJECTED = (
    "Lightning injects a DistributedSampler for distributed strategies; the test checks for one process's "
    "SequentialSampler."
)

REASONS: list[tuple[str, str]] = [
    # -- the wider selection: tests of their own -------------------------------------------------------------------
    (r"callbacks/test_pruning\.py::test_sparsity_calculation", RANK_ZERO_MESSAGE),
    (
        r"core/test_metric_result_integration\.py::(test_metric_result_dtype_promotion"
        r"|test_metric_result_precision_no_lower_than_float32)|models/test_hparams\.py::test_adding_datamodule_hparams",
        DTYPE_LEFT_BY_AN_EARLIER_TEST,
    ),
    (r"trainer/flags/test_val_check_interval\.py::test_time_and_epoch_gated_val_check", HALF_THE_BATCHES_PER_RANK),
    (
        r"trainer/connectors/test_checkpoint_connector\.py::test_ckpt_for_fsspec",
        "The test's memory:// filesystem lives in each process: rank 1 does not see the file rank 0 wrote.",
    ),
    (
        r"trainer/connectors/test_data_connector\.py::test_replace_distributed_sampler",
        (
            "MPIStrategy evaluates on shards of its own (contiguous, unpadded, the same number of batches on every "
            "rank: lightning_mpi.sampling) where DDP uses a padded DistributedSampler, which repeats samples and "
            "biases metrics; the test checks for DDP's sampler types. A deliberate difference (docs: evaluation)."
        ),
    ),
    (
        r"trainer/connectors/test_data_connector\.py::test_dataloader_persistent_workers_performance_warning",
        "The warning is about 'ddp_spawn' start-up costs, which do not exist under an MPI launcher; rank 0 alone "
        "fails the test's assertion between collectives, and the failure ends the job.",
    ),
    (
        r"core/test_datamodules\.py::test_datamodule_hooks_are_profiled",
        "prepare_data runs on rank 0 only (Lightning's rule for several processes), so rank 1's profiler has no "
        "record of it; rank 1 then leaves the test while rank 0 waits at Lightning's prepare_data barrier, which has "
        "no time limit by design: the harness ends the job.",
    ),
    (r"test_fx_validator_integration", RANK_ZERO_WARNING + DIVERGED),
    (
        (
            r"test_logged_metrics_has_logged_epoch_value|test_warn_if_model_has_overridden_optimization_hooks"
            r"|test_lr_schedulers_reduce_lr_on_plateau|test_onecyclelr_with_epoch_interval_warns|test_none_optimizer"
            r"|test_lr_scheduler_strict|test_optimizer_config_dict_with_extra_keys_warns"
            r"|test_multiple_optimizer_config_dicts_with_extra_keys_warns|test_lr_scheduler_with_extra_keys_warns"
        ),
        RANK_ZERO_WARNING,
    ),
    (
        r"test_logging_sync_dist_true|test_progress_bar_metrics_contains_values_on_train_epoch_end",
        (
            "reduce_fx='sum' with sync_dist sums the values of both ranks (as DDP does); the test expects one "
            "process's "
            "value."
        ),
    ),
    (
        r"test_model_checkpoint_score_and_ckpt",
        (
            "Rank 1 looks for a checkpoint named after its own, unsynchronised metric; rank 0 names and writes "
            "the file, "
            "as under DDP."
        ),
    ),
    (
        r"test_model_checkpoint_to_yaml|test_model_checkpoint_link_checkpoint|test_model_checkpoint_save_last\[link\]",
        (
            "Both ranks write the same file of the shared tmp_path (the test calls it on every rank): two "
            "writers race, as "
            "under DDP."
        ),
    ),
    (
        r"test_ckpt_every_n_train_steps|test_model_checkpoint_train_time_interval",
        (
            "Each of 2 ranks takes half the data, so an epoch has half the steps and step- or time-based "
            "checkpoints are "
            "fewer than in one process."
        ),
    ),
    (
        r"test_model_checkpoint_on_exception_parametrized\[TroubledModelInTrainingStep\]",
        (
            "With several processes Lightning itself raises 'Skipping the training_step by returning None in "
            "distributed "
            "training is not supported' before the exception the test expects."
        ),
    ),
    (
        r"test_trainer_save_checkpoint_storage_options",
        "The test asserts on every rank that the checkpoint IO was called; only rank 0 writes, as under DDP."
        + DIVERGED,
    ),
    (
        r"test_default_checkpoint_freq|test_top_k",
        "Only rank 0 saves checkpoints (as under DDP); the test counts torch.save calls on every rank.",
    ),
    (
        r"test_resume_early_stopping_from_checkpoint",
        "The checkpoint holds rank 0's EarlyStopping state, computed from its own unsynchronised train_loss; rank 1 "
        "compares it with its own state." + DIVERGED,
    ),
    (
        r"test_trainer_datamodule_hook_system",
        "prepare_data runs on local rank 0 only (Lightning's rule for every strategy of several processes); rank 1's "
        "recorded hooks lack it." + DIVERGED,
    ),
    (
        r"models/test_hooks.py::test_trainer_model_hook_system",
        (
            "prepare_data runs on local rank 0 only (Lightning's rule for every strategy of several "
            "processes); rank 1's "
            "recorded hook order lacks it (rank 0 passes)."
        ),
    ),
    (
        r"test_hooks_with_different_argument_names|test_prediction_loop_stores_predictions"
        r"|test_prediction_writer_hook_call_intervals",
        (
            "trainer.predict returns every rank's predictions once, in dataset order, as README promises (with "
            "limit_predict_batches=L: one process's first L x world batches); the test expects one rank's L "
            "batches (DDP "
            "returns each rank's own). Prediction writers receive their rank's share, as under DDP."
        ),
    ),
    (
        r"test_prediction_writer_batch_indices|test_batch_level_batch_indices|test_evaluation_loop_sampler_set_epoch_called",
        "DDP over gloo fails it too at world size 2 (mocks that count calls on one rank).",
    ),
]

#: Tests that pass with a single-device Trainer and not with MPIStrategy at world size 1, and why that is right.
WORLD_SIZE_ONE: list[tuple[str, str]] = [
    (
        r"test_replace_distributed_sampler|test_prediction_loop_batch_sampler_set_epoch_called\[True\]",
        (
            "The test asks for strategy='ddp' with devices=1 and checks for DDP's DistributedSampler(num_replicas=1); "
            "MPIStrategy in one process leaves the loader as a single-device Trainer does (the same samples)."
        ),
    ),
    (
        r"test_dataloader_persistent_workers_performance_warning\[(1|2)\]",
        "The warning is about 'ddp_spawn' start-up costs, which do not exist under an MPI launcher.",
    ),
    (
        r"test_accelerator_connector.py::(test_interactive_compatible_strategy_ddp_fork|test_accelerator_cpu_with_devices"
        r"|test_ddp_fork_on_unsupported_platform|test_strategy_str_passed_being_case_insensitive"
        r"|test_connector_auto_selection)",
        (
            "The test checks which strategy (or launcher) Lightning's accelerator connector chooses for the "
            "arguments it "
            "gives; the harness replaced that choice with MPIStrategy, so the check cannot hold (the harness's own "
            "artifact, not a behaviour of the strategy)."
        ),
    ),
    (
        r"test_skip_training_step_not_allowed",
        (
            "The test assigns trainer.strategy.world_size; the world size of MPIStrategy (as of Lightning's "
            "ParallelStrategy, "
            "DDP included) comes from the launcher and cannot be set."
        ),
    ),
]


def reason_for(nodeid: str, world_size: int = 2) -> str | None:
    """The known reason why ``nodeid`` does not pass with MPIStrategy at ``world_size``, if any."""
    table = WORLD_SIZE_ONE if world_size == 1 else REASONS
    return next((text for pattern, text in table if re.search(pattern, nodeid)), None)
