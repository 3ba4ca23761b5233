"""Test tiers: ``python -m pytest`` runs everything (CI does); ``python -m pytest -m "not slow"``
is the fast tier for the edit loop.

A test is slow when its file marks it ``@pytest.mark.slow`` (end-to-end runs, notebooks,
multi-process grids), or when it is listed in ``SLOW`` below: the tests and parametrized cases
that took 3 s or more (setup included) in ``python -m pytest FILE --durations=0`` on the 2-core
development machine, and those of 2 s or more in a run of the fast tier itself; mostly
compilations of the heavier kernels, training runs and subprocesses. An entry is
``file::test`` (every case) or ``file::test[case`` (the cases whose id starts so). Mark a new
slow test in its file; ``tests/test_tiers.py`` checks that every entry still names a test.
"""

from __future__ import annotations

import pytest

SLOW = (
    # tests/test_aggregator_conformance.py
    "test_aggregator_conformance.py::test_jit_equals_eager[bulyan]",
    "test_aggregator_conformance.py::test_jit_equals_eager[caf]",
    "test_aggregator_conformance.py::test_jit_equals_eager[dnc]",
    "test_aggregator_conformance.py::test_jit_equals_eager[smea]",
    "test_aggregator_conformance.py::test_padding_and_mask_invariance[bulyan]",
    "test_aggregator_conformance.py::test_padding_and_mask_invariance[caf]",
    "test_aggregator_conformance.py::test_permutation_invariance[bulyan]",
    "test_aggregator_conformance.py::test_permutation_invariance[caf]",
    "test_aggregator_conformance.py::test_permutation_invariance[smea]",
    "test_aggregator_conformance.py::test_pre_jit_equals_eager_and_vmap_equals_loop[arc]",
    "test_aggregator_conformance.py::test_pre_jit_equals_eager_and_vmap_equals_loop[bucketing]",
    "test_aggregator_conformance.py::test_pre_jit_equals_eager_and_vmap_equals_loop[nnm]",
    "test_aggregator_conformance.py::test_pre_padding_invariance[bucketing]",
    "test_aggregator_conformance.py::test_reverse_mode_differentiable[geometric_median]",
    "test_aggregator_conformance.py::test_vmap_over_configs_equals_loop[bulyan]",
    "test_aggregator_conformance.py::test_vmap_over_configs_equals_loop[caf]",
    "test_aggregator_conformance.py::test_vmap_over_configs_equals_loop[dnc]",
    "test_aggregator_conformance.py::test_vmap_over_configs_equals_loop[geometric_median]",
    "test_aggregator_conformance.py::test_vmap_over_configs_equals_loop[monna]",
    "test_aggregator_conformance.py::test_vmap_over_configs_equals_loop[multi_krum]",
    "test_aggregator_conformance.py::test_vmap_over_configs_equals_loop[smea]",
    # tests/test_aggregator_properties.py
    "test_aggregator_properties.py::test_arc_clips_at_most_k_rows_to_the_k_plus_1_th_norm",
    "test_aggregator_properties.py::test_bucketing_spoils_at_most_b_buckets",
    "test_aggregator_properties.py::test_centered_clip_moves_at_most_tau_per_iteration",
    "test_aggregator_properties.py::test_geometric_median_pull_is_bounded",
    "test_aggregator_properties.py::test_selection_rules_stay_in_the_honest_box[bulyan-multikrum]",
    "test_aggregator_properties.py::test_selection_rules_stay_in_the_honest_box[bulyan]",
    "test_aggregator_properties.py::test_translation_equivariance[caf]",
    "test_aggregator_properties.py::test_translation_equivariance[smea]",
    # tests/test_aggregators.py
    "test_aggregators.py::test_gram_by_column_tiles[grouped-loop]",
    "test_aggregators.py::test_gram_by_column_tiles[real-tile]",
    "test_aggregators.py::test_gram_by_column_tiles[static-tiles]",
    "test_aggregators.py::test_gram_rules_with_tiles",
    "test_aggregators.py::test_matches_brute_force[bulyan-variant=multikrum]",
    "test_aggregators.py::test_matches_brute_force[bulyan]",
    "test_aggregators.py::test_matches_brute_force[geometric_median-iters=20-nu=0.01-start=mean]",
    "test_aggregators.py::test_matches_brute_force[geometric_median]",
    "test_aggregators.py::test_matches_brute_force[mda]",
    "test_aggregators.py::test_matches_brute_force[median-sort=bitonic]",
    "test_aggregators.py::test_matches_brute_force[multi_krum-distance=euclidean-neighbours=code]",
    "test_aggregators.py::test_matches_brute_force[trimmed_mean-sort=bitonic]",
    # tests/test_aggregators_extra.py
    "test_aggregators_extra.py::test_caf_equals_exact_numpy",
    "test_aggregators_extra.py::test_dnc_subsampled_coordinates_are_key_driven_and_union_keeps_more",
    "test_aggregators_extra.py::test_equals_peer_output[dnc-DnC(3,",
    "test_aggregators_extra.py::test_equals_peer_output[monna-MoNNA(f=3,",
    "test_aggregators_extra.py::test_equals_peer_output[signguard-Signguard()0]",
    "test_aggregators_extra.py::test_equals_peer_output[signguard-Signguard()1]",
    "test_aggregators_extra.py::test_equals_peer_output[signguard-Signguard()2]",
    "test_aggregators_extra.py::test_equals_peer_output[signguard-Signguard()3]",
    "test_aggregators_extra.py::test_monna_trusted_index_counts_valid_rows",
    "test_aggregators_extra.py::test_reverse_mode_gradient_is_finite[caf]",
    "test_aggregators_extra.py::test_robust_aggregate_optax_drop_in",
    "test_aggregators_extra.py::test_signguard_filters_flipped_and_tiny_rows_and_clips_large_ones",
    "test_aggregators_extra.py::test_smea_equals_exact_numpy",
    "test_aggregators_extra.py::test_toml_runner_end_to_end",
    # tests/test_async.py
    "test_async.py::test_async_runs_shard_over_eight_devices_like_one",
    "test_async.py::test_baseline_rules_against_numpy",
    "test_async.py::test_event_order_matches_priority_queue",
    "test_async.py::test_ormo_equals_in_order_replay",
    "test_async.py::test_zero_delay_ormo_reproduces_ssgdm",
    # tests/test_attacks.py
    "test_attacks.py::test_alie_matches_numpy[baruch-minus-7-2]",
    "test_attacks.py::test_conformance[gaussian]",
    "test_attacks.py::test_conformance[mimic-variant=eigen-warmup=2]",
    "test_attacks.py::test_conformance[min_max]",
    "test_attacks.py::test_conformance[min_sum-perturbation=unit]",
    "test_attacks.py::test_conformance[min_sum]",
    "test_attacks.py::test_gaussian_statistics_and_key_derivation[False]",
    # tests/test_byzsgdnm.py
    "test_byzsgdnm.py::test_chain_equals_numpy_reference[plain-True]",
    # tests/test_cli.py
    "test_cli.py::test_console_script_entry_point_runs",
    "test_cli.py::test_run_writes_table_summary_and_plot",
    # tests/test_compression.py
    "test_compression.py::test_randk_jit_vmap_and_mask",
    "test_compression.py::test_randk_rows_independent_of_stack_and_keys",
    "test_compression.py::test_randk_structure",
    "test_compression.py::test_randk_unbiased_and_variance",
    # tests/test_config.py
    "test_config.py::test_default_config_is_valid",
    # tests/test_data.py
    "test_data.py::test_augment_images_flip_and_crop",
    "test_data.py::test_fashion_mnist_from_debian_path",
    "test_data.py::test_sample_indices_within_rows_and_uniform",
    # tests/test_dm_options.py
    "test_dm_options.py::test_authors_krum_and_bulyan_equal_brute_force[11-2-0]",
    "test_dm_options.py::test_authors_krum_and_bulyan_equal_brute_force[15-3-2]",
    "test_dm_options.py::test_authors_krum_and_bulyan_equal_brute_force[19-4-3]",
    "test_dm_options.py::test_epoch_stream_covers_each_example_once_per_epoch",
    "test_dm_options.py::test_epoch_stream_through_the_simulator_uses_every_example_once",
    "test_dm_options.py::test_eval_mode_training_forward_freezes_batchnorm",
    "test_dm_options.py::test_nesterov_two_steps_by_hand",
    "test_dm_options.py::test_permute_index_is_a_permutation[1]",
    "test_dm_options.py::test_permute_index_is_a_permutation[60000]",
    "test_dm_options.py::test_sampled_and_submitted_ratios_logged_per_step",
    "test_dm_options.py::test_test_time_flips_are_fresh_and_seeded",
    # tests/test_docs.py
    "test_docs.py::test_every_public_module_is_in_the_api_reference",
    # tests/test_doctests.py
    "test_doctests.py::test_module_doctests[jbyz.aggregators]",
    "test_doctests.py::test_module_doctests[jbyz.aggregators_extra]",
    "test_doctests.py::test_module_doctests[jbyz.algorithms.async_sgd]",
    "test_doctests.py::test_module_doctests[jbyz.algorithms.dstar]",
    "test_doctests.py::test_module_doctests[jbyz.algorithms.marina]",
    "test_doctests.py::test_module_doctests[jbyz.compression]",
    "test_doctests.py::test_module_doctests[jbyz.models]",
    "test_doctests.py::test_module_doctests[jbyz.protocols]",
    # tests/test_dropin.py
    "test_dropin.py::test_aggregation_rule_is_not_optax_aggregator_and_is_callable_on_a_matrix",
    "test_dropin.py::test_build_time_requirement_is_the_runners[trimmed_mean-8-5-pre0-trimmed_mean",
    "test_dropin.py::test_checkpoint_typed_keys_as_the_docs_say",
    "test_dropin.py::test_components_by_name_dict_or_object",
    "test_dropin.py::test_inject_hyperparams_as_written_in_the_readme",
    "test_dropin.py::test_inject_hyperparams_attack_strength_f_and_momentum_in_one_chain",
    "test_dropin.py::test_key_int_or_key_and_deprecated_seed",
    "test_dropin.py::test_multisteps_accumulates_per_worker",
    "test_dropin.py::test_one_num_workers_message[momentum]",
    "test_dropin.py::test_per_worker_adam_is_one_adam_per_worker",
    "test_dropin.py::test_plots_leave_the_matplotlib_backend_alone",
    "test_dropin.py::test_traced_f_is_nan_when_the_rule_cannot_take_it",
    "test_dropin.py::test_worker_stages_equal_their_per_worker_form[<lambda>-<lambda>0]",
    "test_dropin.py::test_worker_stages_equal_their_per_worker_form[<lambda>-<lambda>3]",
    # tests/test_dstar.py
    "test_dstar.py::test_mask_invariance_and_padding",
    "test_dstar.py::test_matches_numpy_brute_force[ensemble=subset_medians,combine=median,subsets=3,keep=threshold]",
    "test_dstar.py::test_matches_numpy_brute_force[ensemble=subset_medians,subset_size=3,subsets=2,keep=absolute]",
    "test_dstar.py::test_matches_numpy_brute_force[ensemble=subset_medians,subsets=3,score=reference,keep=threshold]",
    "test_dstar.py::test_matches_numpy_brute_force[ensemble=subset_medians,subsets=3]",
    "test_dstar.py::test_matches_numpy_brute_force[keep=threshold]",
    "test_dstar.py::test_missing_reference_fallback_and_error",
    "test_dstar.py::test_reverse_mode_differentiable",
    "test_dstar.py::test_subset_masks",
    "test_dstar.py::test_vmap_over_rho_and_configs_equals_loop",
    # tests/test_grid.py
    "test_grid.py::test_eight_devices_match_one",
    "test_grid.py::test_grid_equals_single_runs_alone_and_padded",
    "test_grid.py::test_invalid_points_reported_together_or_skipped",
    "test_grid.py::test_one_compilation_per_group",
    "test_grid.py::test_plots_heatmap_and_paired_from_grid",
    "test_grid.py::test_resume_after_kill_gives_identical_table",
    "test_grid.py::test_resume_is_per_run_across_subsets_and_batch_sizes",
    "test_grid.py::test_two_processes_through_jax_distributed",
    # tests/test_marina.py
    "test_marina.py::test_full_round_every_epoch_start_by_hand",
    "test_marina.py::test_label_flip_uses_flipped_labels_for_byzantine_clients",
    "test_marina.py::test_matches_numpy_reference",
    "test_marina.py::test_sampling_byzantine_majority_rounds",
    "test_marina.py::test_shift_back_attack",
    # tests/test_models.py
    "test_models.py::test_batchnorm_and_dropout",
    "test_models.py::test_builds_for_every_input_shape[dm_cnn-{}]",
    "test_models.py::test_builds_for_every_input_shape[resnet20-{'norm':",
    "test_models.py::test_builds_for_every_input_shape[resnet20-{}]",
    "test_models.py::test_parameter_counts",
    "test_models.py::test_per_worker_grads_methods_agree",
    "test_models.py::test_predict_in_chunks_matches_apply",
    "test_models.py::test_resnet20_batchnorm_and_groupnorm",
    "test_models.py::test_tiny_model_overfits_tiny_batch",
    "test_models.py::test_vmap_grad_over_workers_matches_loop",
    # tests/test_notebooks.py
    "test_notebooks.py::test_notebook_executes",
    # tests/test_plugins.py
    "test_plugins.py::test_plugin_example_runs_end_to_end",
    "test_plugins.py::test_unknown_component_without_its_plugin_is_reported",
    # tests/test_pp_clipping.py
    "test_pp_clipping.py::test_client_momentum_sampled_and_all_clients_by_hand",
    "test_pp_clipping.py::test_equals_aggregator_of_clipped_deviations_plus_reference[bulyan]",
    "test_pp_clipping.py::test_equals_aggregator_of_clipped_deviations_plus_reference[caf]",
    "test_pp_clipping.py::test_equals_aggregator_of_clipped_deviations_plus_reference[clipped_clustering]",
    "test_pp_clipping.py::test_equals_aggregator_of_clipped_deviations_plus_reference[dnc]",
    "test_pp_clipping.py::test_equals_aggregator_of_clipped_deviations_plus_reference[geometric_median]",
    "test_pp_clipping.py::test_equals_aggregator_of_clipped_deviations_plus_reference[mda]",
    "test_pp_clipping.py::test_equals_aggregator_of_clipped_deviations_plus_reference[meamed]",
    "test_pp_clipping.py::test_equals_aggregator_of_clipped_deviations_plus_reference[signguard]",
    "test_pp_clipping.py::test_equals_aggregator_of_clipped_deviations_plus_reference[smea]",
    "test_pp_clipping.py::test_optax_step_radius_uses_parameter_change",
    "test_pp_clipping.py::test_optax_transform_matches_wrapper_and_vmaps",
    "test_pp_clipping.py::test_with_bucketing_and_padding_invariance",
    # tests/test_protocols.py
    "test_protocols.py::test_async_primitives",
    "test_protocols.py::test_first_k_traced_k_under_vmap",
    "test_protocols.py::test_gamma_distribution",
    "test_protocols.py::test_heterogeneous_speeds_drawn_once_per_run",
    "test_protocols.py::test_shifted_exponential_distribution",
    "test_protocols.py::test_slow_subset",
    # tests/test_readme.py
    "test_readme.py::test_readme_example_runs_as_printed_and_recovers_w",
    "test_readme.py::test_readme_nnx_example_per_worker_adam_and_injected_hyperparameters",
    # tests/test_results.py
    "test_results.py::test_rows_carry_declared_f_and_scalar_hyperparameters",
    # tests/test_simulate.py
    "test_simulate.py::test_alie_hurts_mean_more_than_trimmed_mean_with_strong_z",
    "test_simulate.py::test_augment_option_runs_and_keeps_old_run_ids",
    "test_simulate.py::test_composite_curvature_in_a_run_and_config_checks",
    "test_simulate.py::test_first_k_rounds_latency_clock_and_server_reference",
    "test_simulate.py::test_momentum_first_zero_starts_the_worker_ema_from_zero",
    "test_simulate.py::test_no_attack_mean_learns_well_above_chance",
    "test_simulate.py::test_pipeline_variants_stay_finite_and_learn",
    "test_simulate.py::test_runs_are_deterministic_and_seed_dependent",
    "test_simulate.py::test_sign_flip_breaks_mean_but_not_median",
    "test_simulate.py::test_simulation_reusable_and_metrics_present",
    # tests/test_transforms.py
    "test_transforms.py::test_chain_vmaps_over_runs_like_a_loop",
    "test_transforms.py::test_worker_momentum_ema[gradient]",
    # tests/test_user_facing_text.py
    "test_user_facing_text.py::test_jbyz_list_stands_alone",
    # the heaviest left in a first run of the fast tier (>= 2 s, while other work ran)
    "test_compile_cache.py::test_second_run_loads_from_cache_with_identical_results",
    "test_compile_cache.py::test_import_jbyz_does_not_enable_the_cache",
    "test_aggregator_conformance.py::test_jit_equals_eager[clipped_clustering]",
    "test_aggregators_extra.py::test_clipped_clustering_history_window",
    "test_aggregators_extra.py::test_reverse_mode_gradient_is_finite[clipped_clustering]",
    "test_aggregators_extra.py::test_reverse_mode_gradient_is_finite[signguard]",
    "test_docs.py::test_running_page_code_runs",
    "test_aggregator_conformance.py::test_jit_equals_eager[signguard]",
    "test_aggregators.py::test_nonfinite_byzantine_rows_follow_the_policy",
    "test_readme.py::test_readme_claim_mean_diverges",
    "test_attacks.py::test_conformance[gaussian-centered=True]",
    "test_attacks.py::test_gaussian_statistics_and_key_derivation[True]",
    "test_aggregators_extra.py::test_equals_peer_output[clipped_clustering-Clippedclustering(linkage='average'),",
    "test_aggregators_extra.py::test_equals_peer_output[clipped_clustering-Clippedclustering(linkage='single'),",
    "test_aggregator_conformance.py::test_vmap_over_configs_equals_loop[clipped_clustering]",
    "test_aggregators_extra.py::test_equals_peer_output[clipped_clustering-Clippedclustering(linkage='average'),",
    "test_aggregators_extra.py::test_reverse_mode_gradient_is_finite[smea]",
    "test_aggregators_extra.py::test_caf_removes_far_outliers_and_is_the_mean_at_f0",
    "test_dm_options.py::test_authors_krum_and_bulyan_equal_brute_force[11-4-1]",
    "test_aggregator_conformance.py::test_permutation_invariance[clipped_clustering]",
    "test_aggregator_conformance.py::test_padding_and_mask_invariance[smea]",
    "test_aggregators_extra.py::test_caf_byzfl_scope_equals_numpy_when_its_loop_ends_within_iters",
    "test_aggregator_conformance.py::test_jit_equals_eager[dstar]",
    "test_attacks.py::test_alie_z_spec_values_host_and_traced",
    "test_attacks.py::test_alie_matches_numpy[baruch-minus-7-0]",
    "test_transforms.py::test_worker_momentum_ema[zero]",
    "test_aggregator_conformance.py::test_f_zero[bulyan]",
    "test_aggregator_conformance.py::test_vmap_over_configs_equals_loop[signguard]",
    "test_attacks.py::test_docstring_examples",
    "test_aggregator_conformance.py::test_f_zero[caf]",
    # and of a second run (>= 2 s)
    "test_aggregator_conformance.py::test_padding_and_mask_invariance[clipped_clustering]",
    "test_transforms.py::test_worker_momentum_sum_nesterov_and_valid_mask",
    "test_pp_clipping.py::test_equals_aggregator_of_clipped_deviations_plus_reference[multi_krum]",
    "test_pp_clipping.py::test_equals_aggregator_of_clipped_deviations_plus_reference[mean]",
    "test_doctests.py::test_module_doctests[jbyz.algorithms.pp_clipping]",
    "test_dropin.py::test_one_num_workers_message[attack]",
    "test_dstar.py::test_brute_force_can_tell_the_options_apart",
    "test_dropin.py::test_one_num_workers_message[clip]",
    "test_pp_clipping.py::test_equals_aggregator_of_clipped_deviations_plus_reference[monna]",
    "test_attacks.py::test_alie_matches_numpy[baruch-minus-6-3]",
    "test_aggregator_conformance.py::test_pre_jit_equals_eager_and_vmap_equals_loop[clip]",
    # tests sharing a module fixture with the slow ones above (it would be built for them alone)
    "test_grid.py::test_results_table_has_every_field_and_metadata",
    "test_grid.py::test_parts_from_another_version_are_refused",
    "test_results.py::test_summary_groups_by_readable_columns",
    "test_results.py::test_tables_of_earlier_versions_load_in_the_current_layout",
    "test_results.py::test_grid_mixing_parts_of_both_layouts_gives_one_layout",
)


def _slow(nodeid: str) -> bool:
    rel = nodeid.split("/")[-1]
    for entry in SLOW:
        if rel == entry or rel.startswith(entry + "[") or ("[" in entry and rel.startswith(entry)):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _slow(item.nodeid):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _compile_cache_in_tmp(tmp_path_factory):
    """The grid runner's persistent compilation cache (on by default, in the user's home) goes to
    a directory of this session instead, whatever the caller's environment says; subprocesses
    (``jbyz run`` in tests) inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JBYZ_COMPILE_CACHE", str(tmp_path_factory.mktemp("jax_compile_cache")))
        yield


@pytest.fixture(autouse=True)
def _close_figures():
    """The plotting functions return their figures open (for the user to show or save); close
    them after each test so a long session does not accumulate them."""
    yield
    import sys

    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")
