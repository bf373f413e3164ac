"""Why each selected Lightning test that passes with the default strategy does not pass under 2 MPI ranks.

Matched against test ids (regular expressions, first match wins); the report shows the reason next to the test
and marks any failure that has none, so that a new one cannot hide among the known ones.
"""

from __future__ import annotations

import re

BEFORE_SETUP = (
    " Where DDP passes, it happens before the strategy's setup: DDP tells Lightning the rank only at setup, so its "
    "rank 1 still acts as rank 0 until then, while import lightning_mpi tells Lightning the rank from the first line "
    "of the script, by design (ranks > 0 do not repeat rank 0's messages, logs and files)."
)
RANK_ZERO_WARNING = (
    "Lightning warns on rank 0 only (rank_zero_warn); the test expects the warning on every rank." + BEFORE_SETUP
)
DIVERGED = (
    " Rank 1 then leaves the test while rank 0 goes on to its next collective and waits for rank 1: the stall detector "
    "ends the job, as it must."
)

# -- the wider selection (November 2026 run of 1,918 tests); the report shows DDP's outcome beside each -------------

RANK_ZERO_MESSAGE = (
    "Lightning prints this message or gives this warning on rank 0 only (rank_zero_info / rank_zero_warn, also "
    "ModelPruning's and the Timer's messages); the test looks for it on every rank." + BEFORE_SETUP
)
LOGGER_ON_RANK_ZERO = (
    "Lightning's loggers act on rank 0 only (log_metrics, log_hyperparams, save and finalize are rank_zero_only, "
    "the experiment is rank_zero_experiment, the version and directories are made by rank 0); the test inspects the "
    "logger's calls, files or version on every rank." + BEFORE_SETUP
)
DTYPE_LEFT_BY_AN_EARLIER_TEST = (
    "core/test_metric_result_integration.py::test_metric_result_respects_dtype fails on rank 1 (it expects a warning "
    "Lightning gives on rank 0, here before the strategy's setup, which lightning-mpi keeps off rank 1 by design) "
    "before it sets torch's default dtype back, so every later test builds float64 models on rank 1 and float32 ones "
    "on rank 0: MPIStrategy refuses replicas that differ. Under DDP rank 1 still warns then, passes that test and "
    "leaves the dtype alone, so these tests pass there. The harness now resets the default dtype after each test "
    "(this run predates that)."
)
TUNER_REFUSES_DISTRIBUTED = (
    "Lightning's tuner refuses distributed strategies ('Tuning the batch size is currently not supported with "
    "distributed strategies', the BatchSizeFinder callback likewise), and the learning-rate finder's suggestion "
    "comes from each rank's half of the data."
)
HARNESS_REPLACED_THE_STRATEGY = (
    "The test checks which strategy, launcher or sampler Lightning's connectors choose for the arguments it gives; "
    "the harness replaced that choice with MPIStrategy (the harness's own artifact; with DDP injected instead, a test "
    "that expects DDP finds it)."
)
HALF_THE_BATCHES_PER_RANK = (
    "Each of 2 ranks takes half the data (Lightning's distributed sampler), so counts of batches, steps, updates or "
    "validation runs are half of one process's (or a time-based trigger fires at other batches)."
)
NONE_FROM_TRAINING_STEP = (
    "Lightning refuses a training_step that returns None with every distributed strategy ('Skipping the "
    "training_step by returning None in distributed training is not supported')."
)
PROGRESS_BAR_UNDER_A_LAUNCHER = (
    "Lightning's progress bar is disabled on ranks > 0 (ProgressBar.setup), so the bar's counts, refreshes and "
    "prints the test checks happen on rank 0 only (DDP fails it on rank 1 too). Where rank 0 fails as well, the test "
    "uses Lightning's default bar, which MPIStrategy replaces under a launcher with EpochLines (one line per epoch: "
    "Lightning's bar prints blank lines through an MPI launcher); its tqdm bars do not draw or count."
)
WORLD_SIZE_IS_THE_LAUNCHERS = (
    "The test assigns trainer.strategy.world_size; the world size of MPIStrategy (as of Lightning's "
    "ParallelStrategy, DDP included) comes from the launcher and cannot be set."
)
DISTRIBUTED_SAMPLER_INJECTED = (
    "Lightning injects a DistributedSampler for distributed strategies; the test checks for one process's "
    "SequentialSampler."
)

