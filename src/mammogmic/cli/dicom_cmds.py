"""DICOM options of ``mammogmic predict``: ``--dicom-out`` (SR + SEG) and the DICOMweb round trip.

``--dicom-out DIR`` writes, for the DICOM inputs, a Comprehensive SR per study and a FRACTIONAL SEG per image
(:mod:`mammogmic.dicom.results`). ``--dicomweb URL --study UID`` fetches the study's MG instances into
``OUT/retrieved`` and predicts them; ``--dicomweb-store`` sends the SR and SEG back (:mod:`mammogmic.dicom.web`).
The heavy modules (highdicom, dicomweb-client) are imported only when these options are used.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mammogmic.errors import MammogmicError

if TYPE_CHECKING:
    from mammogmic._outdir import OutputFolder
    from mammogmic.evaluation.outputs import PredictionWriter

logger = logging.getLogger(__name__)

#: Folders of ``--out`` used by these options: fetched instances, and SR/SEG when ``--dicom-out`` is not given.
RETRIEVED_DIR, DICOM_DIR = "retrieved", "dicom"

DICOM_EPILOG = """\
DICOM (docs/dicom.md): --dicom-out DIR writes for every DICOM input a Comprehensive SR per study (TID 1500:
breast and image probabilities, the K patches as regions on the source images) and a FRACTIONAL SEG per image
(benign and malignant saliency on the source pixel grid) into DIR/sr and DIR/seg, listed in
DIR/dicom_outputs.csv; it predicts every image again (the explanations are not kept between runs). DIR is its
own folder (or OUT/dicom), same rules as --out; files are never overwritten. Needs the 'dicom' extra.
  mammogmic predict exam/ --model gmic.safetensors --out preds/ --dicom-out results/
  mammogmic predict --dicomweb http://pacs:8042/dicom-web --study 1.2.3.4 --model gmic.safetensors \\
      --out preds/ --dicomweb-store
--dicomweb fetches the study's MG instances (QIDO-RS, WADO-RS) into OUT/retrieved (kept), predicts them and,
with --dicomweb-store, stores the SR and SEG back (STOW-RS; written to OUT/dicom unless --dicom-out is given).
Needs the 'dicomweb' extra.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The DICOM options of ``predict``."""
    p.add_argument(
        "--dicom-out",
        type=Path,
        metavar="DIR",
        help="write a DICOM SR per study and a SEG per image of the DICOM inputs into DIR (see below)",
    )
    p.add_argument("--dicomweb", metavar="URL", help="DICOMweb root of a PACS to fetch --study from")
    p.add_argument(
        "--study",
        dest="studies",
        action="append",
        default=[],
        metavar="UID",
        help="StudyInstanceUID to fetch with --dicomweb (repeat for several)",
    )
    p.add_argument(
        "--dicomweb-store", action="store_true", help="store the SR and SEG back to --dicomweb (STOW-RS)"
    )
    p.add_argument(
        "--dicomweb-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds without an answer before a DICOMweb request fails (30)",
    )


def used(args: argparse.Namespace) -> bool:
    """Whether any DICOM option was given."""
    return bool(
        getattr(args, "dicom_out", None) or getattr(args, "dicomweb", None) or getattr(args, "studies", None)
    ) or bool(getattr(args, "dicomweb_store", False))


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse option combinations that cannot work (before any folder is created).

    Raises:
        MammogmicError: naming the options.
    """
    if args.studies and not args.dicomweb:
        raise MammogmicError("--study needs --dicomweb URL (the server to fetch it from)")
    if args.dicomweb and not args.studies:
        raise MammogmicError("--dicomweb needs at least one --study UID to fetch")
    if args.dicomweb_store and not args.dicomweb:
        raise MammogmicError("--dicomweb-store needs --dicomweb URL (the server to store to)")
    if args.dicomweb and (args.inputs or args.manifest):
        raise MammogmicError(
            "--dicomweb predicts the fetched studies; give no INPUT files or --manifest with it"
        )
    if args.dicomweb_store and args.dicom_out is None:
        args.dicom_out = args.out / DICOM_DIR
    if args.dicom_out is not None:
        out, target = args.out.resolve(), args.dicom_out.resolve()
        if target == out or out.is_relative_to(target):
            raise MammogmicError(
                f"--dicom-out {args.dicom_out}: must not be --out or a folder above it; use {args.out / DICOM_DIR} "
                "or a folder of its own"
            )
        if target.is_relative_to(out) and target != out / DICOM_DIR:
            raise MammogmicError(
                f"--dicom-out {args.dicom_out}: inside --out only {args.out / DICOM_DIR} may be used"
            )


