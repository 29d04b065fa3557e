"""Mutation check: break core behaviour one line at a time and see whether the test suite notices.

Each mutation replaces one exact line of a source file (the text must occur exactly once), runs the named
tests with ``pytest -x`` against this checkout's ``src``, and restores the file in a ``finally`` (also on
Ctrl-C). A mutation is *caught* when a test fails, *missed* when every named test passes (then the suite
has a gap: add a test), and an *error* when pytest could not run the tests::

    python scripts/mutation_check.py --list
    python scripts/mutation_check.py                        # all mutations (minutes; fixture tests are slow)
    python scripts/mutation_check.py --only flip-rule,auroc-ties --json report.json

The mutations and the tests that catch them are listed in docs/testing.md. Tests that need the official
fixtures are named last, so a checkout without ``../shared/fixtures`` still runs the fast ones first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "mammogmic"


@dataclass(frozen=True)
class Mutation:
    """One deliberate breakage: ``old`` (one line, unique in ``path``) becomes ``new``."""

    name: str
    what: str
    path: str  # relative to src/mammogmic
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids relative to the repository root


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "window-geometry",
        "the model-input window sits one row lower than the official rule",
        "data/preprocessing.py",
        "    top = center_row - win_h // 2\n",
        "    top = center_row - win_h // 2 + 1\n",
        (
            "tests/data/test_data_preprocessing.py",
            "tests/data/test_data_preprocessing_official.py::test_model_input_matches_official",
        ),
    ),
    Mutation(
        "flip-rule",
        "left views are mirrored instead of right views",
        "data/preprocessing.py",
        '    return (side == "R") if flip == "NO" else (side == "L")\n',
        '    return (side == "L") if flip == "NO" else (side == "R")\n',
        ("tests/data/test_data_preprocessing.py",),
    ),
    Mutation(
        "top-t-pooling",
        "top-t pooling divides the top-k sum by every position (a scaled GAP)",
        "models/roi.py",
        "    return flat.topk(k, dim=2, sorted=False).values.mean(dim=2)\n",
        "    return flat.topk(k, dim=2, sorted=False).values.sum(dim=2) / (h * w)\n",
        ("tests/models/test_roi.py", "tests/models/test_conformance.py::test_outputs_match_reference"),
    ),
    Mutation(
        "bn-eps",
        "the global network's last BatchNorm uses eps 2e-5 instead of 1e-5 (a porting slip; outputs move ~1e-6)",
        "models/resnet.py",
        "        self.final_bn = nn.BatchNorm2d(in_ch)\n",
        "        self.final_bn = nn.BatchNorm2d(in_ch, eps=2e-5)\n",
        ("tests/models/test_conformance.py::test_outputs_match_reference",),
    ),
    Mutation(
        "patch-placement",
        "grid-to-pixel mapping floors instead of rounding",
        "models/roi.py",
        "    pixels = torch.round(prop * size).long()\n",
        "    pixels = torch.floor(prop * size).long()\n",
        ("tests/models/test_roi.py", "tests/models/test_conformance.py::test_patch_locations_exact"),
    ),
    Mutation(
        "crop-border",
        "patches leaving the image are filled from the start instead of the end",
        "models/roi.py",
        "    src = lo.unsqueeze(-1) + i - origin.unsqueeze(-1)  # (..., size)\n",
        "    src = lo.unsqueeze(-1) + i  # (..., size)\n",
        ("tests/models/test_roi.py",),
    ),
    Mutation(
        "attention-normalisation",
        "gated attention weights through a sigmoid instead of a softmax over the K patches",
        "models/gmic.py",
        "            alpha = scores.softmax(dim=1)\n",
        "            alpha = scores.sigmoid()\n",
        (
            "tests/models/test_gmic.py",
            "tests/models/test_conformance.py::test_local_branch_from_recorded_patches",
        ),
    ),
    Mutation(
        "breast-aggregation",
        "breast score = mean of its images instead of the mean of per-view means",
        "evaluation/aggregation.py",
        "            row[col] = float(per_view.mean())\n",
        '            row[col] = float(pd.to_numeric(part[col], errors="coerce").mean())\n',
        ("tests/evaluation/test_aggregation.py",),
    ),
    Mutation(
        "auroc-ties",
        "tied scores count as losses in AUROC instead of one half",
        "evaluation/metrics.py",
        "        roc = np.sum(np.diff(fpr0, axis=1) * (tpr0[:, 1:] + tpr0[:, :-1]) / 2.0, axis=1)\n",
        "        roc = np.sum(np.diff(fpr0, axis=1) * tpr0[:, :-1], axis=1)\n",
        ("tests/evaluation/test_metrics.py",),
    ),
    Mutation(
        "bootstrap-indexing",
        "bootstrap resamples are scattered into the wrong rows of the weight matrix",
        "evaluation/metrics.py",
        "    flat = (idx + (np.arange(count) * n)[:, None]).ravel()\n",
        "    flat = (idx + np.arange(count)[:, None]).ravel()\n",
        ("tests/evaluation/test_metrics.py",),
    ),
    Mutation(
        "bootstrap-ci-index",
        "the CI's lower bound is read one order statistic too high",
        "evaluation/metrics.py",
        "    return min(int(alpha / 2 * n), n - 1), min(int((1 - alpha / 2) * n), n - 1)\n",
        "    return min(int(alpha / 2 * n) + 1, n - 1), min(int((1 - alpha / 2) * n), n - 1)\n",
        ("tests/evaluation/test_metrics.py", "tests/evaluation/test_evaluate_cli.py::test_evaluate_by_hand"),
    ),
    Mutation(
        "paired-p-value",
        "resampled differences of exactly 0 are left out of the paired p-value",
        "evaluation/metrics.py",
        "    p = min(1.0, 2.0 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))\n",
        "    p = min(1.0, 2.0 * min(float(np.mean(d < 0)), float(np.mean(d > 0))))\n",
        ("tests/evaluation/test_metrics.py", "tests/evaluation/test_evaluate_cli.py::test_evaluate_by_hand"),
    ),
    Mutation(
        "operating-point",
        "sensitivity/specificity call score > threshold positive instead of >=",
        "evaluation/metrics.py",
        "    called = s[None, :] >= t[:, None]  # (T, n)\n",
        "    called = s[None, :] > t[:, None]  # (T, n)\n",
        ("tests/evaluation/test_metrics.py", "tests/evaluation/test_evaluate_cli.py::test_evaluate_by_hand"),
    ),
    Mutation(
        "resume-bookkeeping",
        "on resume the log row of the checkpoint's own step is dropped",
        "training/loop.py",
        '        keep = [r for r in rows if r.get(self.key, "") != "" and int(float(r[self.key])) <= value]\n',
        '        keep = [r for r in rows if r.get(self.key, "") != "" and int(float(r[self.key])) < value]\n',
        ("tests/training/test_training_loop.py::test_resume_after_interruption_equals_uninterrupted_run",),
    ),
    Mutation(
        "checkpoint-key-map",
        "the official attention gates V and U are loaded into each other (same shapes, no load error)",
        "models/checkpoint.py",
        '    (r"^mil_attn_([VUw])\\.", r"attention.\\1."),\n',
        '    (r"^mil_attn_V\\.", "attention.U."), (r"^mil_attn_U\\.", "attention.V."), (r"^mil_attn_w\\.", "attention.w."),\n',
        (
            "tests/models/test_checkpoint.py",
            "tests/cli/test_model_cmds.py::test_convert_official_fixture_round_trip",
        ),
    ),
    Mutation(
        "official-export-buffers",
        "the official export writes parameters only (BatchNorm running statistics lost)",
        "models/checkpoint.py",
        "    for key, value in model.state_dict().items():\n        name = ours_to_official(key)\n",
        "    for key, value in model.named_parameters():\n        name = ours_to_official(key)\n",
        ("tests/cli/test_model_cmds.py::test_convert_both_ways_and_refuse_overwrite",),
    ),
    Mutation(
        "tta-averaging",
        "predict keeps the first TTA window instead of the mean of all windows",
        "evaluation/inference.py",
        "                per_image = torch.stack([chunk.mean(0) for chunk in torch.split(pred, counts)])\n",
        "                per_image = torch.stack([chunk[0] for chunk in torch.split(pred, counts)])\n",
        ("tests/evaluation/test_predict_cli.py::test_predict_tta_and_ensemble_equal_the_windows_by_hand",),
    ),
    Mutation(
        "ensemble-averaging",
        "predict reports the last ensemble member instead of the members' mean",
        "evaluation/inference.py",
        "            probs = (probs_sum / len(members)).tolist()\n",
        "            probs = per_image.tolist()\n",
        ("tests/evaluation/test_predict_cli.py::test_predict_tta_and_ensemble_equal_the_windows_by_hand",),
    ),
    Mutation(
        "training-tta",
        "the trainer tests with one window whatever data.tta says",
        "training/loop.py",
        "            tta=cfg.data.tta,\n",
        "            tta=1,\n",
        ("tests/training/test_train_predict_pipeline.py::test_training_tta_is_predicts_tta",),
    ),
    Mutation(
        "label-level",
        "label_level: breast is ignored by the dataset (image labels used)",
        "data/dataset.py",
        "        self.labels = np.array([item.labels(label_level) for item in self.items], dtype=np.float32).reshape(\n",
        '        self.labels = np.array([item.labels("image") for item in self.items], dtype=np.float32).reshape(\n',
        ("tests/training/test_train_predict_pipeline.py::test_label_level_breast",),
    ),
    Mutation(
        "keep-top-k",
        "top_k/ keeps the worst epochs",
        "training/loop.py",
        "        entries.sort(key=lambda e: e[0], reverse=higher)\n",
        "        entries.sort(key=lambda e: e[0], reverse=not higher)\n",
        ("tests/training/test_training_paths.py::test_keep_top_k_holds_the_k_best_epochs",),
    ),
    Mutation(
        "activation-checkpointing",
        "runtime.activation_checkpointing silently does nothing",
        "training/loop.py",
        "        if torch.is_grad_enabled():\n",
        "        if False:\n",
        ("tests/training/test_training_paths.py::test_activation_checkpointing_same_outputs_and_gradients",),
    ),
    Mutation(
        "channels-last-ignored",
        "runtime.channels_last silently keeps the NCHW layout",
        "training/loop.py",
        "            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]\n",
        "            pass\n",
        ("tests/training/test_training_paths.py::test_channels_last_step_equals_nchw",),
    ),
    Mutation(
        "amp-ignored",
        "runtime.amp: bf16 silently trains in float32",
        "training/loop.py",
        '    if amp == "none":\n        return contextlib.nullcontext()\n',
        "    if True:\n        return contextlib.nullcontext()\n",
        ("tests/training/test_training_paths.py::test_bf16_step_runs_is_finite_and_reproducible",),
    ),
    Mutation(
        "eval-amp-test",
        "a bf16 run scores its test split in bf16 (predict scores its model in float32)",
        "training/loop.py",
        "            amp=cfg.runtime.eval_amp,\n            tta=cfg.data.tta,\n",
        "            amp=cfg.runtime.amp,\n            tta=cfg.data.tta,\n",
        ("tests/training/test_train_predict_pipeline.py::test_a_bf16_run_reports_what_predict_gives",),
    ),
    Mutation(
        "eval-amp-val",
        "a bf16 run selects its epoch on bf16 validation scores",
        "training/loop.py",
        "            amp=cfg.runtime.eval_amp,\n            tta=1,\n",
        "            amp=cfg.runtime.amp,\n            tta=1,\n",
        ("tests/training/test_train_predict_pipeline.py::test_a_bf16_run_reports_what_predict_gives",),
    ),
    Mutation(
        "demo-eval-amp",
        "a bf16 demo scores its test split in bf16",
        "training/demo.py",
        "        amp=config.runtime.eval_amp,\n",
        "        amp=config.runtime.amp,\n",
        ("tests/training/test_training_demo.py::test_a_bf16_demo_scores_its_test_split_as_predict_does",),
    ),
    Mutation(
        "fused-stem-layout",
        "fusing a channels-last model drops the 1-channel local stem kernel's channels-last strides",
        "models/fuse.py",
        "                summed = summed.clone(memory_format=torch.channels_last)\n",
        "                pass\n",
        ("tests/models/test_inference_layout.py",),
    ),
    Mutation(
        "strided-pool-tap",
        "the inference max pool drops its last window row/column",
        "models/resnet.py",
        "    taps = [tap(k) for k in range(3)]\n",
        "    taps = [tap(k) for k in range(2)]\n",
        ("tests/models/test_inference_layout.py",),
    ),
    Mutation(
        "bf16-lean-allocator",
        "bf16 CPU inference keeps the lean allocator (1.5x slower than the fast one)",
        "runtime.py",
        '            return AllocatorChoice("fast", huge_pages=False, keep_heap=True)\n',
        "            return AllocatorChoice(command_default)\n",
        ("tests/test_runtime.py::test_bf16_inference_on_the_cpu_runs_the_fast_profile",),
    ),
    Mutation(
        "fusion-pooling-ignored",
        "fusion_pooling: top_t silently pools with max",
        "models/gmic.py",
        '        if self.config.fusion_pooling == "top_t":\n',
        '        if self.config.fusion_pooling == "never":\n',
        ("tests/models/test_gmic.py::test_top_t_fusion_pooling_trains_every_top_cell_of_a_feature",),
    ),
    Mutation(
        "fusion-maps-detached",
        "saliency_head: fusion reads the fusion weights without letting the maps' loss train them",
        "models/gmic.py",
        "        return fusion.weight[:, : self.global_dim, None, None]\n",
        "        return fusion.weight[:, : self.global_dim, None, None].detach()\n",
        (
            "tests/models/test_gmic.py::"
            "test_fusion_saliency_head_maps_are_the_fusion_heads_class_activation_maps",
        ),
    ),
    Mutation(
        "negative-never-marked",
        "negative_marks calls every negative image unmarked, so specific_dice is the Dice whatever the maps mark",
        "evaluation/localization.py",
        "        out[i, c] = float(marked)\n",
        "        out[i, c] = 0.0\n",
        ("tests/evaluation/test_localization.py::test_negative_marks_and_specific_dice_by_hand",),
    ),
    Mutation(
        "best-dice-metric-ignored",
        "keep_best_dice keeps the Dice-best model whatever schedule.best_dice_metric says",
        "training/loop.py",
        '                dice = val.get(cfg.schedule.best_dice_metric, float("nan"))\n',
        '                dice = val.get("malignant_dice", float("nan"))\n',
        ("tests/training/test_training_loop.py::test_keep_best_dice_selects_on_best_dice_metric",),
    ),
    Mutation(
        "ablate-reads-dice-alone",
        "an ablation row takes only the Dice from the Dice-selected model, its other map figures from the AUROC one",
        "training/ablate.py",
        '        test = with_localization_figures(test, localization["test"])\n',
        '        test["malignant_dice"] = localization["test"]["malignant_dice"]\n',
        ("tests/training/test_ablate.py::test_a_row_reads_the_saliency_figures_of_the_dice_selected_model",),
    ),
    Mutation(
        "ablate-reuses-results-without-negatives",
        "a kept ablation result from before the negatives column is reused, so the column is the AUROC model's",
        "training/ablate.py",
        '        if "diverged" in result or _CURRENT_RESULT_KEY in result["test"]:\n',
        "        if True:\n",
        ("tests/training/test_ablate.py::test_a_row_reads_the_saliency_figures_of_the_dice_selected_model",),
    ),
    Mutation(
        "official-export-any-option",
        "a model with top-t fusion pooling or centred patches written as an official .p again",
        "models/checkpoint.py",
        "    if changed:\n",
        "    if False:\n",
        (
            "tests/models/test_checkpoint.py::"
            "test_options_the_official_code_lacks_are_not_written_as_official_files",
        ),
    ),
    Mutation(
        "ddp-destroy-unsynchronised",
        "train destroys its process group without the barrier after fit",
        "cli/train_cmds.py",
        "            barrier(trainer.dist)\n",
        "            pass\n",
        (
            "tests/training/test_training_ddp.py::"
            "test_ddp_cli_logs_mean_loss_evaluates_in_shards_and_prints_once",
        ),
    ),
    Mutation(
        "blob-centroid-is-peak",
        "the blob centroid offset reports the peak's",
        "evaluation/localization.py",
        "    weights = np.where(labels == labels[row, col], saliency, 0.0)\n",
        "    weights = np.where(labels == -1, saliency, 0.0) + (np.arange(saliency.size) == row * saliency.shape[1] + col).reshape(saliency.shape)\n",
        ("tests/evaluation/test_localization.py::test_lesion_centred_profile_by_hand",),
    ),
    Mutation(
        "demo-epochs-help-stale",
        "the demo's default epochs change and its --help still quotes the old number",
        "training/demo.py",
        "    epochs: int = 24\n",
        "    epochs: int = 12\n",
        ("tests/training/test_training_cli.py::test_demo_and_ablate_help_give_the_settings_defaults",),
    ),
    Mutation(
        "symmetry-at-inference-ignored",
        "saliency_symmetry: point_at_inference gives the plain maps in eval mode",
        "models/gmic.py",
        '        if symmetry == "point" or (symmetry.endswith("_at_inference") and not self.training):\n',
        '        if symmetry == "point":\n',
        (
            "tests/models/test_gmic.py::"
            "test_point_symmetric_saliency_is_equivariant_and_costs_one_more_global_pass",
        ),
    ),
    Mutation(
        "symmetry-at-inference-trains",
        "saliency_symmetry: point_at_inference symmetrises the training maps too",
        "models/gmic.py",
        '        if symmetry == "point" or (symmetry.endswith("_at_inference") and not self.training):\n',
        '        if symmetry != "none":\n',
        (
            "tests/models/test_gmic.py::"
            "test_point_symmetric_saliency_is_equivariant_and_costs_one_more_global_pass",
        ),
    ),
    Mutation(
        "symmetry-at-inference-mean",
        "saliency_symmetry: point_at_inference averages the two maps (half of a turned-only mark survives)",
        "models/gmic.py",
        "                saliency = torch.exp(torch.stack([F.logsigmoid(v) for v in views]).mean(dim=0))\n",
        "                saliency = torch.stack([torch.sigmoid(v) for v in views]).mean(dim=0)\n",
        (
            "tests/models/test_gmic.py::"
            "test_point_symmetric_saliency_is_equivariant_and_costs_one_more_global_pass",
        ),
    ),
    Mutation(
        "flips-at-inference-drops-a-view",
        "saliency_symmetry: flips_at_inference leaves out the top-bottom mirror image",
        "models/config.py",
        '    "flips_at_inference": ((-1,), (-2,), (-2, -1)),\n',
        '    "flips_at_inference": ((-1,), (-2, -1)),\n',
        ("tests/models/test_gmic.py::test_flips_at_inference_keep_what_every_mirror_image_marks",),
    ),
    Mutation(
        "reflection-ignores-dims",
        "reflect_on_cells turns the input by 180 degrees whichever axes it is asked to mirror",
        "models/roi.py",
        "    flipped = x.flip(dims)[..., shift[-2] :, shift[-1] :]\n",
        "    flipped = x.flip(-2, -1)[..., shift[-2] :, shift[-1] :]\n",
        ("tests/models/test_roi.py::test_reflection_takes_each_cell_centre_to_the_mirrored_cell",),
    ),
    Mutation(
        "fine-grid-undilated",
        "saliency_grid: fine_at_inference runs the last stage at stride 1 without dilating its later kernels",
        "models/resnet.py",
        "            elif twin.kernel_size != (1, 1):\n",
        "            elif False:\n",
        ("tests/models/test_gmic.py::test_fine_grid_is_the_trunk_on_the_input_shifted_by_half_a_cell",),
    ),
    Mutation(
        "fine-grid-trains",
        "saliency_grid: fine_at_inference reads the finer grid in training too",
        "models/gmic.py",
        '        fine = cfg.saliency_grid == "fine_at_inference" and not self.training\n',
        '        fine = cfg.saliency_grid == "fine_at_inference"\n',
        (
            "tests/models/test_gmic.py::test_fine_grid_at_inference_refines_the_maps_and_leaves_training_alone",
        ),
    ),
    Mutation(
        "fine-grid-mirrored-about-own-cells",
        "flips on the finer grid mirror the input about the network's own cell centres, not the finer grid's",
        "models/gmic.py",
        "            stride = net.stride // 2 if fine else net.stride\n",
        "            stride = net.stride\n",
        ("tests/models/test_gmic.py::test_flips_at_inference_keep_what_every_mirror_image_marks",),
    ),
    Mutation(
        "peak-cells-in-map-spacing",
        "peak_offsets counts cells of a finer map instead of the network's cells it was given",
        "evaluation/localization.py",
        "        (sy, sx) if cell_px is None else (float(cell_px), float(cell_px)),\n",
        "        (sy, sx),\n",
        ("tests/evaluation/test_localization.py::test_peak_offsets_by_hand",),
    ),
    Mutation(
        "ablate-ks-ignored",
        "ablate --ks parsed but the default K sweep run",
        "cli/train_cmds.py",
        "        settings = AblationSettings(seeds=seeds, groups=groups, ks=ks)\n",
        "        settings = AblationSettings(seeds=seeds, groups=groups)\n",
        (
            "tests/training/test_training_cli.py::"
            "test_ablate_passes_given_settings_and_keeps_the_demo_defaults",
        ),
    ),
    Mutation(
        "demo-zero-exams",
        "demo --exams 0 accepted again",
        "cli/train_cmds.py",
        '    d.add_argument("--exams", type=positive_int, default=None, help="synthetic exams (default 600)")\n',
        '    d.add_argument("--exams", type=int, default=None, help="synthetic exams (default 600)")\n',
        ("tests/training/test_training_cli.py::test_demo_refuses_counts_below_one",),
    ),
    Mutation(
        "prepare-no-masks",
        "prepare --no-masks silently ignored",
        "cli/data_cmds.py",
        '        options["masks"] = not args.no_masks\n',
        '        options["masks"] = True\n',
        ("tests/data/test_data_adapters.py::test_cbis_ddsm_no_masks",),
    ),
    Mutation(
        "nyu-images",
        "prepare nyu --images silently ignored",
        "data/adapters.py",
        '    folders = [images] if images is not None else [pickle_path.parent, pickle_path.parent / "images"]\n',
        '    folders = [pickle_path.parent, pickle_path.parent / "images"]\n',
        ("tests/data/test_data_adapters.py::test_nyu_images_folder",),
    ),
    Mutation(
        "jemalloc-preload-leaks",
        "the restarted process keeps jemalloc in LD_PRELOAD for the programs it starts",
        "runtime.py",
        '            os.environ.pop("LD_PRELOAD", None)\n',
        "            pass\n",
        ("tests/test_runtime.py::test_restarted_process_gives_children_the_users_preload",),
    ),
    Mutation(
        "bf16-cast-copies-again",
        "bf16 preparation casts a second float32 copy of the fused model (56 MiB more at predict's load peak)",
        "models/fuse.py",
        "        model = cast_for_bf16(model, copy_model=not fuse)",
        "        model = cast_for_bf16(model)",
        ("tests/models/test_inference_layout.py::test_bf16_preparation_copies_the_float32_model_once",),
    ),
    Mutation(
        "jemalloc-conf-dropped",
        "the command restarted on jemalloc runs jemalloc's own settings (a separate arena for big blocks)",
        "runtime.py",
        '    if "MALLOC_CONF" not in env:\n',
        "    if False:\n",
        ("tests/test_runtime.py::test_restarted_process_runs_jemalloc_with_our_settings_unless_the_users",),
    ),
    Mutation(
        "jemalloc-conf-leaks",
        "the restarted process keeps our MALLOC_CONF for the programs it starts",
        "runtime.py",
        '            os.environ.pop("MALLOC_CONF", None)\n',
        "            pass\n",
        ("tests/test_runtime.py::test_restarted_process_runs_jemalloc_with_our_settings_unless_the_users",),
    ),
    Mutation(
        "float32-inference-on-lean",
        "float32 inference stays on lean where jemalloc is installed",
        "runtime.py",
        '        if command_default == "lean" and jemalloc():\n',
        "        if False:\n",
        (
            "tests/test_runtime.py::test_float32_inference_runs_jemalloc_where_the_command_can_restart_on_it",
            "tests/evaluation/test_predict_cli.py::test_float32_predict_runs_on_jemalloc_where_it_is_installed",
        ),
    ),
    Mutation(
        "jemalloc-default-fails-hard",
        "a command on jemalloc by default fails where the dynamic loader refuses it, instead of running on lean",
        "cli/main.py",
        "        if args.allocator:  # asked for: say why it cannot be had\n",
        "        if True:\n",
        (
            "tests/evaluation/test_predict_cli.py::test_float32_predict_runs_on_jemalloc_where_it_is_installed",
        ),
    ),
    Mutation(
        "jemalloc-never-checked",
        "the malloc in use is assumed from the profile instead of read from the process's maps",
        "runtime.py",
        '    names = ["/libjemalloc"] + ([os.path.realpath(chosen)] if chosen else [])\n',
        '    names = [""]\n',
        (
            "tests/test_runtime.py::test_jemalloc_profile_restarts_the_command_on_jemalloc",
            "tests/test_runtime.py::test_jemalloc_profile_says_what_is_wrong",
        ),
    ),
    Mutation(
        "bf16-epilogues-never-on",
        "the bf16 inference model keeps separate ReLU and residual-add passes",
        "models/fuse.py",
        "                    module.fused_epilogues = True\n",
        "                    module.fused_epilogues = False\n",
        ("tests/models/test_inference_layout.py::test_fused_epilogues_run_and_give_the_eager_result",),
    ),
    Mutation(
        "epilogues-on-nchw",
        "NCHW tensors take the post-op path (bf16 add + ReLU then fails inside oneDNN's fallback)",
        "models/resnet.py",
        "        and x.is_contiguous(memory_format=torch.channels_last)\n",
        "        and True\n",
        ("tests/models/test_inference_layout.py::test_epilogues_stay_out_of_training_autocast_and_tracing",),
    ),
    Mutation(
        "pool-strided-under-autograd",
        "the index-free max pool also runs in a training step, whose backward then splits a tie's gradient",
        "models/resnet.py",
        "        if torch.is_grad_enabled() and x.requires_grad:\n",
        "        if False:\n",
        (
            "tests/models/test_inference_layout.py::test_max_pool_trains_with_atens_values_and_gradients",
            "tests/models/test_inference_layout.py::test_every_backbone_pools_with_the_strided_max_and_trains_as_before",
        ),
    ),
    Mutation(
        "global-stem-pools-with-aten",
        "the trainable global network pools with ATen's indexing kernel again (validation 20% slower)",
        "models/resnet.py",
        "        self.stem_pool = MaxPool3x3s2()\n",
        "        self.stem_pool = nn.MaxPool2d(3, 2)\n",
        (
            "tests/models/test_inference_layout.py::test_every_backbone_pools_with_the_strided_max_and_trains_as_before",
        ),
    ),
    Mutation(
        "residual-overwrites-identity",
        "a pre-activation block writes its sum into an identity shortcut, i.e. into its caller's input",
        "models/resnet.py",
        "                self.conv2, out, residual=shortcut, into_residual=self.downsample is not None\n",
        "                self.conv2, out, residual=shortcut, into_residual=True\n",
        (
            "tests/models/test_inference_layout.py::test_epilogue_into_the_residual_gives_the_same_values_in_its_buffer",
        ),
    ),
    Mutation(
        "training-pool-skips-channels-last",
        "a training step pools NCHW inputs with ATen's NCHW kernel again (2.3-4.5x slower pooling)",
        "models/resnet.py",
        '            if nchw and x.device.type == "cpu" and not torch.compiler.is_compiling():\n',
        "            if False:\n",
        ("tests/models/test_inference_layout.py::test_max_pool_trains_with_atens_values_and_gradients",),
    ),
    Mutation(
        "validation-scores-the-plain-model",
        "validation ranks epochs on the unfused model, not on what predict runs",
        "training/loop.py",
        "            scoring_copy(model),\n",
        "            model,\n",
        (
            "tests/training/test_train_predict_pipeline.py::test_validation_and_test_score_with_predicts_model",
        ),
    ),
    Mutation(
        "test-pass-scores-the-plain-model",
        "the trainer's test pass scores the unfused model, not what predict runs",
        "training/loop.py",
        "            scoring_copy(r.model),\n",
        "            r.model,\n",
        (
            "tests/training/test_train_predict_pipeline.py::test_validation_and_test_score_with_predicts_model",
        ),
    ),
    Mutation(
        "demo-scores-the-plain-model",
        "the demo reports the unfused model's scores, not predict's",
        "training/demo.py",
        "    model = scoring_copy(model)  # what `mammogmic predict` runs for these weights\n",
        "    model.eval()\n",
        ("tests/training/test_training_demo.py::test_a_bf16_demo_scores_its_test_split_as_predict_does",),
    ),
    Mutation(
        "dice-only-first-lesion-class",
        "Dice skips the second class of an image whose two classes both have a lesion",
        "evaluation/localization.py",
        "        classes = np.flatnonzero(wanted[i])\n",
        "        classes = np.flatnonzero(wanted[i])[:1]\n",
        (
            "tests/evaluation/test_localization.py::test_dice_of_the_classes_with_a_lesion_only_equals_dice_of_every_class",
        ),
    ),
    Mutation(
        "bf16-predict-heap-not-kept",
        "predict --amp bf16 never keeps its heap (the allocator choice is ignored by the model loader)",
        "cli/eval_cmds.py",
        '    if choice is not None and choice.keep_heap and device == "cpu":\n',
        "    if False:\n",
        ("tests/evaluation/test_predict_cli.py::test_predict_manifest_labels_ensemble_tta",),
    ),
    Mutation(
        "heap-kept-for-every-command",
        "every command keeps its heap, float32 inference and training included",
        "runtime.py",
        "    return AllocatorChoice(command_default)\n",
        "    return AllocatorChoice(command_default, keep_heap=True)\n",
        ("tests/test_runtime.py::test_bf16_inference_on_the_cpu_runs_the_fast_profile",),
    ),
    Mutation(
        "keep-heap-trims",
        "keep_freed_heap sets the mmap threshold only: glibc still gives freed heap back",
        "runtime.py",
        "    return _mallopt({_M_MMAP_THRESHOLD: mmap_threshold, _M_TRIM_THRESHOLD: trim_threshold})\n",
        "    return _mallopt({_M_MMAP_THRESHOLD: mmap_threshold})\n",
        ("tests/test_runtime.py::test_a_kept_heap_keeps_what_is_freed",),
    ),
    Mutation(
        "ablation-legend-in-panel",
        "the ablation picture's legend sits in the AUROC panel's lower left again",
        "visualization/ablation.py",
        '    fig.legend(handles, labels, loc="lower center", ncols=max(1, len(labels)), fontsize=7, frameon=False)\n',
        '    axes[0].legend(loc="lower left", fontsize=7)\n',
        ("tests/training/test_ablate.py::test_ablation_picture_legend_hides_no_dot",),
    ),
    Mutation(
        "help-description-double-percent",
        "a command's description writes top-t%% (argparse prints it doubled)",
        "cli/train_cmds.py",
        "saliency vs random patches, top-t% vs GAP vs GMP, ",
        "saliency vs random patches, top-t%% vs GAP vs GMP, ",
        ("tests/cli/test_vocabulary.py::test_help_texts_render_their_percent_signs",),
    ),
    Mutation(
        "into-residual-ignored",
        "into_residual allocates a new output anyway (the bf16 peak keeps its fifth activation)",
        "models/resnet.py",
        "    if into_residual:\n",
        "    if False:\n",
        (
            "tests/models/test_inference_layout.py::test_epilogue_into_the_residual_gives_the_same_values_in_its_buffer",
        ),
    ),
)


def run_one(mutation: Mutation, timeout: int, tests: tuple[str, ...] = ()) -> dict[str, object]:
    """Apply ``mutation``, run its tests (or ``tests``), restore the file (always); the outcome as a dict."""
    path = SRC / mutation.path
    original = path.read_bytes()
    text = original.decode("utf-8")
    count = text.count(mutation.old)
    if count != 1:
        return {"name": mutation.name, "status": "error", "detail": f"{path}: target found {count} times"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:xdist", "-p", "no:cacheprovider"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    started = time.perf_counter()
    try:
        path.write_text(text.replace(mutation.old, mutation.new), encoding="utf-8")
        try:
            proc = subprocess.run(
                [*command, *(tests or mutation.tests)],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return {"name": mutation.name, "status": "error", "detail": f"timed out after {timeout} s"}
    finally:
        path.write_bytes(original)
    seconds = round(time.perf_counter() - started, 1)
    failed = re.findall(r"^FAILED (\S+)", proc.stdout, flags=re.MULTILINE)
    errors = re.findall(r"^ERROR (\S+)", proc.stdout, flags=re.MULTILINE)
    if proc.returncode == 1 and (failed or errors):
        status = "caught"
    elif proc.returncode == 0:
        status = "missed"
    else:
        status = "error"
    tail = (
        proc.stdout.strip().splitlines()[-1:]
        if proc.stdout.strip()
        else proc.stderr.strip().splitlines()[-1:]
    )
    return {
        "name": mutation.name,
        "status": status,
        "caught_by": failed + errors,
        "seconds": seconds,
        "summary": tail[0] if tail else "",
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Break core behaviour one line at a time; report caught/missed."
    )
    parser.add_argument("--only", default="", help="comma-separated mutation names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per mutation (default 1800)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--tests",
        nargs="+",
        default=(),
        metavar="NODE",
        help="run these tests instead of each mutation's own",
    )
    args = parser.parse_args()
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:26s} {m.path:28s} {m.what}")
        return 0
    chosen = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(chosen) - {m.name for m in MUTATIONS})
    if unknown:
        print(f"error: unknown mutation(s) {unknown}; see --list", file=sys.stderr)
        return 2
    results = []
    for mutation in MUTATIONS:
        if chosen and mutation.name not in chosen:
            continue
        result = run_one(mutation, args.timeout, tuple(args.tests))
        results.append(result)
        caught = ", ".join(result.get("caught_by", [])) or result.get("detail", result.get("summary", ""))
        print(f"{result['status']:7s} {mutation.name:26s} {caught}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    missed = [r["name"] for r in results if r["status"] != "caught"]
    print(
        f"{len(results) - len(missed)} of {len(results)} caught"
        + (f"; not caught: {missed}" if missed else "")
    )
    return 0 if not missed else 1


if __name__ == "__main__":
    raise SystemExit(main())
