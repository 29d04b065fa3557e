"""DICOM results of ``mammogmic predict --dicom-out DIR``: an SR per study, a SEG per image (highdicom).

For every predicted DICOM image, grouped by ``StudyInstanceUID``:

* **Comprehensive SR** (``DIR/sr/<SOPInstanceUID>.dcm``), a TID 1500 Measurement Report built with
  highdicom's templates. Its Imaging Measurements hold, as TID 1501 / TID 1410 measurement groups:

  - per breast and class: the probability of malignancy (``(111047, DCM, "Probability of cancer")``) or of
    benign findings (``(122157, DCM, "Probability")`` with finding ``(30807003, SCT, "Benign")``; the malignant
    group has finding ``(21594007, SCT, "Malignant")``), unit ``{probability}`` (UCUM), derivation
    ``(373098007, SCT, "Mean")`` (the mean over the breast's views, as ``breast_predictions.csv``), finding site
    ``(76752008, SCT, "Breast")`` with laterality ``Left``/``Right``, and the breast's images as sources;
  - per image and class: the image's probability with that image as source (``image_predictions.csv``);
  - per image: the K retrieved patches as image regions (closed POLYLINE rectangles in source pixels:
    crop offset, window, resize and the right-view mirroring undone by
    :class:`~mammogmic.data.sample.InputGeometry`), tracking identifier ``"<view> patch k of K, attention a"``.

  Every group carries the algorithm identification (TID 4019: name ``mammogmic``, version, and as parameters
  each model file's SHA-256, its t, the TTA count and the run key). Procedure reported:
  ``(71651007, SCT, "Mammography")``; observer: the ``mammogmic`` device. The Image Library lists the sources.
* **FRACTIONAL Segmentation** (``DIR/seg/<SOPInstanceUID>.dcm``, probability, 8 bits) per image: segment 1
  the benign, segment 2 the malignant saliency map (category ``(130401, DCM, "Visual explanation")``, type
  ``(130404, DCM, "Saliency")``), resampled onto the source pixel grid with the mirroring undone, zero where
  the model saw no source pixel; the source image is its referenced source image.

Patient and study attributes are copied from the sources (type 2 attributes a source lacks stay empty);
Series and SOP Instance UIDs are new; ``DeviceSerialNumber`` of the SEG is the run key (what models and
settings made it). ``DIR/dicom_outputs.csv`` lists every object written into ``DIR``, run after run; a file
is never overwritten.
"""

from __future__ import annotations

import datetime
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammogmic import __version__
from mammogmic._extras import missing_extra
from mammogmic._outdir import OutputFolder, OutputLayout, atomic_write_bytes, atomic_write_text
from mammogmic.data.io import check_regular_file, read_dicom_identity
from mammogmic.errors import ImageReadError, MammogmicError
from mammogmic.evaluation.aggregation import breast_level
from mammogmic.evaluation.inference import ImageResult

try:
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless
except ImportError as exc:  # pragma: no cover - exercised by test_extras
    raise missing_extra("highdicom", "mammogmic predict --dicom-out", exc) from exc

logger = logging.getLogger(__name__)

__all__ = [
    "LAYOUT",
    "Algorithm",
    "DicomResults",
    "build_report",
    "build_segmentation",
    "read_source_header",
    "write_dicom_results",
]

SR_DIR, SEG_DIR, INDEX_CSV = "sr", "seg", "dicom_outputs.csv"
#: What ``predict --dicom-out`` writes at the top of its folder.
LAYOUT = OutputLayout("predict --dicom-out", frozenset({INDEX_CSV}), frozenset({SR_DIR, SEG_DIR}))
INDEX_COLUMNS = (
    "kind",
    "file",
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "source_image_ids",
    "source_sop_instance_uids",
    "written_at",
)
SR_SERIES_NUMBER, SEG_SERIES_NUMBER = 9501, 9502
RESEARCH_NOTICE = "research use only"

