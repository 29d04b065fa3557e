"""DMV-CNN commands: ``heatmaps`` (benign/malignant heat maps from the patch classifier)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from mammogmic.cli import progress_bar
from mammogmic.runtime import AMP_MODES

logger = logging.getLogger(__name__)

HEATMAPS_EPILOG = """\
Examples:
  mammogmic heatmaps scans/ --model sample_patch_model.p --out heatmaps/
  mammogmic heatmaps --manifest test.csv --model patch.safetensors --out heatmaps/ --device cuda --amp bf16

Inputs as for predict: folders (searched recursively for .png/.dcm/.dicom), files, and/or --manifest CSV
(rows with the preprocess cache columns cached_path + best_center skip the crop). Each image is cropped as
for GMIC, turned to face right, standardised, and cut into 256x256 patches at stride 70 (a classifier trained
by mammogmic train: the patch size, stride and crop it was trained with, stored in its file), the last patch
flush with the border; which steps shrink by one pixel is drawn from one random.Random(--seed) for the run,
image after image in input order, rows then columns: give the images exam by exam, L-CC, R-CC, L-MLO, R-MLO
to replay the official run. A pixel's probability is the mean over the patches covering it.

Outputs (in --out): <image_id>.npz with float32 arrays benign and malignant at the cropped image's size, in
the orientation of the cropped image as stored (what predict --heatmaps reads), plus the grid and the
settings; errors.csv (image_id, path, stage, error); run.json. A rerun skips images whose .npz was made with
the same model file (sha256) and settings, and replaces the others.
Exit status: 0 when every image worked, 1 when some failed (see errors.csv), 2 on bad arguments.
"""

_NPZ_SETTINGS = ("model_sha256", "patch_size", "stride", "seed", "amp")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "heatmaps",
        help="DMV-CNN's benign and malignant heat maps (patch classifier over 256x256 patches)",
        description="Make the benign and malignant heat maps of DMV-CNN's patch classifier for each image.",
        epilog=HEATMAPS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", type=Path, metavar="INPUT", help="image files and/or folders")
    p.add_argument("--manifest", type=Path, help="manifest CSV listing the images")
    p.add_argument(
        "--model",
        type=Path,
        required=True,
        help="the patch classifier: an official .p file (sample_patch_model.p) or our .safetensors",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="patch stride before the flush adjustment (default: the model's; official files 70)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="patches per forward pass (64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stride draws (official: 0)")
    p.add_argument(
        "--crop-iterations",
        type=int,
        default=None,
        help="breast-crop morphology iterations (default: the model's; official files 100)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument(
        "--amp",
        choices=AMP_MODES,
        default="none",
        help="bf16 autocast: faster where the hardware has bf16, maps differ by ~1e-2 (default none: float32, "
        "the official maps to 1e-6; auto: bf16 where the device computes it natively)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_heatmaps)


def _load_patch_model(path: Path, device: str) -> Any:
    import torch

    from mammogmic.errors import CheckpointError
    from mammogmic.models import PatchClassifier, load_model, load_official_patch_classifier

    if path.suffix == ".p":
        model = load_official_patch_classifier(path)
    else:
        loaded = load_model(path)
        if not isinstance(loaded, PatchClassifier):
            raise CheckpointError(f"{path}: a {type(loaded).__name__} model, not a patch classifier")
        model = loaded
    # channels-last: about 1.3x faster on CPU (oneDNN), same maps to float32 rounding.
    return model.to(device).to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]


def patch_model_grid(path: Path) -> tuple[int, int, Any]:
    """``(patch size, stride, input contract)`` a patch classifier's heat maps are made with: the official
    256, 70 and pipeline for ``.p`` files; for ours what training stored (``heatmap_grid``, ``input_contract``),
    else the official values."""
    from mammogmic.data.sample import OFFICIAL_CONTRACT
    from mammogmic.errors import CheckpointError
    from mammogmic.evaluation.heatmaps import PATCH_SIZE, PATCH_STRIDE
    from mammogmic.evaluation.inference import model_contract
    from mammogmic.models import read_model_metadata

    if path.suffix == ".p":
        return PATCH_SIZE, PATCH_STRIDE, OFFICIAL_CONTRACT
    grid = (read_model_metadata(path).get("extra") or {}).get("heatmap_grid") or {}
    size, stride = grid.get("patch_size", PATCH_SIZE), grid.get("stride", PATCH_STRIDE)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (size, stride)):
        raise CheckpointError(f"{path}: bad heatmap_grid in the model metadata: {grid!r}")
    return size, stride, model_contract(path)


def _previous_settings(path: Path) -> tuple[dict[str, str], tuple[int, int]] | None:
    """Settings and map shape of an earlier output, or ``None`` when it is missing or unreadable."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            settings = {k: str(data[k]) for k in _NPZ_SETTINGS}
            shape = tuple(int(n) for n in data["benign"].shape)
    except (OSError, ValueError, KeyError):
        return None
    if len(shape) != 2:
        return None
    return settings, (shape[0], shape[1])