class DicomRun:
    """The DICOM part of one predict run: checks the server, claims ``--dicom-out``, fetches, writes, stores."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.server: Any = None
        self.plans: list[Any] = []
        self.dicom_folder: OutputFolder | None = None
        self.summary: dict[str, Any] = {}
        self.lines: list[str] = []
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
            # Their INFO lines (one per request, per copied module) drown the command's own output.
            for name in ("highdicom", "dicomweb_client"):
                logging.getLogger(name).setLevel(logging.WARNING)

    @property
    def writes(self) -> bool:
        """Whether SR/SEG are written (every image must then be predicted with its explanations)."""
        return self.args.dicom_out is not None

    def preflight(self) -> None:
        """Before any folder is made: the option combination, the extras, and with ``--dicomweb`` that the
        server answers and has each study with MG series (QIDO-RS only).

        Raises:
            MammogmicError: naming the option, server, request or study.
        """
        check_arguments(self.args)
        if self.args.dicom_out is not None:
            import mammogmic.dicom.results  # noqa: F401  (a missing 'dicom' extra fails here, not after predicting)
        if self.args.dicomweb:
            from mammogmic.dicom.web import connect, find_study

            self.server = connect(self.args.dicomweb, self.args.dicomweb_timeout)
            self.plans = [find_study(self.server, study) for study in dict.fromkeys(self.args.studies)]

    def _inside_out(self) -> bool:
        return self.args.dicom_out.resolve() == (self.args.out / DICOM_DIR).resolve()

    def _claim(self, stack: contextlib.ExitStack[Any]) -> None:
        from mammogmic._outdir import OutputFolder
        from mammogmic.dicom.results import LAYOUT

        folder = OutputFolder(
            self.args.dicom_out, LAYOUT, force=self.args.force, wait=self.args.wait, option="--dicom-out"
        )
        self.dicom_folder = stack.enter_context(folder)

    def claim_outside(self, stack: contextlib.ExitStack[Any]) -> None:
        """Claim a ``--dicom-out`` that lies outside ``--out`` (before ``--out``, so that an unusable one stops
        the run before ``--out`` is made)."""
        if self.args.dicom_out is not None and not self._inside_out():
            self._claim(stack)

    def start(self, stack: contextlib.ExitStack[Any], folder: OutputFolder) -> list[Any] | None:
        """Claim ``OUT/dicom`` when it is ``--dicom-out`` and, with ``--dicomweb``, fetch the studies into
        ``OUT/retrieved``; returns the fetched items (``None``: the inputs are the command line's).

        Raises:
            MammogmicError: an unusable ``--dicom-out``, a failed request (what was fetched stays).
        """
        if self.args.dicom_out is not None and self.dicom_folder is None:
            folder.claim(DICOM_DIR)
            self._claim(stack)
        if not self.args.dicomweb:
            return None
        return self._fetch(folder)

    def _fetch(self, folder: OutputFolder) -> list[Any]:
        from tqdm import tqdm

        from mammogmic.dicom.web import DicomWebError, fetch_study
        from mammogmic.evaluation.inference import items_from_paths

        folder.claim(RETRIEVED_DIR)
        dest = folder.path / RETRIEVED_DIR
        paths: list[Path] = []
        fetched = []
        start = time.perf_counter()
        bar = tqdm(unit="img", disable=self.args.no_progress, desc="fetch")

        def progress(n: int) -> None:
            bar.update(n)

        try:
            for plan in self.plans:
                for series_uid, modality in plan.skipped_series:
                    logger.info(
                        "study %s: series %s is %s, not MG: not fetched", plan.study_uid, series_uid, modality
                    )
                try:
                    got = fetch_study(self.server, plan, dest, progress=progress)
                except DicomWebError as exc:
                    raise DicomWebError(f"{exc} (instances fetched so far are kept in {dest})") from exc
                paths += got.paths
                fetched.append(
                    {
                        "study": plan.study_uid,
                        "n_instances": len(got.paths),
                        "n_downloaded": got.n_downloaded,
                        "n_kept": got.n_kept,
                        "skipped_series": [{"series": s, "modality": m} for s, m in plan.skipped_series],
                    }
                )
        finally:
            bar.close()
        self.summary["dicomweb"] = {
            "url": self.server.url,
            "fetched": fetched,
            "seconds": round(time.perf_counter() - start, 3),
        }
        self.lines.append(
            f"fetched {sum(f['n_downloaded'] for f in fetched)} instance(s) from {self.server.url} into {dest} "
            f"({sum(f['n_kept'] for f in fetched)} already there)"
        )
        return items_from_paths(paths)

    def finish(
        self, results: list[Any], errors: list[Any], writer: PredictionWriter, info: dict[str, Any]
    ) -> None:
        """Write the SR/SEG of the results and store them; failures go to errors.csv through ``writer``."""
        if self.dicom_folder is None:
            return
        from mammogmic.data.io import read_dicom_identity
        from mammogmic.dicom.results import Algorithm, write_dicom_results
        from mammogmic.errors import ImageReadError

        failed_per_study: dict[str, int] = {}
        for prepared in errors:
            try:
                identity = read_dicom_identity(prepared.item.path)
            except (ImageReadError, OSError):
                continue
            if identity is not None and identity.study_uid:
                failed_per_study[identity.study_uid] = failed_per_study.get(identity.study_uid, 0) + 1

        def on_error(res: Any, stage: str, message: str) -> None:
            writer.add_output_error(res.item.image_id, str(res.item.path), stage, message)

        algorithm = Algorithm.from_run(info, writer.run_key or "")
        start = time.perf_counter()
        written = write_dicom_results(
            results, self.dicom_folder, algorithm, on_error, n_failed_inputs=failed_per_study
        )
        summary = written.summary()
        self.summary["dicom_out"] = {
            "folder": str(self.args.dicom_out),
            **summary,
            "seconds": round(time.perf_counter() - start, 3),
        }
        self.lines.append(
            f"DICOM: {summary['n_sr']} SR and {summary['n_seg']} SEG in {self.args.dicom_out} "
            f"({summary['n_studies']} study(ies); {summary['n_not_dicom']} input(s) not DICOM, "
            f"{summary['n_failed']} failed)"
        )
        if self.args.dicomweb_store:
            self._store(written.files, results, writer)

    def _store(self, files: list[dict[str, str]], results: list[Any], writer: PredictionWriter) -> None:
        from mammogmic.dicom.web import DicomWebError, store_files

        by_id = {res.item.image_id: res for res in results}
        studies: dict[str, list[dict[str, str]]] = {}
        for row in files:
            studies.setdefault(row["study_instance_uid"], []).append(row)
        n_stored = n_failed = 0
        start = time.perf_counter()
        for study, rows in studies.items():
            try:
                answer = store_files(self.server, [Path(r["path"]) for r in rows], study)
                failed = answer.failed
            except DicomWebError as exc:
                failed = {r["sop_instance_uid"]: str(exc) for r in rows}
            for row in rows:
                reason = failed.get(row["sop_instance_uid"])
                if reason is None:
                    n_stored += 1
                    continue
                n_failed += 1
                for image_id in row["source_image_ids"].split(" "):
                    res = by_id.get(image_id)
                    writer.add_output_error(
                        image_id,
                        str(res.item.path) if res is not None else "",
                        "dicomweb-store",
                        f"{row['kind']} {row['path']} not stored to {self.server.url}: {reason} (the file is kept)",
                    )
        self.summary["dicomweb_store"] = {
            "url": self.server.url,
            "n_stored": n_stored,
            "n_failed": n_failed,
            "seconds": round(time.perf_counter() - start, 3),
        }
        self.lines.append(f"stored {n_stored} object(s) to {self.server.url} (STOW-RS), {n_failed} failed")

    def report(self) -> None:
        for line in self.lines:
            print(line, file=sys.stdout)