UNIT_PROBABILITY = hd.sr.CodedConcept("{probability}", "UCUM", "probability")
CLASSES = ("malignant", "benign")
#: Finding (TID 1501 row "Finding") and measured quantity of each class.
FINDING = {"malignant": codes.SCT.Malignant, "benign": codes.SCT.Benign}
QUANTITY = {"malignant": codes.DCM.ProbabilityOfCancer, "benign": codes.DCM.Probability}
LATERALITY = {"L": codes.SCT.Left, "R": codes.SCT.Right}
SIDE_NAME = {"L": "left", "R": "right"}
SALIENCY_CATEGORY = codes.DCM.VisualExplanation
SALIENCY_TYPE = codes.DCM.Saliency
#: Segment number of each saliency map (the model's class order: benign, malignant).
SEGMENTS = {"benign": 1, "malignant": 2}
# Type 2 patient/study attributes highdicom copies from a source: present (empty = unknown) when a source lacks them.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_REQUIRED = ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID", "Rows", "Columns")


@dataclass(frozen=True)
class Algorithm:
    """Who made the results: recorded in every SR group (TID 4019) and every SEG segment.

    Attributes:
        version: mammogmic's version.
        models: ``(file name, SHA-256)`` of each model of the ensemble, in order.
        parameters: further ``"name value"`` texts (t of each model, TTA, run key).
        run_key: the predict run's key (models, t, input contracts, TTA, dtype): the SEG's device serial number.
        name: the algorithm's name.
    """

    version: str
    models: tuple[tuple[str, str], ...]
    parameters: tuple[str, ...] = ()
    run_key: str = ""
    name: str = "mammogmic"

    @classmethod
    def from_run(cls, info: dict[str, Any], run_key: str) -> Algorithm:
        """From a predict run's ``run.json`` content (``models``, ``tta``) and its run key."""
        models = tuple((Path(str(m["path"])).name, str(m.get("sha256") or "unknown")) for m in info["models"])
        parameters = [f"model {name} sha256 {sha}" for name, sha in models]
        parameters += [
            f"model {Path(str(m['path'])).name} percent_t {m['percent_t']}"
            for m in info["models"]
            if m.get("percent_t") is not None
        ]
        parameters += [f"tta {info.get('tta', 1)}", f"run_key {run_key}"]
        return cls(__version__, models, tuple(parameters), run_key)

    def sr_identification(self) -> hd.sr.AlgorithmIdentification:
        return hd.sr.AlgorithmIdentification(
            name=self.name, version=self.version, parameters=list(self.parameters)
        )

    def seg_identification(self) -> hd.AlgorithmIdentificationSequence:
        return hd.AlgorithmIdentificationSequence(
            name=self.name,
            family=codes.cid7162.ArtificialIntelligence,
            version=self.version,
            parameters={f"model_{i + 1}_sha256": sha for i, (_, sha) in enumerate(self.models)}
            | {"run_key": self.run_key},
        )


def read_source_header(path: Path) -> pydicom.Dataset:
    """The header of a source image (no pixel data) for highdicom: missing type 2 patient/study attributes are
    added empty (unknown), nothing else is changed.

    Raises:
        ImageReadError: unreadable file, or one without the UIDs and size a reference needs.
    """
    check_regular_file(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types on damaged files
        raise ImageReadError(f"{path}: cannot read the DICOM header ({type(exc).__name__}: {exc})") from exc
    missing = [k for k in _REQUIRED if not ds.get(k)]
    if missing:
        raise ImageReadError(
            f"{path}: the DICOM header lacks {', '.join(missing)}; cannot reference the image"
        )
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, None)
    return ds


@dataclass
class _Image:
    """A predicted image of a study with its source header."""

    result: ImageResult
    header: pydicom.Dataset

    @property
    def side(self) -> str:
        return self.result.view.partition("-")[0]

    @property
    def view(self) -> str:
        return self.result.view.partition("-")[2]

    @property
    def source_for_measurement(self) -> hd.sr.SourceImageForMeasurement:
        return hd.sr.SourceImageForMeasurement(self.header.SOPClassUID, self.header.SOPInstanceUID)


