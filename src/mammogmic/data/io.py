"""Reading mammograms: 8/16-bit grayscale PNG and DICOM (and ``.npy`` cache entries) as uint16 arrays.

``read_image(path)`` returns ``(pixels, meta)``. ``pixels`` is always a 2-D ``uint16`` array in the
file's own (raw) orientation; it is never silently reduced to 8 bits. For DICOM the display pipeline of
the standard is applied in order:

1. decode (uncompressed, RLE, JPEG, JPEG-LS, JPEG 2000 through the pylibjpeg plugins),
2. pixel padding (``PixelPaddingValue``/``PixelPaddingRangeLimit``) is remembered on the stored values,
3. modality LUT or rescale slope/intercept,
4. VOI LUT sequence or window centre/width (optional, on by default),
5. MONOCHROME1 inversion, so that tissue is bright and air dark,
6. padding pixels set to the bottom of the range (they become 0),
7. if the values are whole numbers in ``0..65535`` they are kept, otherwise the known output range is
   mapped linearly onto ``0..65535`` (recorded in ``meta.value_mapping``).

"FOR PROCESSING" (raw detector) images and DICOMs whose modality is not ``MG`` are refused.

Laterality and view come from the DICOM tags (``ImageLaterality`` then ``Laterality``; ``ViewPosition``
then ``ViewCodeSequence``) and fall back to the file name (``..._L_CC...``, ``R-MLO``, ``LEFT_CC``...).
Every problem raises :class:`~mammogmic.errors.ImageReadError` with a message that names the file.
"""

from __future__ import annotations

import io
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mammogmic.errors import ImageReadError

logger = logging.getLogger(__name__)

__all__ = [
    "ImageMeta",
    "read_image",
    "read_mask",
    "laterality_view_from_name",
    "normalize_laterality",
    "normalize_view",
    "MIN_IMAGE_SIDE",
]

#: Images with a side shorter than this are refused as "not a mammogram".
MIN_IMAGE_SIDE = 32

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_NPY_SIGNATURE = b"\x93NUMPY"
_DICOM_EXTENSIONS = {".dcm", ".dicom", ".dic", ""}
_FOR_PROCESSING_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray - For Processing
}
# SNOMED-CT and legacy SNOMED-RT codes for the two views GMIC uses.
_VIEW_CODES = {"399162004": "CC", "R-10242": "CC", "399368009": "MLO", "R-10226": "MLO"}
_VIEW_POSITIONS = {"CC": "CC", "XCCL": "CC", "XCCM": "CC", "MLO": "MLO"}


@dataclass
class ImageMeta:
    """What :func:`read_image` learnt about an image besides its pixels.

    Attributes:
        path: The file that was read.
        format: ``"png"``, ``"dicom"`` or ``"npy"`` (a preprocess cache entry).
        shape: ``(height, width)`` of the returned array.
        bits_stored: Significant bits of the source pixels (8 or 16 for PNG, ``BitsStored`` for DICOM).
        laterality: ``"L"``, ``"R"`` or ``None`` when neither tags nor file name say.
        view: ``"CC"``, ``"MLO"`` or ``None``.
        laterality_source: ``"dicom"``, ``"filename"`` or ``None``.
        view_source: ``"dicom"``, ``"filename"`` or ``None``.
        photometric: DICOM ``PhotometricInterpretation`` (``None`` for PNG).
        value_mapping: ``"identity"`` or a description of the linear map onto ``0..65535``.
        patient_id, study_uid, sop_instance_uid, manufacturer, transfer_syntax: DICOM identifiers
            (``None`` for PNG or when absent).
        pixel_spacing_mm: ``(row, col)`` spacing from ``ImagerPixelSpacing``/``PixelSpacing`` if present.
        notes: Human-readable remarks about what was applied (VOI, inversion, padding...).
    """

    path: str
    format: str
    shape: tuple[int, int]
    bits_stored: int
    laterality: str | None = None
    view: str | None = None
    laterality_source: str | None = None
    view_source: str | None = None
    photometric: str | None = None
    value_mapping: str = "identity"
    patient_id: str | None = None
    study_uid: str | None = None
    sop_instance_uid: str | None = None
    manufacturer: str | None = None
    transfer_syntax: str | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def full_view(self) -> str:
        """``"L-CC"``-style name; raises :class:`ImageReadError` if laterality or view is unknown."""
        if self.laterality is None or self.view is None:
            raise ImageReadError(
                f"{self.path}: cannot tell the {'laterality' if self.laterality is None else 'view'} "
                "from the DICOM tags or the file name; give it in the manifest"
            )
        return f"{self.laterality}-{self.view}"