def _check_outputs(args: argparse.Namespace, items: list[Any], targets: list[Path]) -> None:
    """Refuse an --out where an output would land on an input (image, cache, manifest, model)."""
    from mammogmic.errors import MammogmicError

    if args.out.exists() and not args.out.is_dir():
        raise MammogmicError(f"{args.out}: --out must be a folder, and this is an existing file")
    protected = {args.model.resolve()}
    if args.manifest:
        protected.add(args.manifest.resolve())
    for item in items:
        for path in (item.path, item.cached_path):
            if path is not None:
                protected.add(Path(path).resolve())
    outputs = {t.resolve() for t in targets} | {(args.out / n).resolve() for n in ("errors.csv", "run.json")}
    clash = sorted(str(p) for p in protected & outputs)
    if args.out.resolve() in protected or clash:
        raise MammogmicError(
            f"{args.out}: outputs would overwrite input file(s) {clash[:3] or [str(args.out)]}; choose another --out"
        )


def run_heatmaps(args: argparse.Namespace) -> int:
    """Entry point of ``mammogmic heatmaps``."""
    import dataclasses
    import random

    import numpy as np
    import pandas as pd

    from mammogmic.cli.eval_cmds import _collect_items, _resolve_device
    from mammogmic.data.cache import sha256_file
    from mammogmic.data.sample import SampleError, heatmap_file, load_source
    from mammogmic.errors import MammogmicError
    from mammogmic.evaluation.heatmaps import patch_grid, produce_heatmaps
    from mammogmic.evaluation.outputs import atomic_write_text, escape_csv_text
    from mammogmic.models.checkpoint import _atomic_write
    from mammogmic.runtime import resolve_amp

    try:
        if (args.stride is not None and args.stride < 1) or args.batch_size < 1:
            raise MammogmicError(
                f"--stride and --batch-size must be positive, got {args.stride}, {args.batch_size}"
            )
        items = _collect_items(args)
        targets = [heatmap_file(args.out, item.image_id) for item in items]
        _check_outputs(args, items, targets)
        device = _resolve_device(args.device)
        amp = resolve_amp(args.amp, device)  # stored resolved: a rerun compares what was computed
        model = _load_patch_model(args.model, device)
        digest = sha256_file(args.model)
        patch_size, stride, contract = patch_model_grid(args.model)
        stride = stride if args.stride is None else args.stride
        # the heat maps lie on the cropped image: its crop is the model's (crop settings only, no heat maps)
        contract = dataclasses.replace(contract, heatmaps=False)
        if args.crop_iterations is not None:
            contract = dataclasses.replace(contract, crop_iterations=args.crop_iterations)
    except (MammogmicError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {
        "model_sha256": digest,
        "patch_size": str(patch_size),
        "stride": str(stride),
        "seed": str(args.seed),
        "amp": amp,
    }
    rng = random.Random(args.seed)
    errors: list[dict[str, str]] = []
    done: dict[str, float] = {}
    skipped = 0
    start = time.perf_counter()
    bar = progress_bar(len(items), no_progress=args.no_progress, unit="img", desc="heatmaps")

    def fail(item: Any, stage: str, message: str) -> None:
        errors.append({"image_id": item.image_id, "path": str(item.path), "stage": stage, "error": message})
        logger.warning("skipped image %s: %s", item.image_id, message)
        bar.update(1)

    for item, target in zip(items, targets, strict=True):
        previous = _previous_settings(target) if target.exists() else None
        if previous is not None and previous[0] == settings:
            # Done already: replay the draws its grid took, so that the next images get theirs.
            patch_grid(previous[1], rng, patch_size, stride)
            skipped += 1
            bar.update(1)
            continue
        t0 = time.perf_counter()
        try:
            source = load_source(item, contract, heatmaps=False)
            patches = [0]

            def progress(n: int, name: str = item.image_id[-30:], patches: list[int] = patches) -> None:
                patches[0] += n
                bar.set_postfix_str(f"{name}: {patches[0]} patches")

            progress(0)
            maps = produce_heatmaps(
                model,
                source.cropped,
                source.view,
                rng,
                horizontal_flip=source.horizontal_flip,
                patch=patch_size,
                stride=stride,
                batch_size=args.batch_size,
                amp=amp,
                progress=progress,
            )
        except SampleError as exc:
            fail(item, exc.stage, str(exc))
            continue
        except ValueError as exc:  # e.g. an image smaller than a patch
            fail(item, "heatmaps", f"{item.path}: {exc}")
            continue
        arrays = {
            "benign": maps.benign,
            "malignant": maps.malignant,
            "row_starts": maps.grid.rows,
            "col_starts": maps.grid.cols,
            "view": np.asarray(source.view),
            **{k: np.asarray(v) for k, v in settings.items()},
        }

        def write(tmp: str, arrays: dict[str, np.ndarray] = arrays) -> None:
            with open(tmp, "wb") as handle:  # a file object: numpy adds no ".npz" to the temporary name
                np.savez(handle, **arrays)  # type: ignore[arg-type]

        if target.exists():
            logger.info("%s: replacing heat maps made with another model or settings", target)
        _atomic_write(target, write)
        done[item.image_id] = round(time.perf_counter() - t0, 3)
        bar.update(1)
    bar.close()
    table = pd.DataFrame(errors, columns=["image_id", "path", "stage", "error"])
    atomic_write_text(args.out / "errors.csv", table.map(escape_csv_text).to_csv(index=False))
    info = {
        "model": str(args.model),
        **settings,
        "crop_iterations": contract.crop_iterations,
        "device": device,
        "batch_size": args.batch_size,
        "n_inputs": len(items),
        "n_already_done": skipped,
        "n_done_now": len(done),
        "n_errors": len(errors),
        "seconds": round(time.perf_counter() - start, 3),
        "seconds_per_image": done,
    }
    atomic_write_text(args.out / "run.json", json.dumps(info, indent=2) + "\n")
    print(
        f"{len(done)} image(s) mapped, {skipped} already done, {len(errors)} failed; outputs in {args.out}",
    )
    return 1 if errors else 0


# --------------------------------------------------------------------------------------------------
# predict with DMV-CNN models (called by ``mammogmic predict`` when its models are DMV-CNN files)

_GMIC_ONLY = {
    "percent_t": "--percent-t",
    "input_size": "--input-size",
    "window_size": "--window-size",
    "save_saliency": "--save-saliency",
    "save_patches": "--save-patches",
    "compile": "--compile",
}
_DMV_OUTPUTS = ("breast_predictions.csv", "breast_predictions_metarepository.csv", "errors.csv", "run.json")


def attach_heatmap_folder(args: argparse.Namespace, items: list[Any], needs: list[str]) -> None:
    """``--heatmaps DIR``: each image's heat-map file is ``DIR/<image_id>.npz`` (a manifest's ``heatmap_path``
    column wins). ``needs`` names the models that take heat-map channels: they are refused without maps, and
    ``--heatmaps`` without such a model is refused too.

    Raises:
        MammogmicError: naming the models or the folder.
    """
    from mammogmic.data.sample import attach_heatmaps
    from mammogmic.errors import MammogmicError

    folder = getattr(args, "heatmaps", None)
    if folder is not None and not needs:
        raise MammogmicError(
            f"--heatmaps {folder}: none of the models takes heat maps (GMIC with in_channels 3 and DMV-CNN's "
            "image + heat-maps models do)"
        )
    if folder is not None and not folder.is_dir():
        raise MammogmicError(f"--heatmaps {folder}: not a folder")
    if needs and folder is None and any(item.heatmap_path is None for item in items):
        raise MammogmicError(
            f"model(s) {', '.join(needs)} take the image and its benign and malignant heat maps as input "
            "channels: pass --heatmaps DIR (made by mammogmic heatmaps) or give the manifest a heatmap_path "
            "column"
        )
    attach_heatmaps(items, folder)


def dmv_models_given(args: argparse.Namespace) -> bool:
    """Whether any of ``predict``'s models is a DMV-CNN file (then predict works per exam; GMIC models given
    with it join a mixed ensemble, averaged per breast)."""
    from mammogmic.evaluation.dmv import is_dmv_file

    return any(is_dmv_file(path) for path in args.models)


def _previous_breasts(path: Path, overwrite: bool) -> Any:
    """Breast rows of an earlier DMV-CNN run in the same --out (kept unless ``overwrite``)."""
    import pandas as pd

    from mammogmic.evaluation.outputs import unescape_csv_text

    if overwrite or not path.exists():
        return None
    ids = {c: str for c in ("breast_id", "exam_id", "patient_id", "laterality")}
    table = pd.read_csv(path, dtype=ids)
    for col in ids:
        if col in table.columns:
            table[col] = table[col].map(unescape_csv_text)
    return table


def run_dmv_predict(args: argparse.Namespace) -> int:
    """``mammogmic predict`` with DMV-CNN models (and GMIC models with them: a mixed ensemble): one row per exam
    in breast_predictions_metarepository.csv.

    The output folder follows predict's rules (one writer at a time, our folder or a new one; ``_outdir``).
    """
    import contextlib

    with contextlib.ExitStack() as stack:
        return _run_dmv_predict(args, stack)


def gmic_tta(args: argparse.Namespace, members: list[Any]) -> int:
    """GMIC members' TTA windows: ``--tta``, else the largest of their stored defaults."""
    return int(args.tta if args.tta is not None else max(m.contract.tta for m in members))


def _gmic_images(
    args: argparse.Namespace, items: list[Any], members: list[Any], device: str, dtype: str
) -> tuple[Any, Any]:
    """The GMIC members' image predictions of a mixed ensemble (``predict_items``: GMIC predict's engine) and
    their errors."""
    from mammogmic.evaluation.inference import PrepareSettings, default_workers, predict_items

    tta = gmic_tta(args, members)
    failed: list[Any] = []
    results = predict_items(
        items,
        members,
        PrepareSettings(tta=tta, seed=args.seed),
        batch_size=args.batch_size,
        device=device,
        dtype=dtype,
        workers=default_workers() if args.workers is None else args.workers,
        on_error=failed.append,
    )
    return results, failed


def _run_dmv_predict(args: argparse.Namespace, stack: Any) -> int:
    import dataclasses

    import pandas as pd

    from mammogmic.cli.eval_cmds import (
        _apply_contract_overrides,
        _check_out_folder,
        _collect_items,
        _load_members,
        _resolve_device,
        _resolve_dtype,
    )
    from mammogmic.errors import MammogmicError
    from mammogmic.evaluation.aggregation import metarepository_breast_table
    from mammogmic.evaluation.dmv import (
        ExamError,
        ExamResult,
        breast_table,
        exam_of,
        is_dmv_file,
        load_dmv_member,
        predict_exams,
        with_gmic_members,
    )
    from mammogmic.evaluation.outputs import atomic_write_text, escape_csv_text

    try:
        dmv_paths = [path for path in args.models if is_dmv_file(path)]
        gmic_paths = [path for path in args.models if path not in dmv_paths]
        refused = (
            _GMIC_ONLY if not gmic_paths else {k: _GMIC_ONLY[k] for k in ("save_saliency", "save_patches")}
        )
        given = [flag for name, flag in refused.items() if getattr(args, name, None)]
        if given:
            what = (
                "GMIC options; DMV-CNN models do not take them"
                if not gmic_paths
                else "not for DMV-CNN ensembles"
            )
            raise MammogmicError(f"{', '.join(given)}: {what}")
        items = _collect_items(args)
        folder = stack.enter_context(_check_out_folder(args, "predict-dmv", items))
        if (args.out / "image_predictions.csv").exists():
            raise MammogmicError(
                f"{args.out}: holds GMIC predictions (image_predictions.csv); choose another --out"
            )
        device = _resolve_device(args.device)
        dtype = _resolve_dtype(args, device)
        members = [load_dmv_member(path, device) for path in dmv_paths]
        if args.crop_iterations is not None:
            for member in members:
                member.contract = dataclasses.replace(member.contract, crop_iterations=args.crop_iterations)
        gmic = (
            _load_members(argparse.Namespace(**{**vars(args), "models": gmic_paths}), device, dtype)
            if gmic_paths
            else []
        )
        _apply_contract_overrides(args, gmic)
        taken = {m.name for m in members}
        for i, member in enumerate(gmic):  # names label each model's columns: one per model
            if member.name in taken:
                member.name = f"{member.name}_{len(members) + i + 1}"
            taken.add(member.name)
        needs = [m.source for m in [*members, *gmic] if m.contract.heatmaps]
        attach_heatmap_folder(args, items, needs)
        tta = 1 if args.tta is None else args.tta
        previous = _previous_breasts(args.out / "breast_predictions.csv", args.overwrite)
        done = set() if previous is None else set(previous["exam_id"].astype(str))
        todo = [i for i in items if exam_of(i) not in done]
        if len(todo) < len(items):
            print(
                f"{len(items) - len(todo)} image(s) of exams already predicted in {args.out}; skipping them",
                file=sys.stderr,
            )
        errors: list[ExamError] = []
        bar = progress_bar(len(todo), no_progress=args.no_progress, unit="img", desc="predict")

        def progress(n: int) -> None:
            bar.update(n)

        start = time.perf_counter()
        results: list[ExamResult] = predict_exams(
            todo,
            members,
            tta=tta,
            seed=args.seed,
            device=device,
            dtype=dtype,
            on_error=errors.append,
            progress=progress,
        )
        bar.close()
        if gmic:  # GMIC on the images of the exams DMV-CNN predicted, then one mean per breast
            exam_items = [item for result in results for item in result.items.values()]
            images, failed = _gmic_images(args, exam_items, gmic, device, dtype)
            errors += [ExamError(p.item, p.stage or "gmic", p.error or "") for p in failed]
            results, dropped = with_gmic_members(results, images, [m.name for m in gmic])
            errors += dropped
    except (MammogmicError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    breasts = breast_table(results)
    if previous is not None:
        breasts = pd.concat([previous, breasts], ignore_index=True)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    tables = {"breast_predictions.csv": breasts}
    if len(breasts):
        tables["breast_predictions_metarepository.csv"] = metarepository_breast_table(breasts)
    tables["errors.csv"] = pd.DataFrame(
        [
            {"image_id": e.item.image_id, "path": str(e.item.path), "stage": e.stage, "error": e.error}
            for e in errors
        ],
        columns=["image_id", "path", "stage", "error"],
    )
    folder.claim(*tables, "run.json")
    for name, table in tables.items():
        text = table.map(escape_csv_text).to_csv(index=False, float_format="%.6f")
        atomic_write_text(args.out / name, text)
        written.append(args.out / name)
    info = {
        "model_type": "dmv+gmic" if gmic else "dmv",
        "models": [
            {
                "name": m.name,
                "kind": "dmv",
                "path": m.source,
                "sha256": m.sha256,
                "config": m.model.config.to_dict(),
                "input_contract": m.contract.to_dict(),
            }
            for m in members
        ]
        + [
            {
                "name": m.name,
                "kind": "gmic",
                "path": m.source,
                "sha256": m.sha256,
                "percent_t": m.percent_t,
                "input_contract": m.contract.to_dict(),
            }
            for m in gmic
        ],
        "ensemble": "mean of every model's breast probabilities (GMIC: mean over the breast's views)"
        if gmic
        else None,
        "heatmaps": str(args.heatmaps) if args.heatmaps else None,
        "device": device,
        "dtype": dtype,
        "tta": tta,
        "tta_gmic": gmic_tta(args, gmic) if gmic else None,
        "seed": args.seed,
        "n_inputs": len(items),
        "n_run": len(todo),
        "n_exams_predicted_now": len(results),
        "n_errors": len(errors),
        "seconds": round(time.perf_counter() - start, 3),
    }
    atomic_write_text(args.out / "run.json", json.dumps(info, indent=2) + "\n")
    print(f"{len(results)} exam(s) predicted, {len(errors)} image(s) failed; outputs in {args.out}")
    for path in written:
        print(f"  {path}")
    return 1 if errors else 0
