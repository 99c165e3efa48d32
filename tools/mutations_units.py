"""Deliberately broken variants of the package and the unit tests that must fail under each.

Each entry: ``name``; ``file`` (relative to the repository root); ``old``, an exact substring that occurs once in
that file; ``new``, its replacement; ``tests``, pytest node ids that fail with the replacement applied and pass
without it.
"""

from __future__ import annotations

MUTATIONS: list[dict[str, object]] = [
    {
        "name": "head optimizer not stepped",
        "file": "mirai_plugin/optimizer.py",
        "old": "        self.optimizer.step()\n        self.optimizer.zero_grad(set_to_none=True)\n",
        "new": "        self.optimizer.zero_grad(set_to_none=True)\n",
        "tests": [
            "tests/test_training_loop.py::test_stop_and_resume_matches_an_uninterrupted_run",
            "tests/test_head.py::test_replay_matches_the_generator_step_and_touches_only_the_head",
        ],
    },
    {
        "name": "weight not applied",
        "file": "mirai_plugin/head.py",
        "old": "        weighted = loss * weight\n",
        "new": "        weighted = loss\n",
        "tests": [
            "tests/test_head.py::test_breakdown_names_segments_and_unweighted_losses",
            "tests/test_training_loop.py::test_head_follows_the_schedule_and_is_inert_while_off",
        ],
    },
    {
        "name": "FLOP count of the head doubled",
        "file": "mirai_plugin/tooling/flops.py",
        "old": "        head_step = 3 * (predictor + projection)  # forward + backward\n",
        "new": "        head_step = 6 * (predictor + projection)  # forward + backward\n",
        "tests": [
            "tests/test_documented_numbers.py::test_the_flops_output_in_performance_md_is_what_the_command_prints",
            "tests/test_documented_numbers.py::test_the_longlive_cost_table_is_what_the_estimator_gives",
            "tests/test_documented_numbers.py::test_the_precision_comparison_rows_are_what_the_estimator_gives",
        ],
    },
    {
        "name": "memory of the AdamW moments changed",
        "file": "mirai_plugin/tooling/memory.py",
        "old": '        "optimizer_state": 2 * per_rank * pb,\n',
        "new": '        "optimizer_state": 3 * per_rank * pb,\n',
        "tests": [
            "tests/test_documented_numbers.py::test_the_memory_output_in_scaling_md_is_what_the_command_prints",
            "tests/test_documented_numbers.py::test_the_per_rank_memory_table_in_scaling_md_is_what_the_benchmark_prints",
            "tests/test_documented_numbers.py::test_the_precision_comparison_rows_are_what_the_estimator_gives",
        ],
    },
    {
        "name": "bf16 compute path ignored",
        "file": "mirai_plugin/head.py",
        "old": "        dtype = self.compute_dtype\n        autocast = dtype",
        "new": "        dtype = next(self.parameters()).dtype\n        autocast = dtype",
        "tests": ["tests/test_segmented.py::test_bfloat16_compute_keeps_float32_weights_and_a_close_loss"],
    },
    {
        "name": "capture keeps the first call instead of the last",
        "file": "mirai_plugin/capture.py",
        "old": "        self._records[key] = HiddenRecord(hidden, position, self._calls, hidden._version)\n",
        "new": "        self._records.setdefault(key, HiddenRecord(hidden, position, self._calls, hidden._version))\n",
        "tests": ["tests/test_capture.py::test_grad_only_false_keeps_every_call_keyed_by_position"],
    },
    {
        "name": "temporal flickering off by one frame pair",
        "file": "mirai_plugin/tooling/eval/consistency.py",
        "old": "    return (255.0 - mae.mean(-1)) / 255.0\n",
        "new": "    return (255.0 - mae[..., 1:].mean(-1)) / 255.0\n",
        "tests": ["tests/test_eval.py::test_consistency_formulas_match_vbench_on_recorded_inputs"],
    },
    {
        "name": "subject consistency without the clamp of negative cosines",
        "file": "mirai_plugin/tooling/eval/consistency.py",
        "old": "    to_first = (phi[..., 1:, :] * phi[..., :1, :]).sum(-1).clamp_min(0)\n",
        "new": "    to_first = (phi[..., 1:, :] * phi[..., :1, :]).sum(-1)\n",
        "tests": ["tests/test_eval.py::test_consistency_formulas_match_vbench_on_recorded_inputs"],
    },
    {
        "name": "Wan padding trimmed at the wrong end",
        "file": "mirai_plugin/encoder.py",
        "old": "            hidden = hidden[:, :tokens]  # (b t e): drop Wan's padding to seq_len\n",
        "new": "            hidden = hidden[:, -tokens:]  # (b t e): drop Wan's padding to seq_len\n",
        "tests": ["tests/test_encoder.py::test_wan_wrapper_trims_padding"],
    },
    {
        "name": "diffusers timestep passed as a fraction of 1000",
        "file": "mirai_plugin/encoder.py",
        "old": "            timestep=timestep,\n            encoder_hidden_states=encoder_hidden_states,\n",
        "new": "            timestep=timestep / 1000,\n            encoder_hidden_states=encoder_hidden_states,\n",
        "tests": ["tests/test_diffusers.py::test_frozen_encoder_passes_timestep_and_extra_keywords"],
    },
    {
        "name": "replay does not step the head",
        "file": "mirai_plugin/replay.py",
        "old": "        if step:\n            optimization.clip_and_step()\n        return total / local_pairs",
        "new": "        return total / local_pairs",
        "tests": ["tests/test_distributed.py::test_two_ranks_equal_one_process_on_the_global_batch[fsdp-fsdp-True]"],
    },
]