def _probability_group(
    label: str,
    kind: str,
    value: float,
    side: str,
    sources: Sequence[hd.sr.SourceImageForMeasurement],
    algorithm: hd.sr.AlgorithmIdentification,
    derivation: Any = None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    sites = [hd.sr.FindingSite(anatomic_location=codes.SCT.Breast, laterality=LATERALITY[side])]
    measurement = hd.sr.Measurement(
        name=QUANTITY[kind],
        value=float(value),
        unit=UNIT_PROBABILITY,
        derivation=derivation,
        finding_sites=sites,
        referenced_images=list(sources),
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{label}: {kind}"),
        finding_type=FINDING[kind],
        finding_sites=sites,
        algorithm_id=algorithm,
        measurements=[measurement],
    )


def patch_regions(image: _Image) -> list[np.ndarray]:
    """The K patches of an image as closed ``(col, row)`` rectangles in source pixels (clipped to the image;
    a patch wholly outside it, in the window's zero padding, is left out)."""
    res = image.result
    if res.geometry is None or res.patch_locations is None or res.crop_size is None:
        return []
    n_rows, n_cols = int(image.header.Rows), int(image.header.Columns)
    out = []
    for location in np.asarray(res.patch_locations):
        top, bottom, left, right = res.geometry.box_to_source(location, res.crop_size)
        top, bottom = max(top, 0.0), min(bottom, float(n_rows))
        left, right = max(left, 0.0), min(right, float(n_cols))
        if bottom <= top or right <= left:
            out.append(np.empty((0, 2)))
            continue
        out.append(np.array([[left, top], [right, top], [right, bottom], [left, bottom], [left, top]]))
    return out


def build_report(
    study_uid: str, images: Sequence[_Image], algorithm: Algorithm, *, complete: bool = True
) -> hd.sr.ComprehensiveSR:
    """The TID 1500 Comprehensive SR of one study (see the module docstring)."""
    algo = algorithm.sr_identification()
    groups: list[Any] = []
    table = pd.DataFrame(
        [
            {
                "image_index": image.result.item.image_id,
                "benign_pred": image.result.benign,
                "malignant_pred": image.result.malignant,
                "exam_id": study_uid,
                "breast_id": image.side,
                "laterality": image.side,
                "view": image.view,
            }
            for image in images
        ]
    )
    for _, breast in breast_level(table).iterrows():  # the aggregation breast_predictions.csv uses
        side = str(breast["laterality"])
        sources = [i.source_for_measurement for i in images if i.side == side]
        for kind in CLASSES:
            groups.append(
                _probability_group(
                    f"{SIDE_NAME[side]} breast",
                    kind,
                    breast[f"{kind}_pred"],
                    side,
                    sources,
                    algo,
                    derivation=codes.SCT.Mean,
                )
            )
    for image in images:
        label = f"{image.result.view} image {image.header.SOPInstanceUID}"
        for kind in CLASSES:
            value = image.result.malignant if kind == "malignant" else image.result.benign
            groups.append(
                _probability_group(label, kind, value, image.side, [image.source_for_measurement], algo)
            )
    for image in images:
        regions = patch_regions(image)
        attention = image.result.patch_attention
        for k, points in enumerate(regions):
            if not len(points):
                logger.warning(
                    "%s: patch %d lies in the window's padding, outside the image; not in the SR",
                    image.result.item.path,
                    k + 1,
                )
                continue
            text = f"{image.result.view} patch {k + 1} of {len(regions)}"
            if attention is not None:
                text += f", attention {float(attention[k]):.4f}"
            region = hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=points,
                source_image=hd.sr.SourceImageForRegion(
                    image.header.SOPClassUID, image.header.SOPInstanceUID
                ),
            )
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=text),
                    referenced_region=region,
                    finding_sites=[
                        hd.sr.FindingSite(
                            anatomic_location=codes.SCT.Breast, laterality=LATERALITY[image.side]
                        )
                    ],
                    algorithm_id=algo,
                )
            )
    headers = [image.header for image in images]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=pydicom.uid.generate_uid(entropy_srcs=["mammogmic device"]),
        name=algorithm.name,
        model_name="GMIC",
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device, observer_identifying_attributes=device
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.SCT.Mammography,
        imaging_measurements=groups,
        referenced_images=headers,
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=headers,
        content=report,
        series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=algorithm.name,
        series_description=f"GMIC findings ({RESEARCH_NOTICE})",
        is_complete=complete,
    )
    sr.copy_patient_and_study_information(headers[0])
    return sr