REASONS: list[tuple[str, str]] = [
    # -- the wider selection: categories (generated from the failures of the run, grouped by file) ----------
    (
        r"callbacks/test_finetuning_callback\.py::(test_finetuning_callback_warning|test_unfreeze_and_add_param_group_function)\b",
        RANK_ZERO_MESSAGE,
    ),
    (
        r"callbacks/test_lr_monitor\.py::(test_log_momentum_no_momentum_optimizer|test_log_momentum_no_momentum_optimizer_no_lr_scheduler)\b",
        RANK_ZERO_MESSAGE,
    ),
    (r"callbacks/test_stochastic_weight_avg\.py::(test_swa_warns)\b", RANK_ZERO_MESSAGE),
    (r"callbacks/test_timer\.py::(test_timer_stops_training|test_trainer_flag)\b", RANK_ZERO_MESSAGE),
    (
        r"core/test_metric_result_integration\.py::(test_logger_sync_dist|test_metric_result_respects_dtype)\b",
        RANK_ZERO_MESSAGE,
    ),
    (
        r"loops/test_training_epoch_loop\.py::(test_resume_mid_epoch_warning|test_should_stop_early_stopping_conditions_not_met)\b",
        RANK_ZERO_MESSAGE,
    ),
    (
        r"loops/test_training_loop\.py::(test_eval_mode_warning|test_fit_loop_done_log_messages|test_should_stop_early_stopping_conditions_met)\b",
        RANK_ZERO_MESSAGE,
    ),
    (
        r"loops/test_training_loop_flow_scalar\.py::(test_train_step_no_return|test_training_step_no_return_when_even|test_training_step_none_batches)\b",
        RANK_ZERO_MESSAGE,
    ),
    (r"models/test_hparams\.py::(test_nn_modules_warning_when_saved_as_hparams)\b", RANK_ZERO_MESSAGE),
    (r"models/test_restore\.py::(test_restarting_mid_epoch_raises_warning)\b", RANK_ZERO_MESSAGE),
    (
        r"models/test_torchscript\.py::(test_to_torchscript_deprecation|test_torchcript_invalid_method|test_torchscript_device|test_torchscript_device_with_check_inputs|test_torchscript_example_input_output_trace|test_torchscript_input_output|test_torchscript_input_output_trace|test_torchscript_properties|test_torchscript_retain_training_state|test_torchscript_save_load|test_torchscript_save_load_custom_filesystem|test_torchscript_script_recursively|test_torchscript_with_no_input)\b",
        RANK_ZERO_MESSAGE,
    ),
    (
        r"trainer/connectors/test_callback_connector\.py::(test_attach_model_callbacks_override_info)\b",
        RANK_ZERO_MESSAGE,
    ),
    (
        r"trainer/connectors/test_checkpoint_connector\.py::(test_stateful_trainer_ckpt_path_support)\b",
        RANK_ZERO_MESSAGE,
    ),
    (
        r"trainer/connectors/test_data_connector\.py::(TestDataHookSelector::test_override_both_model_and_datamodule|TestDataHookSelector::test_with_datamodule_override_model|test_eval_distributed_sampler_warning|test_non_sequential_sampler_warning_is_raised_for_eval_dataloader|test_worker_check|test_worker_check_reload_dataloaders_every_n_epochs_limitations)\b",
        RANK_ZERO_MESSAGE,
    ),
    (
        r"trainer/flags/test_barebones\.py::(test_barebones_argument_selection|test_barebones_disables_logging)\b",
        RANK_ZERO_MESSAGE,
    ),
    (r"trainer/flags/test_fast_dev_run\.py::(test_skip_on_fast_dev_run_tuner)\b", RANK_ZERO_MESSAGE),
    (r"trainer/flags/test_limit_batches\.py::(test_limit_batches_info_message)\b", RANK_ZERO_MESSAGE),
    (
        r"trainer/flags/test_overfit_batches\.py::(test_overfit_batches_raises_warning_in_case_of_sequential_sampler)\b",
        RANK_ZERO_MESSAGE,
    ),
    (r"trainer/flags/test_val_check_interval\.py::(test_val_check_interval_info_message)\b", RANK_ZERO_MESSAGE),
    (r"loggers/test_all\.py::(test_loggers_fit_test_all)\b", LOGGER_ON_RANK_ZERO),
    (
        r"loggers/test_comet\.py::(test_comet_epoch_logging|test_comet_experiment_is_still_alive_after_training_complete|test_comet_log_graph|test_comet_log_hyperparams)\b",
        LOGGER_ON_RANK_ZERO,
    ),
    (
        r"loggers/test_csv\.py::(test_append_columns|test_append_metrics_file|test_automatic_versioning|test_csv_logger_remotefs|test_flush_n_steps|test_log_hyperparams|test_log_metrics|test_manual_versioning|test_manual_versioning_file_exists|test_metrics_reset_after_save|test_named_version|test_no_name)\b",
        LOGGER_ON_RANK_ZERO,
    ),
    (
        r"loggers/test_litlogger\.py::(test_litlogger_experiment_property|test_litlogger_experiment_reuses_existing|test_litlogger_finalize|test_litlogger_get_file|test_litlogger_log_file|test_litlogger_log_graph_warning|test_litlogger_log_hyperparams_dict|test_litlogger_log_hyperparams_namespace|test_litlogger_log_metrics|test_litlogger_log_metrics_with_prefix|test_litlogger_log_model|test_litlogger_log_model_artifact|test_litlogger_log_model_artifact_uses_step_as_default_version|test_litlogger_log_model_uses_step_as_default_version|test_litlogger_metadata_in_init|test_litlogger_save_logs_option|test_litlogger_url_property|test_litlogger_version_property|test_litlogger_with_trainer)\b",
        LOGGER_ON_RANK_ZERO,
    ),
    (
        r"loggers/test_logger\.py::(test_custom_logger|test_multiple_loggers|test_multiple_loggers_pickle|test_np_sanitization)\b",
        LOGGER_ON_RANK_ZERO,
    ),
    (
        r"loggers/test_mlflow\.py::(test_mlflow_experiment_id_retrieved_once|test_mlflow_log_dir|test_mlflow_log_model|test_mlflow_logger_exists|test_mlflow_logger_experiment_calls|test_mlflow_logger_experiment_calls_with_synchronous|test_mlflow_logger_finalize|test_mlflow_logger_finalize_when_exception|test_mlflow_logger_with_long_param_value|test_mlflow_logger_with_many_params|test_mlflow_logger_with_unexpected_characters|test_mlflow_run_id_setting|test_set_tracking_uri)\b",
        LOGGER_ON_RANK_ZERO,
    ),
    (
        r"loggers/test_wandb\.py::(test_wandb_log_media|test_wandb_log_model|test_wandb_log_model_with_score|test_wandb_logger_dirs_creation|test_wandb_logger_download_artifact|test_wandb_logger_init|test_wandb_logger_init_before_spawn|test_wandb_logger_sync_tensorboard|test_wandb_logger_sync_tensorboard_log_metrics|test_wandb_pickle)\b",
        LOGGER_ON_RANK_ZERO,
    ),
    (
        r"core/test_saving\.py::(test_load_from_checkpoint_map_location_automatic|test_load_from_checkpoint_map_location_cpu|test_load_from_checkpoint_strict|test_load_from_checkpoint_warn_on_empty_state_dict)\b",
        DTYPE_LEFT_BY_AN_EARLIER_TEST,
    ),
    (r"models/test_amp\.py::(test_amp_cpus|test_precision_16_clip_gradients)\b", DTYPE_LEFT_BY_AN_EARLIER_TEST),
    (
        r"models/test_cpu\.py::(test_default_logger_callbacks_cpu_model|test_lbfgs_cpu_model)\b",
        DTYPE_LEFT_BY_AN_EARLIER_TEST,
    ),
    (
        r"models/test_hooks\.py::(test_on_before_zero_grad_called|test_on_train_epoch_end_metrics_collection|test_train_eval_mode_restored)\b",
        DTYPE_LEFT_BY_AN_EARLIER_TEST,
    ),
    (
        r"models/test_hparams\.py::(test_args|test_collect_init_arguments|test_dict_hparams|test_explicit_args_hparams|test_explicit_missing_args_hparams|test_hparams_pickle_warning|test_ignore_args_list_hparams|test_implicit_args_hparams|test_load_past_checkpoint|test_model_ignores_non_exist_kwargument|test_model_nohparams_train_test|test_model_save_hyper_parameters_interpolation_with_hydra|test_model_with_fsspec_as_parameter|test_namespace_hparams|test_omega_conf_hparams)\b",
        DTYPE_LEFT_BY_AN_EARLIER_TEST,
    ),
    (r"loggers/test_all\.py::(test_logger_reset_correctly)\b", TUNER_REFUSES_DISTRIBUTED),
    (
        r"tuner/test_lr_finder\.py::(test_exponential_vs_linear_mode_gradient_difference|test_lr_finder_callback_applies_lr_after_restore)\b",
        TUNER_REFUSES_DISTRIBUTED,
    ),
    (
        r"tuner/test_scale_batch_size\.py::(test_auto_scale_batch_size_duplicate_attribute_warning|test_auto_scale_batch_size_set_datamodule_attribute|test_auto_scale_batch_size_set_model_attribute|test_batch_size_finder_callback|test_batch_size_finder_callback_val_batches|test_batch_size_finder_with_multiple_eval_dataloaders|test_call_to_trainer_method|test_dataloader_batch_size_updated_on_failure|test_dataloader_reset_with_scale_batch_size|test_error_on_dataloader_passed_to_fit|test_scale_batch_size_checkpoint_cleanup_on_error|test_scale_batch_size_fails_with_unavailable_mode|test_scale_batch_size_margin_and_max_val|test_scale_batch_size_max_trials_modes|test_scale_batch_size_max_val_limit|test_scale_batch_size_method_with_model_or_datamodule|test_scale_batch_size_no_trials|test_trainer_reset_correctly|test_tuner_with_evaluation_methods)\b",
        TUNER_REFUSES_DISTRIBUTED,
    ),
    (r"tuner/test_tuning\.py::(test_tuner_with_already_configured_batch_size_finder)\b", TUNER_REFUSES_DISTRIBUTED),
    (
        r"trainer/connectors/test_accelerator_connector\.py::(test_accelerator_cpu_with_devices|test_benchmark_option|test_connector_auto_selection|test_ddp_fork_on_unsupported_platform|test_strategy_choice_cpu_instance|test_strategy_choice_cpu_str|test_strategy_choice_ddp_cpu_slurm|test_strategy_choice_ddp_cuda|test_strategy_choice_ddp_fork_cpu|test_strategy_choice_ddp_fork_in_interactive|test_strategy_choice_ddp_slurm|test_strategy_choice_ddp_spawn_cpu|test_strategy_str_passed_being_case_insensitive)\b",
        HARNESS_REPLACED_THE_STRATEGY,
    ),
    (
        r"callbacks/test_weight_averaging\.py::(test_ema|test_ema_configure_model|test_ema_resume)\b",
        HALF_THE_BATCHES_PER_RANK,
    ),
    (
        r"loops/test_fetchers\.py::(test_fetching_dataloader_iter_opt|test_step_methods_with_dataloader_iter|test_stop_iteration_with_dataloader_iter|test_training_step_with_dataloader_iter|test_transfer_hooks_with_unpacking)\b",
        HALF_THE_BATCHES_PER_RANK,
    ),
    (
        r"loops/test_loops\.py::(test_fit_can_fail_during_validation|test_loop_state_on_complete_run)\b",
        HALF_THE_BATCHES_PER_RANK,
    ),
    (
        r"trainer/connectors/test_data_connector\.py::(test_dataloader_reinit_for_subclass|test_loader_detaching)\b",
        HALF_THE_BATCHES_PER_RANK,
    ),
    (
        r"trainer/flags/test_check_val_every_n_epoch\.py::(test_check_val_every_n_epoch_with_max_steps)\b",
        HALF_THE_BATCHES_PER_RANK,
    ),
    (r"trainer/flags/test_limit_batches\.py::(test_num_dataloader_batches)\b", HALF_THE_BATCHES_PER_RANK),
    (r"trainer/flags/test_overfit_batches\.py::(test_overfit_basic)\b", HALF_THE_BATCHES_PER_RANK),
    (r"loops/test_fetchers\.py::(test_fetching_dataloader_iter_opt)\b", NONE_FROM_TRAINING_STEP),
    (r"loops/test_loops\.py::(test_fit_loop_save_and_restore_dataloaders)\b", NONE_FROM_TRAINING_STEP),
    (
        r"loops/test_training_epoch_loop\.py::(test_training_loop_dataloader_iter_multiple_dataloaders)\b",
        NONE_FROM_TRAINING_STEP,
    ),
    (r"trainer/connectors/test_signal_connector\.py::(test_sigterm_handler_can_be_added)\b", NONE_FROM_TRAINING_STEP),
    (r"trainer/flags/test_min_max_epochs\.py::(test_max_epochs_not_set_warning)\b", NONE_FROM_TRAINING_STEP),
    (r"tuner/test_lr_finder\.py::(test_lr_finder_training_step_none_output)\b", NONE_FROM_TRAINING_STEP),
    (r"trainer/flags/test_overfit_batches\.py::(test_overfit_batch_limits_eval)\b", DISTRIBUTED_SAMPLER_INJECTED),
    (
        r"loops/test_loops\.py::test_workers_are_shutdown",
        "Lightning re-creates the loaders with a distributed sampler, so the loader instances whose worker shutdowns "
        "the test records are not the ones that run (DDP fails it too).",
    ),
    (
        r"loops/test_training_loop\.py::test_training_starts_with_seed",
        "The test's expectation rests on one process's random stream; with 2 ranks the strategy re-seeds at setup "
        "(as DDP does) and each rank draws its own batches (DDP fails it too).",
    ),
    (
        r"trainer/connectors/test_data_connector\.py::test_error_raised_with_insufficient_float_limit_train_dataloader",
        HALF_THE_BATCHES_PER_RANK,
    ),
    (r"callbacks/progress/test_tqdm_progress_bar\.py::", PROGRESS_BAR_UNDER_A_LAUNCHER),
    (
        r"trainer/connectors/test_callback_connector\.py::(test_attach_model_callbacks|test_checkpoint_callbacks_are_last)",
        (
            "The test compares trainer.callbacks with a list that holds Lightning's default progress bar; under an MPI "
            "launcher MPIStrategy puts EpochLines in its place, by design (Lightning's bar prints blank lines through "
            "a launcher)."
        ),
    ),
    (r"loops/optimization/test_automatic_loop\.py::test_skip_training_step_not_allowed", WORLD_SIZE_IS_THE_LAUNCHERS),
    (
        r"models/test_restore\.py::test_callbacks_state_fit_ckpt_path",
        (
            "ModelCheckpoint on rank 1 tracks rank 1's own, unsynchronised metric (self.log without sync_dist), while "
            "the checkpoint it resumes from holds rank 0's callback state; the test compares the two on every rank."
        ),
    ),
    # -- the wider selection: tests of their own -------------------------------------------------------------------
    (r"callbacks/test_pruning\.py::test_sparsity_calculation", RANK_ZERO_MESSAGE),
    (
        r"core/test_metric_result_integration\.py::(test_metric_result_dtype_promotion"
        r"|test_metric_result_precision_no_lower_than_float32|test_compute_not_a_tensor_raises)"
        r"|models/test_hparams\.py::test_adding_datamodule_hparams",
        DTYPE_LEFT_BY_AN_EARLIER_TEST,
    ),
    (
        r"trainer/flags/test_val_check_interval\.py::test_time_and_epoch_gated_val_check",
        (
            "The test fakes the clock by counting calls to time.monotonic (each call is one second); MPIStrategy calls "
            "it too (the stall monitor around every collective, the progress lines), which moves the fake clock on. "
            "Validation itself is scheduled by Lightning alike."
        ),
    ),
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
            "writers race, as under DDP (it passes or fails by timing under either strategy)."
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
