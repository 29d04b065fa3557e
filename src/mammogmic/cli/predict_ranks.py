"""``mammogmic predict`` under ``torchrun``: every rank predicts a shard of the inputs, rank 0 merges.

``torchrun --nproc_per_node=N -m mammogmic.cli.main predict INPUTS --model M --out OUT`` (and the same on
several nodes, with ``--nnodes``/``--rdzv-endpoint`` and an ``OUT`` that every node sees):

1. Rank 0 collects the inputs and claims ``OUT`` (lock, marker, checks: :class:`~mammogmic._outdir.OutputFolder`),
   then sends the input list to the other ranks, which never touch the folder's lock. A refusal (bad input
   path, busy or foreign folder) stops every rank with rank 0's message.
2. Rank K predicts inputs ``K, K + N, K + 2N, ...`` (:func:`~mammogmic.training.distributed.shard_indices`) with
   the single-process machinery into ``OUT/parts/rank-K/`` (its own ``image_predictions.csv``, ``errors.csv``,
   ``run.json``, ``saliency/``). A part resumes like a single run (``input_key`` / ``run_key``): rerun the same
   command with the same N after a rank was killed and only what that rank had not written is predicted.
3. Rank 0 gathers the parts' rows and writes the usual outputs in ``OUT`` through the same
   :class:`~mammogmic.evaluation.outputs.PredictionWriter`, rows in input order, so that the files equal those
   of one process row for row.

Not available under ``torchrun``: DMV-CNN models, the DICOM options (``--dicom-out``, ``--dicomweb``) and
``--report``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Any

__all__ = ["PARTS_DIR", "part_folder", "run_predict_ranks", "world_size"]

PARTS_DIR = "parts"


def world_size() -> int:
    """The number of processes ``torchrun`` started (1 outside ``torchrun``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def part_folder(out: Any, rank: int) -> Any:
    """``OUT/parts/rank-K``: where rank ``rank`` writes its own predictions."""
    return out / PARTS_DIR / f"rank-{rank}"


def run_predict_ranks(args: argparse.Namespace) -> int:
    """``mammogmic predict`` as one rank of a ``torchrun`` group: rank 0 returns the run's exit status (that of one
    process), the other ranks 0."""
    import torch.distributed as dist

    from mammogmic.cli import dicom_cmds
    from mammogmic.cli.dmv_cmds import dmv_models_given
    from mammogmic.training.distributed import init_distributed

    if dmv_models_given(args) or dicom_cmds.used(args) or getattr(args, "report", False):
        if os.environ.get("RANK", "0") != "0":
            return 0  # rank 0 says why and carries the status (see _run)
        print(
            "error: DMV-CNN models, the DICOM options (--dicom-out, --dicomweb) and --report are not available "
            "under torchrun; run them in one process",
            file=sys.stderr,
        )
        return 2
    info = init_distributed(args.device)
    try:
        rc = _run(args, info)
        # The groups go together: a gloo rank that destroys its group while another still holds its own open
        # (here: rank 0 closing its output folder) aborts at exit now and then (see run_train).
        dist.barrier()
        return rc
    finally:
        dist.destroy_process_group()


def _run(args: argparse.Namespace, info: Any) -> int:
    import contextlib

    import torch.distributed as dist

    from mammogmic.cli.eval_cmds import _check_out_folder, _collect_items
    from mammogmic.errors import MammogmicError
    from mammogmic.evaluation.outputs import DERIVED_TABLES, IMAGE_CSV, RUN_JSON
    from mammogmic.training.distributed import resolve_device, shard_indices

    with contextlib.ExitStack() as stack:
        folder = None
        status: list[Any] = [None]
        if info.is_main:
            try:
                items = _collect_items(args)
                folder = stack.enter_context(_check_out_folder(args, "predict", items))
                # The merged files of an earlier run must not pass for this run's while the ranks work.
                folder.remove(RUN_JSON, IMAGE_CSV, *DERIVED_TABLES)
                folder.claim(PARTS_DIR)
                status = [("ok", items)]
            except (MammogmicError, ValueError) as exc:
                status = [("error", str(exc))]
        dist.broadcast_object_list(status, src=0)
        kind, payload = status[0]
        if kind == "error":
            if not info.is_main:
                return 0
            print(f"error: {payload}", file=sys.stderr)
            return 2
        items = payload
        mine = [items[i] for i in shard_indices(len(items), info)]

        part_args = copy.copy(args)
        part_args.out = part_folder(args.out, info.rank)
        part_args.device = str(resolve_device(args.device, info.local_rank))
        part = _predict_part(part_args, mine)
        gathered: list[Any] | None = [None] * info.world_size if info.is_main else None
        dist.gather_object(part, gathered, dst=0)

        rc = 0
        if info.is_main:
            assert gathered is not None and folder is not None
            try:
                rc = _merge(args, items, gathered, folder, info.world_size)
            except (MammogmicError, ValueError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                rc = 2
        # The other ranks wait for the merge and exit 0: torchrun stops the whole group as soon as one rank
        # fails, and its exit status is already 1 when rank 0's is not 0 (rank 0 carries the run's status).
        dist.barrier()
        return rc


def _predict_part(args: argparse.Namespace, items: list[Any]) -> dict[str, Any]:
    """Predict ``items`` into the rank's part folder; what rank 0 needs to merge (or the error)."""
    from mammogmic.cli.eval_cmds import _run_inference
    from mammogmic.errors import MammogmicError

    options = {
        "overwrite": args.overwrite,
        "save_saliency": args.save_saliency,
        "save_patches": args.save_patches,
    }
    explain = args.save_saliency or args.save_patches
    try:
        _, errors, info, writer = _run_inference(args, items, None, options, explain, False)
        writer.finish(info)
    except (MammogmicError, ValueError) as exc:
        return {"error": f"{args.out}: {exc}"}
    ids = {item.image_id for item in items}  # a part of a run with another N may hold rows of other shards
    return {
        "rows": [r for r in writer.rows if str(r["image_index"]) in ids],
        "errors": writer.errors,
        "patches": {k: v for k, v in writer.patches.items() if k in ids},
        "info": info,
        "run_key": writer.run_key,
        "settings": writer.settings,
        "counts": {
            "n_new": writer.n_new,
            "n_kept": writer.n_kept,
            "n_input_changed": writer.n_input_changed,
            "n_stale": writer.n_stale,
        },
    }


def _merge(
    args: argparse.Namespace, items: list[Any], parts: list[dict[str, Any]], folder: Any, world: int
) -> int:
    """Write the usual outputs of ``OUT`` from the ranks' parts, in input order."""
    from mammogmic._outdir import atomic_write_bytes
    from mammogmic.errors import MammogmicError
    from mammogmic.evaluation.outputs import SALIENCY_DIR, PredictionWriter, file_stem

    failed = [p["error"] for p in parts if "error" in p]
    if failed:
        raise MammogmicError("; ".join(failed))
    order = {item.image_id: i for i, item in enumerate(items)}
    first = parts[0]
    writer = PredictionWriter(
        args.out,
        overwrite=True,
        save_saliency=args.save_saliency,
        save_patches=args.save_patches,
        run_key=first["run_key"],
        settings=first["settings"],
        folder=folder,
    )
    rank_of: dict[str, int] = {}
    for rank, part in enumerate(parts):
        if part["run_key"] != first["run_key"]:
            raise MammogmicError(
                f"rank {rank} ran with other settings than rank 0 ({part['settings']} vs {first['settings']})"
            )
        for row in part["rows"]:
            rank_of[str(row["image_index"])] = rank
    writer.rows = sorted(
        (row for part in parts for row in part["rows"]), key=lambda r: order[str(r["image_index"])]
    )
    patches = {k: v for part in parts for k, v in part["patches"].items()}
    # As in one process: patches.json in input order.
    writer.patches = {k: patches[k] for k in sorted(patches, key=order.__getitem__)}
    writer.errors = sorted((e for part in parts for e in part["errors"]), key=lambda e: order[e["image_id"]])
    for name in ("n_new", "n_kept", "n_input_changed", "n_stale"):
        setattr(writer, name, sum(p["counts"][name] for p in parts))
    if args.save_saliency:
        folder.claim(SALIENCY_DIR)
        for image_id, rank in rank_of.items():
            source = part_folder(args.out, rank) / SALIENCY_DIR / f"{file_stem(image_id)}.npz"
            if source.is_file():
                atomic_write_bytes(args.out / SALIENCY_DIR / source.name, source.read_bytes())
    info = {
        **first["info"],
        "n_inputs": len(items),
        "n_run": sum(int(p["info"]["n_run"]) for p in parts),
        "seconds": max(float(p["info"]["seconds"]) for p in parts),
        "world_size": world,
        "parts": [f"{PARTS_DIR}/rank-{rank}" for rank in range(world)],
    }
    writer.begin(info)
    written = writer.finish(info)
    errors = writer.errors
    print(
        f"{info['n_run'] - len(errors)} image(s) predicted, {len(errors)} failed by {world} processes; "
        f"outputs in {args.out}"
    )
    for path in written.values():
        print(f"  {path}")
    return 1 if errors else 0