def normalize_laterality(value: Any) -> str | None:
    """Map ``L``/``LEFT``/``R``/``RIGHT`` (any case) to ``"L"``/``"R"``; anything else to ``None``."""
    text = str(value).strip().upper() if value is not None else ""
    if text in ("L", "LEFT"):
        return "L"
    if text in ("R", "RIGHT"):
        return "R"
    return None


def normalize_view(value: Any) -> str | None:
    """Map ``CC``/``MLO`` (and ``XCCL``/``XCCM`` to CC) to ``"CC"``/``"MLO"``; anything else to ``None``."""
    text = str(value).strip().upper() if value is not None else ""
    return _VIEW_POSITIONS.get(text)


_TOKEN_SPLIT = re.compile(r"[^A-Z0-9]+")
_COMBINED = re.compile(r"^(L|R)(CC|MLO)$")


def laterality_view_from_name(name: str) -> tuple[str | None, str | None]:
    """Guess laterality and view from a file name such as ``0_L-CC.png`` or ``P_00001_LEFT_MLO.dcm``.

    The name is split into alphanumeric tokens; ``L``/``LEFT``/``R``/``RIGHT`` give the side, ``CC``/``MLO``
    the view, and ``LCC``/``RMLO`` both. Conflicting tokens give ``None`` for that field.
    """
    stem = Path(name).name.upper()
    for ext in (".PNG", ".DCM", ".DICOM", ".NPY"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    sides: set[str] = set()
    views: set[str] = set()
    for token in _TOKEN_SPLIT.split(stem):
        if token in ("L", "LEFT"):
            sides.add("L")
        elif token in ("R", "RIGHT"):
            sides.add("R")
        elif token in ("CC", "MLO"):
            views.add(token)
        else:
            match = _COMBINED.match(token)
            if match:
                sides.add(match.group(1))
                views.add(match.group(2))
    side = sides.pop() if len(sides) == 1 else None
    view = views.pop() if len(views) == 1 else None
    return side, view


def _read_bytes(path: Path) -> bytes:
    """Read a whole file, turning every OS-level failure into a specific :class:`ImageReadError`."""
    if not path.exists():
        raise ImageReadError(f"{path}: file not found")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a directory, expected an image file")
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except PermissionError as exc:
        raise ImageReadError(f"{path}: permission denied (cannot read the file)") from exc
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    if not data:
        raise ImageReadError(f"{path}: file is empty (0 bytes)")
    return data


def _check_size(path: Path, shape: tuple[int, ...]) -> None:
    if len(shape) != 2:
        raise ImageReadError(f"{path}: expected a 2-D grayscale image, got array shape {shape}")
    if min(shape) < MIN_IMAGE_SIDE:
        raise ImageReadError(
            f"{path}: image is {shape[0]}x{shape[1]} pixels, too small to be a mammogram "
            f"(each side must be at least {MIN_IMAGE_SIDE} pixels)"
        )


def _is_dicom(data: bytes, path: Path) -> bool:
    if len(data) >= 132 and data[128:132] == b"DICM":
        return True
    return path.suffix.lower() in _DICOM_EXTENSIONS and not data.startswith(_PNG_SIGNATURE)


def read_image(
    path: str | os.PathLike[str],
    *,
    apply_voi: bool = True,
    require_laterality_view: bool = False,
) -> tuple[np.ndarray, ImageMeta]:
    """Read a grayscale PNG or a DICOM mammogram as ``uint16`` pixels plus metadata.

    Args:
        path: PNG (8- or 16-bit grayscale) or DICOM file. The format is detected from the content.
        apply_voi: Apply the DICOM VOI LUT / window (the "for presentation" look). Ignored for PNG.
        require_laterality_view: Raise when laterality or view cannot be found in tags or file name.

    Returns:
        ``(pixels, meta)``: a 2-D ``uint16`` array in the file's orientation and an :class:`ImageMeta`.

    Raises:
        ImageReadError: missing/empty/unreadable file, a directory, truncated or corrupt data, colour or
            multi-frame images, images smaller than :data:`MIN_IMAGE_SIDE`, "FOR PROCESSING" or non-MG
            DICOMs, and (when asked) unknown laterality/view. The message names the file.
    """
    file_path = Path(path)
    data = _read_bytes(file_path)
    if data.startswith(_PNG_SIGNATURE):
        pixels, meta = _read_png(file_path, data)
    elif data.startswith(_NPY_SIGNATURE):
        pixels, meta = _read_npy(file_path, data)
    elif _is_dicom(data, file_path):
        pixels, meta = _read_dicom(file_path, data, apply_voi=apply_voi)
    else:
        raise ImageReadError(
            f"{file_path}: not a PNG or DICOM file (unrecognised content; first bytes {data[:8]!r})"
        )
    if meta.laterality is None or meta.view is None:
        side, view = laterality_view_from_name(file_path.name)
        if meta.laterality is None and side is not None:
            meta.laterality, meta.laterality_source = side, "filename"
        if meta.view is None and view is not None:
            meta.view, meta.view_source = view, "filename"
    if require_laterality_view:
        _ = meta.full_view  # raises with a specific message
    return pixels, meta


def _read_png(path: Path, data: bytes) -> tuple[np.ndarray, ImageMeta]:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            mode = img.mode
            if mode in ("RGB", "RGBA", "P", "LA", "PA", "CMYK", "YCbCr", "HSV", "LAB", "RGBX"):
                raise ImageReadError(
                    f"{path}: colour PNG (mode {mode}); mammograms must be single-channel grayscale "
                    "(8- or 16-bit)"
                )
            img.load()
            pixels = np.asarray(img)
    except ImageReadError:
        raise
    except Exception as exc:  # Pillow raises OSError/SyntaxError/ValueError for damaged files
        raise ImageReadError(f"{path}: truncated or corrupt PNG ({exc})") from exc
    if pixels.ndim != 2:
        raise ImageReadError(f"{path}: expected a 2-D grayscale PNG, got array shape {pixels.shape}")
    if mode == "1":
        pixels = pixels.astype(np.uint8)
        bits = 1
    elif pixels.dtype == np.uint8:
        bits = 8
    elif pixels.dtype in (np.uint16, np.dtype(">u2"), np.dtype("<u2")):
        bits = 16
    elif np.issubdtype(pixels.dtype, np.integer) and mode.startswith("I"):
        if pixels.min() < 0 or pixels.max() > 65535:
            raise ImageReadError(f"{path}: PNG values outside 0..65535 (mode {mode})")
        bits = 16
    else:
        raise ImageReadError(f"{path}: unsupported PNG pixel type {pixels.dtype} (mode {mode})")
    _check_size(path, pixels.shape)
    out = np.ascontiguousarray(pixels, dtype=np.uint16)
    meta = ImageMeta(path=str(path), format="png", shape=(out.shape[0], out.shape[1]), bits_stored=bits)
    return out, meta


def _read_npy(path: Path, data: bytes) -> tuple[np.ndarray, ImageMeta]:
    """A ``.npy`` array as written by ``mammogmic preprocess`` (2-D, unsigned integers; never pickles)."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise ImageReadError(f"{path}: truncated or corrupt .npy file ({exc})") from exc
    if array.ndim != 2:
        raise ImageReadError(f"{path}: expected a 2-D array, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageReadError(f"{path}: array contains NaN or infinite values")
        if not np.all(np.floor(array) == array):
            raise ImageReadError(f"{path}: float array with fractional values; expected 16-bit pixel values")
    elif not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise ImageReadError(f"{path}: unsupported array dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > 65535):
        raise ImageReadError(f"{path}: values outside 0..65535")
    _check_size(path, array.shape)
    out = np.ascontiguousarray(array, dtype=np.uint16)
    bits = 8 if array.dtype in (np.uint8, np.bool_) else 16
    return out, ImageMeta(path=str(path), format="npy", shape=(out.shape[0], out.shape[1]), bits_stored=bits)


def _dicom_str(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword, None)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _dicom_laterality_view(ds: Any) -> tuple[str | None, str | None]:
    side = normalize_laterality(ds.get("ImageLaterality", None))
    if side is None:
        side = normalize_laterality(ds.get("Laterality", None))
    view = normalize_view(ds.get("ViewPosition", None))
    if view is None:
        for item in ds.get("ViewCodeSequence", None) or []:
            code = str(item.get("CodeValue", "")).strip()
            if code in _VIEW_CODES:
                view = _VIEW_CODES[code]
                break
    return side, view


def _read_dicom(path: Path, data: bytes, *, apply_voi: bool) -> tuple[np.ndarray, ImageMeta]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, ValueError, OSError, KeyError, TypeError) as exc:
        raise ImageReadError(f"{path}: truncated or corrupt DICOM ({exc})") from exc
    except Exception as exc:  # pydicom can raise many types on garbage input
        raise ImageReadError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if len(ds) == 0:
            raise ImageReadError(f"{path}: not a DICOM file (no DICOM elements could be parsed)")
        raise ImageReadError(f"{path}: DICOM has no pixel data (element (7FE0,0010) is missing)")

    intent = (_dicom_str(ds, "PresentationIntentType") or "").upper()
    sop_class = _dicom_str(ds, "SOPClassUID") or ""
    if intent == "FOR PROCESSING" or sop_class in _FOR_PROCESSING_SOP_CLASSES:
        raise ImageReadError(
            f"{path}: DICOM is a 'FOR PROCESSING' (raw detector) image; GMIC needs the 'FOR PRESENTATION' "
            "image of the same view"
        )
    modality = (_dicom_str(ds, "Modality") or "").upper()
    if modality and modality != "MG":
        raise ImageReadError(f"{path}: DICOM modality is {modality!r}, not 'MG' (mammography)")
    if not modality:
        logger.warning("%s: DICOM has no Modality tag; assuming a mammogram", path)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = (_dicom_str(ds, "PhotometricInterpretation") or "MONOCHROME2").upper()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(
            f"{path}: colour DICOM (PhotometricInterpretation {photometric}, {samples} samples per pixel); "
            "expected MONOCHROME1/MONOCHROME2"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(
            f"{path}: multi-frame DICOM ({frames} frames, e.g. tomosynthesis); expected a 2-D mammogram"
        )
    _ensure_transfer_syntax(ds)
    try:
        stored = ds.pixel_array
    except Exception as exc:
        raise ImageReadError(
            f"{path}: cannot decode the DICOM pixel data ({type(exc).__name__}: {exc}); the file may be "
            "truncated, or the transfer syntax needs a decoder plugin (pylibjpeg-openjpeg/-libjpeg/-rle)"
        ) from exc
    if stored.ndim != 2:
        raise ImageReadError(f"{path}: expected a 2-D DICOM image, got pixel array shape {stored.shape}")
    _check_size(path, stored.shape)
    if np.issubdtype(stored.dtype, np.floating) and not np.isfinite(stored).all():
        raise ImageReadError(f"{path}: DICOM pixel data contains NaN or infinite values")

    notes: list[str] = []
    bits_stored = int(ds.get("BitsStored", stored.dtype.itemsize * 8) or stored.dtype.itemsize * 8)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    pad_mask = _padding_mask(ds, stored, notes)
    try:
        values, lo, hi = _apply_value_transforms(ds, stored, bits_stored, signed, apply_voi, notes)
    except (ValueError, IndexError, TypeError, KeyError, AttributeError) as exc:
        raise ImageReadError(f"{path}: cannot apply the DICOM modality/VOI transforms ({exc})") from exc
    if photometric == "MONOCHROME1":
        values = (lo + hi) - values
        notes.append("MONOCHROME1 inverted")
    if pad_mask is not None:
        values = np.where(pad_mask, lo, values)
    pixels, mapping = _to_uint16(values, lo, hi)

    side, view = _dicom_laterality_view(ds)
    spacing = ds.get("ImagerPixelSpacing", None) or ds.get("PixelSpacing", None)
    meta = ImageMeta(
        path=str(path),
        format="dicom",
        shape=(pixels.shape[0], pixels.shape[1]),
        bits_stored=bits_stored,
        laterality=side,
        view=view,
        laterality_source="dicom" if side else None,
        view_source="dicom" if view else None,
        photometric=photometric,
        value_mapping=mapping,
        patient_id=_dicom_str(ds, "PatientID"),
        study_uid=_dicom_str(ds, "StudyInstanceUID"),
        sop_instance_uid=_dicom_str(ds, "SOPInstanceUID"),
        manufacturer=_dicom_str(ds, "Manufacturer"),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        pixel_spacing_mm=(float(spacing[0]), float(spacing[1])) if spacing is not None else None,
        notes=notes,
    )
    return pixels, meta


def _ensure_transfer_syntax(ds: Any) -> None:
    """Files without a file-meta header (no preamble, old exports) get the syntax pydicom parsed them with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    if "TransferSyntaxUID" not in meta:
        implicit = getattr(ds, "is_implicit_VR", None)
        if implicit is None:
            implicit = getattr(ds, "original_encoding", (True, True))[0]
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


def _padding_mask(ds: Any, stored: np.ndarray, notes: list[str]) -> np.ndarray | None:
    pad = ds.get("PixelPaddingValue", None)
    if pad is None:
        return None
    pad_value = int(pad)
    limit = ds.get("PixelPaddingRangeLimit", None)
    if limit is None:
        mask = stored == pad_value
    else:
        low, high = sorted((pad_value, int(limit)))
        mask = (stored >= low) & (stored <= high)
    notes.append(f"pixel padding value {pad_value} masked ({int(mask.sum())} pixels)")
    return mask


def _apply_value_transforms(
    ds: Any, stored: np.ndarray, bits: int, signed: bool, apply_voi: bool, notes: list[str]
) -> tuple[np.ndarray, float, float]:
    """Modality LUT/rescale then (optionally) VOI; returns values and their known output range."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    lo: float = -(2.0 ** (bits - 1)) if signed else 0.0
    hi: float = 2.0 ** (bits - 1) - 1 if signed else 2.0**bits - 1
    if np.issubdtype(stored.dtype, np.floating):
        lo, hi = float(stored.min()), float(stored.max())
    values: np.ndarray = stored
    if ds.get("ModalityLUTSequence"):
        values = apply_modality_lut(stored, ds)
        lut_bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        lo, hi = 0.0, 2.0**lut_bits - 1
        notes.append("modality LUT applied")
    elif "RescaleSlope" in ds or "RescaleIntercept" in ds:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if slope != 1 or intercept != 0:
            values = stored.astype(np.float64) * slope + intercept
            lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
            notes.append(f"rescale slope {slope:g} intercept {intercept:g} applied")
    if apply_voi:
        if ds.get("VOILUTSequence"):
            values = apply_voi_lut(values, ds, index=0, prefer_lut=True)
            lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            lo, hi = 0.0, 2.0**lut_bits - 1
            notes.append("VOI LUT sequence applied")
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            values = apply_voi_lut(values, ds, index=0, prefer_lut=False)
            notes.append("VOI window applied")
    return np.asarray(values), float(lo), float(hi)


def _to_uint16(values: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, str]:
    if np.issubdtype(values.dtype, np.integer):
        integral = True
    else:
        integral = bool(np.all(np.floor(values) == values))
    if integral and lo >= 0 and hi <= 65535:
        return np.ascontiguousarray(values, dtype=np.uint16), "identity"
    if hi <= lo:
        hi = lo + 1.0
    scaled = (values.astype(np.float64) - lo) * (65535.0 / (hi - lo))
    out = np.clip(np.rint(scaled), 0, 65535).astype(np.uint16)
    return out, f"linear [{lo:g}, {hi:g}] -> [0, 65535]"


def read_mask(path: str | os.PathLike[str], shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a lesion mask (PNG or DICOM, any bit depth) as a boolean array (nonzero = lesion).

    Args:
        path: Mask file.
        shape: If given, the mask must have exactly this ``(height, width)``.

    Raises:
        ImageReadError: unreadable file or a shape different from ``shape``.
    """
    file_path = Path(path)
    data = _read_bytes(file_path)
    if data.startswith(_PNG_SIGNATURE):
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                arr = np.asarray(img)
        except Exception as exc:
            raise ImageReadError(f"{file_path}: truncated or corrupt mask PNG ({exc})") from exc
        if arr.ndim == 3:
            arr = arr[..., :3].max(axis=2) if arr.shape[2] >= 3 else arr[..., 0]
    elif _is_dicom(data, file_path):
        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            arr = ds.pixel_array
        except Exception as exc:
            raise ImageReadError(
                f"{file_path}: cannot read mask DICOM ({type(exc).__name__}: {exc})"
            ) from exc
    else:
        raise ImageReadError(f"{file_path}: mask is not a PNG or DICOM file")
    if arr.ndim != 2:
        raise ImageReadError(f"{file_path}: mask must be 2-D, got shape {arr.shape}")
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise ImageReadError(
            f"{file_path}: mask is {arr.shape[0]}x{arr.shape[1]} but the image is {shape[0]}x{shape[1]}"
        )
    return np.asarray(arr != 0)