def _segment_descriptions(algorithm: Algorithm) -> list[hd.seg.SegmentDescription]:
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=f"{kind} saliency",
            segmented_property_category=SALIENCY_CATEGORY,
            segmented_property_type=SALIENCY_TYPE,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm.seg_identification(),
            anatomic_regions=[codes.SCT.Breast],
        )
        for kind, number in SEGMENTS.items()
    ]


def _transfer_syntax() -> str:
    """RLE Lossless when an encoder is installed (the maps are mostly zero: much smaller), else uncompressed."""
    from pydicom.pixels import get_encoder

    return RLELossless if get_encoder(RLELossless).is_available else ExplicitVRLittleEndian


def build_segmentation(
    image: _Image, algorithm: Algorithm, series_uid: str, instance_number: int
) -> hd.seg.Segmentation:
    """The FRACTIONAL Segmentation of one image: its two saliency maps on the source pixel grid.

    Raises:
        MammogmicError: the image has no saliency maps, or where its model input lies in the source is unknown.
    """
    res = image.result
    if res.saliency is None:
        raise MammogmicError(f"{res.item.path}: no saliency maps were kept for this image")
    if res.geometry is None:
        raise MammogmicError(
            f"{res.item.path}: where the model input lies in the source image is unknown (a preprocess cache "
            "row without a matching window_location); no SEG and no patch regions"
        )
    shape = (int(image.header.Rows), int(image.header.Columns))
    maps = res.geometry.maps_to_source(res.saliency, shape)  # (2, rows, cols), class order benign, malignant
    pixels = np.clip(np.moveaxis(maps, 0, -1), 0.0, 1.0)[None]  # (1, rows, cols, segments)
    seg = hd.seg.Segmentation(
        source_images=[image.header],
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=_segment_descriptions(algorithm),
        series_instance_uid=series_uid,
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=algorithm.name,
        manufacturer_model_name="GMIC",
        software_versions=algorithm.version,
        device_serial_number=algorithm.run_key or "unknown",
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255,
        content_label="SALIENCY",
        content_description="GMIC saliency maps: benign, malignant",
        series_description=f"GMIC saliency ({RESEARCH_NOTICE})",
        omit_empty_frames=False,
        transfer_syntax_uid=_transfer_syntax(),
    )
    if (
        "PatientOrientation" not in seg
    ):  # same pixel grid as the source: its orientation (type 2C: may be empty)
        seg.PatientOrientation = image.header.get("PatientOrientation")
    return seg


@dataclass
class DicomResults:
    """What :func:`write_dicom_results` did.

    Attributes:
        files: one dict per object written (the rows added to ``dicom_outputs.csv``, with ``path``).
        n_studies: studies with at least one predicted DICOM image.
        n_not_dicom: predicted inputs that are not DICOM (no SR/SEG for them).
        n_failed: objects that could not be written (each reported through ``on_error``).
    """

    files: list[dict[str, str]] = field(default_factory=list)
    n_studies: int = 0
    n_not_dicom: int = 0
    n_failed: int = 0

    def summary(self) -> dict[str, Any]:
        kinds = [f["kind"] for f in self.files]
        return {
            "n_studies": self.n_studies,
            "n_sr": kinds.count("SR"),
            "n_seg": kinds.count("SEG"),
            "n_not_dicom": self.n_not_dicom,
            "n_failed": self.n_failed,
        }


# Errors highdicom and pydicom raise on inputs they cannot encode; one study's failure must not stop the others.
_WRITE_ERRORS = (MammogmicError, OSError, ValueError, TypeError, AttributeError, KeyError, IndexError)


class _Writer:
    """Writes objects into the claimed ``DIR`` and keeps ``dicom_outputs.csv`` up to date (never overwrites)."""

    def __init__(self, folder: OutputFolder) -> None:
        self.folder = folder
        self.rows: list[dict[str, str]] = []
        index = folder.path / INDEX_CSV
        if index.exists() and folder.owns(INDEX_CSV):
            self.rows = pd.read_csv(index, dtype=str, keep_default_na=False).to_dict("records")

    def write(self, kind: str, ds: pydicom.Dataset, images: Sequence[_Image]) -> dict[str, str]:
        sub = SR_DIR if kind == "SR" else SEG_DIR
        self.folder.claim(sub, INDEX_CSV)
        path = self.folder.path / sub / f"{ds.SOPInstanceUID}.dcm"
        if path.exists():  # new UIDs every time: a clash means something is wrong; never overwrite
            raise MammogmicError(f"{path}: exists already; not overwritten")
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        atomic_write_bytes(path, buffer.getvalue())
        row = {
            "kind": kind,
            "file": f"{sub}/{path.name}",
            "study_instance_uid": str(ds.StudyInstanceUID),
            "series_instance_uid": str(ds.SeriesInstanceUID),
            "sop_instance_uid": str(ds.SOPInstanceUID),
            "source_image_ids": " ".join(i.result.item.image_id for i in images),
            "source_sop_instance_uids": " ".join(str(i.header.SOPInstanceUID) for i in images),
            "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        self.rows.append(row)
        table = pd.DataFrame(self.rows, columns=list(INDEX_COLUMNS))
        atomic_write_text(self.folder.path / INDEX_CSV, table.to_csv(index=False))
        return {**row, "path": str(path)}


def write_dicom_results(
    results: Sequence[ImageResult],
    folder: OutputFolder,
    algorithm: Algorithm,
    on_error: Callable[[ImageResult, str, str], None],
    *,
    n_failed_inputs: dict[str, int] | None = None,
) -> DicomResults:
    """Write the SR of every study and the SEG of every image of ``results`` that came from a DICOM file.

    Args:
        results: predictions with their explanations and geometry (``keep_explanations``).
        folder: the claimed ``--dicom-out`` folder (:data:`LAYOUT`).
        algorithm: what made the results.
        on_error: called with ``(result, stage, message)`` for each image whose SR (``dicom-sr``) or SEG
            (``dicom-seg``) could not be written; the other studies and images go on.
        n_failed_inputs: study UID -> number of its images that failed prediction (their SR is then marked
            PARTIAL).
    """
    out = DicomResults()
    studies: dict[str, list[_Image]] = {}
    for res in results:
        try:
            identity = read_dicom_identity(res.item.path)
            if identity is None:
                out.n_not_dicom += 1
                continue
            if not identity.study_uid:
                raise ImageReadError(f"{res.item.path}: the DICOM header has no StudyInstanceUID")
            header = read_source_header(Path(res.item.path))
        except (MammogmicError, OSError) as exc:
            out.n_failed += 1
            on_error(res, "dicom-out", str(exc))
            continue
        studies.setdefault(identity.study_uid, []).append(_Image(res, header))
    if out.n_not_dicom:
        logger.warning("%d predicted input(s) are not DICOM files: no SR/SEG for them", out.n_not_dicom)
    out.n_studies = len(studies)
    writer = _Writer(folder)
    failed = n_failed_inputs or {}
    for study_uid, images in studies.items():
        try:
            sr = build_report(study_uid, images, algorithm, complete=not failed.get(study_uid))
            out.files.append(writer.write("SR", sr, images))
        except _WRITE_ERRORS as exc:
            out.n_failed += 1
            for image in images:
                on_error(
                    image.result,
                    "dicom-sr",
                    f"study {study_uid}: no SR written ({type(exc).__name__}: {exc})",
                )
        series_uid = hd.UID()
        for number, image in enumerate(images, start=1):
            try:
                seg = build_segmentation(image, algorithm, series_uid, number)
                out.files.append(writer.write("SEG", seg, [image]))
            except _WRITE_ERRORS as exc:
                out.n_failed += 1
                message = str(exc) if isinstance(exc, MammogmicError) else f"{type(exc).__name__}: {exc}"
                on_error(image.result, "dicom-seg", f"{image.result.item.path}: no SEG written ({message})")
    return out
