"""Reading mammograms: 8/16-bit grayscale PNG and DICOM (and ``.npy`` cache entries) as uint16 arrays.

``read_image(path)`` returns ``(pixels, meta)``. ``pixels`` is always a 2-D ``uint16`` array in the
file's own (raw) orientation; it is never silently reduced to 8 bits. For DICOM the display pipeline of
the standard is applied in order:

1. decode (uncompressed, RLE, JPEG, JPEG-LS through the pylibjpeg plugins; JPEG 2000 through Pillow's OpenJPEG,
   or pylibjpeg-openjpeg when the ``htj2k`` extra is installed, which High-Throughput JPEG 2000 needs),
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

Input guards (every reader goes through them: ``predict``, ``preprocess``, training):

* only regular files are opened: directories, dangling links, FIFOs, sockets and devices are refused
  from ``stat`` (a FIFO or a device is never opened), and files above :data:`MAX_FILE_BYTES` are
  refused before reading;
* the format comes from the content (magic bytes), never from the extension: a PNG named ``.dcm`` is
  read as a PNG with a warning; a gzip, zip, JPEG, TIFF, PDF or text file is refused with its real
  format named ("this is a gzip file, not a DICOM file");
* the decoded size is checked from the header before decoding (PNG ``IHDR``; DICOM ``Rows`` x
  ``Columns`` x frames): a zero-size image or a decompression bomb above :data:`MAX_PIXELS` is refused;
* colour PNGs are refused with their colour model (RGB, RGBA, palette, grey+alpha);
* images without tissue contrast (constant, fewer than :data:`MIN_DISTINCT_VALUES` grey values, or a
  value range below :data:`MIN_RANGE_FRACTION` of the bit depth) are refused;
* 8-bit (or lower) images are read but logged as a warning, once per file.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from mammogmic._extras import has_module, missing_extra
from mammogmic.errors import ImageReadError

logger = logging.getLogger(__name__)

__all__ = [
    "DicomIdentity",
    "ImageMeta",
    "MAX_FILE_BYTES",
    "MAX_PIXELS",
    "MIN_DISTINCT_VALUES",
    "MIN_IMAGE_SIDE",
    "MIN_RANGE_FRACTION",
    "check_regular_file",
    "laterality_view_from_name",
    "normalize_laterality",
    "normalize_view",
    "read_dicom_identity",
    "read_image",
    "read_mask",
    "sniff_format",
]

#: Images with a side shorter than this are refused as "not a mammogram".
MIN_IMAGE_SIDE = 32
#: Largest file read as one image. A 4096x3328 16-bit mammogram is 27 MB, scanned film (CBIS-DDSM)
#: up to ~80 MB; anything far larger is not one 2-D mammogram (and is refused before reading).
MAX_FILE_BYTES = 512 * 1024**2
#: Largest image in pixels (rows x columns x frames), checked from the header before decoding: the
#: largest mammograms are ~40 megapixels (scanned film at 43.5 um). Below Pillow's own bomb limit.
MAX_PIXELS = 80_000_000
#: Fewest distinct grey values of an image with tissue contrast (a real mammogram has thousands).
MIN_DISTINCT_VALUES = 8
#: Smallest ``max - min`` as a fraction of the bit range (``2**bits - 1``): 64 levels at 16 bits,
#: 4 at 12 bits (a 16-bit PNG holding 8-bit data, range 255, still passes).
MIN_RANGE_FRACTION = 1 / 1024

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


# --- file guards ---------------------------------------------------------------------------------

_FILE_TYPES = (
    (stat.S_ISDIR, "is a directory, expected an image file"),
    (stat.S_ISFIFO, "is a named pipe (FIFO), not a regular file; it is not opened"),
    (stat.S_ISSOCK, "is a socket, not a regular file"),
    (stat.S_ISCHR, "is a character device, not a regular file; it is not opened"),
    (stat.S_ISBLK, "is a block device (a disk), not a regular file; it is not opened"),
)


def check_regular_file(path: str | os.PathLike[str], max_bytes: int | None = None) -> os.stat_result:
    """Refuse anything but a regular, non-empty file of at most ``max_bytes`` bytes, from ``stat`` alone.

    ``max_bytes`` defaults to :data:`MAX_FILE_BYTES` (read when called).

    Symbolic links are followed; a link to nothing, a link loop, a directory, a FIFO, a socket or a
    device is refused without opening it.

    Returns:
        The ``stat`` result of the file (the link's target for a link).

    Raises:
        ImageReadError: with a message naming the file and what it is.
    """
    file_path = Path(path)
    try:
        lst = os.lstat(file_path)
    except FileNotFoundError:
        raise ImageReadError(f"{file_path}: file not found") from None
    except OSError as exc:
        raise ImageReadError(f"{file_path}: cannot look at the file ({exc.strerror or exc})") from exc
    link = ""
    if stat.S_ISLNK(lst.st_mode):
        try:
            target = os.readlink(file_path)
        except OSError:
            target = "?"
        try:
            st = os.stat(file_path)
        except FileNotFoundError:
            raise ImageReadError(
                f"{file_path}: dangling symbolic link (points to {target}, which does not exist)"
            ) from None
        except OSError as exc:  # ELOOP, EACCES on the way to the target
            raise ImageReadError(
                f"{file_path}: symbolic link to {target} cannot be followed ({exc.strerror or exc})"
            ) from exc
        link = f" (through a symbolic link to {target})"
    else:
        st = lst
    for test, what in _FILE_TYPES:
        if test(st.st_mode):
            if stat.S_ISDIR(st.st_mode) and not os.access(file_path, os.R_OK | os.X_OK):
                what += "; it cannot be listed either (permission denied)"
            raise ImageReadError(f"{file_path}: {what}{link}")
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(f"{file_path}: not a regular file (mode {stat.filemode(st.st_mode)}){link}")
    if st.st_size == 0:
        raise ImageReadError(f"{file_path}: file is empty (0 bytes)")
    max_bytes = MAX_FILE_BYTES if max_bytes is None else max_bytes
    if st.st_size > max_bytes:
        raise ImageReadError(
            f"{file_path}: file is {_size_text(st.st_size)}, more than the {_size_text(max_bytes)} accepted for "
            "one mammogram"
        )
    return st


def _size_text(n: int) -> str:
    if n < 1024**2:
        return f"{n:,} bytes"
    return f"{n / 1024**2:,.0f} MiB" if n < 1024**3 else f"{n / 1024**3:,.1f} GiB"


def _no_block(name: str, flags: int) -> int:
    # O_NONBLOCK: should the file be swapped for a FIFO between stat and open, open() still returns.
    return os.open(name, flags | getattr(os, "O_NONBLOCK", 0))


@contextmanager
def _open_checked(path: Path, max_bytes: int | None = None) -> Iterator[BinaryIO]:
    """Open a file that :func:`check_regular_file` accepted, re-checking the opened descriptor."""
    check_regular_file(path, max_bytes)
    try:
        handle = open(path, "rb", opener=_no_block)
    except PermissionError as exc:
        raise ImageReadError(f"{path}: permission denied (cannot read the file)") from exc
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    with handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ImageReadError(f"{path}: changed into something that is not a regular file while opening")
        yield handle


def _read_bytes(path: Path, max_bytes: int | None = None) -> bytes:
    """Read a whole regular file of at most ``max_bytes`` (default :data:`MAX_FILE_BYTES`); every failure is
    a specific :class:`ImageReadError`."""
    max_bytes = MAX_FILE_BYTES if max_bytes is None else max_bytes
    with _open_checked(path, max_bytes) as handle:
        try:
            chunks = []
            size = 0
            while size <= max_bytes:
                chunk = handle.read(min(1 << 20, max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        except OSError as exc:
            raise ImageReadError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise ImageReadError(f"{path}: file grew past {_size_text(max_bytes)} while it was read")
    if not data:
        raise ImageReadError(f"{path}: file is empty (0 bytes)")
    return data


# --- content sniffing ----------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_NPY_SIGNATURE = b"\x93NUMPY"
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (_PNG_SIGNATURE, "png"),
    (_NPY_SIGNATURE, "npy"),
    (b"\x1f\x8b", "gzip"),
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),
    (b"\xff\x4f\xff\x51", "jpeg2000"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),
    (b"MM\x00+", "tiff"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
    (b"%PDF-", "pdf"),
)
#: What each sniffed format is called in messages.
FORMAT_NAMES = {
    "png": "a PNG image",
    "dicom": "a DICOM file",
    "npy": "a NumPy array (.npy)",
    "gzip": "a gzip file",
    "zip": "a zip archive",
    "jpeg": "a JPEG image",
    "jpeg2000": "a JPEG 2000 image",
    "tiff": "a TIFF image",
    "gif": "a GIF image",
    "webp": "a WebP image",
    "bzip2": "a bzip2 file",
    "xz": "an xz file",
    "zstd": "a zstd file",
    "7z": "a 7-Zip archive",
    "pdf": "a PDF document",
    "text": "a text file",
}
_HINTS = {
    "gzip": "decompress it first (gunzip)",
    "bzip2": "decompress it first",
    "xz": "decompress it first",
    "zstd": "decompress it first",
    "zip": "extract it first",
    "7z": "extract it first",
    "jpeg": "mammograms must be lossless grayscale PNG (8/16-bit) or DICOM",
    "jpeg2000": "mammograms must be grayscale PNG (8/16-bit) or DICOM (which may hold JPEG 2000)",
    "tiff": "convert it to a 16-bit grayscale PNG",
    "gif": "mammograms must be grayscale PNG (8/16-bit) or DICOM",
    "webp": "mammograms must be grayscale PNG (8/16-bit) or DICOM",
}
_SUFFIX_FORMATS = {".png": "png", ".dcm": "dicom", ".dicom": "dicom", ".dic": "dicom", ".npy": "npy"}
#: Bytes read to tell the format (a preamble-less DICOM needs a few elements).
SNIFF_BYTES = 4096
# Value representations of explicit-VR DICOM; those in _LONG_VRS have a 4-byte length after 2 reserved bytes.
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ UC UN UR SV UT UV".split())


def _bare_dicom(head: bytes) -> bool:
    """Little-endian data elements from byte 0 (a DICOM file without preamble, explicit or implicit VR).

    Sane means: group 0002 or 0008 first, then at least two elements with ascending tags, known VRs
    (explicit) and lengths that fit the file; the second may run past the :data:`SNIFF_BYTES` sampled.
    """
    if len(head) < 8 or struct.unpack_from("<H", head, 0)[0] not in (0x0002, 0x0008):
        return False
    for explicit in (True, False):
        offset, count, last = 0, 0, -1
        while offset + 8 <= len(head) and count < 3:
            group, element = struct.unpack_from("<HH", head, offset)
            tag = (group << 16) | element
            if tag <= last or group < 2:
                break
            if explicit:
                vr = head[offset + 4 : offset + 6]
                if vr not in _VRS:
                    break
                if vr in _LONG_VRS:
                    if offset + 12 > len(head):
                        break
                    length = struct.unpack_from("<I", head, offset + 8)[0]
                    offset += 12
                else:
                    length = struct.unpack_from("<H", head, offset + 6)[0]
                    offset += 8
            else:
                length = struct.unpack_from("<I", head, offset + 4)[0]
                offset += 8
            if length == 0xFFFFFFFF:  # undefined length (a sequence): structure seen, stop here
                count += 1
                break
            if length > 1 << 24:
                break
            if offset + length > len(head):
                count += len(head) >= SNIFF_BYTES  # runs past the sample (plausible) or past the file (not)
                break
            count += 1
            last = tag
            offset += length
        if count >= 2:
            return True
    return False


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the end of the sample
            return False
        text = head[: exc.start].decode("utf-8")
    if not text:
        return False
    printable = sum(ch.isprintable() or ch in "\t\r\n\f\v" for ch in text)
    return printable >= 0.95 * len(text)


def sniff_format(head: bytes) -> str | None:
    """The format of a file from its first bytes (:data:`SNIFF_BYTES` are enough), or ``None``.

    Returns one of the keys of :data:`FORMAT_NAMES`: ``"dicom"`` for the ``DICM`` marker at byte 128 or
    plausible data elements from byte 0 (a DICOM file without preamble), ``"png"``, ``"npy"``, the usual
    archive/image/document magic numbers, or ``"text"`` for UTF-8 text.
    """
    if head[128:132] == b"DICM":  # first: a DICOM preamble may itself hold another format's magic
        return "dicom"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if _bare_dicom(head):
        return "dicom"
    if _looks_like_text(head):
        return "text"
    return None


def _claimed(path: Path) -> str | None:
    return _SUFFIX_FORMATS.get(path.suffix.lower())


def _content_kind(path: Path, data: bytes, accepted: tuple[str, ...] = ("png", "dicom", "npy")) -> str:
    """The readable format of ``data``, whatever the extension says; refuses anything else by name."""
    kind = sniff_format(data[:SNIFF_BYTES])
    claimed = _claimed(path)
    expected = FORMAT_NAMES[claimed] if claimed else "a PNG or DICOM image"
    if kind in accepted:
        if claimed is not None and kind != claimed:
            logger.warning(
                "%s: named %s but this is %s; reading it as %s",
                path,
                path.suffix,
                FORMAT_NAMES[kind],
                kind.upper() if kind != "dicom" else "DICOM",
            )
        return kind
    if kind is not None:
        hint = _HINTS.get(kind)
        raise ImageReadError(
            f"{path}: this is {FORMAT_NAMES[kind]}, not {expected}" + (f"; {hint}" if hint else "")
        )
    if claimed == "dicom":
        raise ImageReadError(
            f"{path}: not a DICOM file (no 'DICM' marker at byte 128 and no DICOM data elements at the start; "
            f"first bytes {data[:8]!r})"
        )
    raise ImageReadError(f"{path}: not a PNG or DICOM file (unrecognised content; first bytes {data[:8]!r})")


# --- decoded-size and contrast checks ---------------------------------------------------------------


def _check_size(path: Path, shape: tuple[int, ...]) -> None:
    if len(shape) != 2:
        raise ImageReadError(f"{path}: expected a 2-D grayscale image, got array shape {shape}")
    if min(shape) < MIN_IMAGE_SIDE:
        raise ImageReadError(
            f"{path}: image is {shape[0]}x{shape[1]} pixels, too small to be a mammogram "
            f"(each side must be at least {MIN_IMAGE_SIDE} pixels)"
        )


def _check_header_size(path: Path, what: str, rows: int, cols: int, frames: int = 1) -> None:
    """Refuse a zero-size image or a decompression bomb from the sizes its header declares."""
    if rows <= 0 or cols <= 0:
        raise ImageReadError(f"{path}: {what} header says the image is {rows}x{cols} pixels (zero size)")
    pixels = rows * cols * max(frames, 1)
    if pixels > MAX_PIXELS:
        frames_text = f" x {frames} frames" if frames > 1 else ""
        raise ImageReadError(
            f"{path}: {what} header claims {rows}x{cols} pixels{frames_text} ({pixels / 1e6:,.0f} megapixels), "
            f"more than the {MAX_PIXELS / 1e6:.0f} megapixels of any mammogram; refusing to decode it "
            "(a decompression bomb?)"
        )


def _check_contrast(path: Path, pixels: np.ndarray, bits: int, after: str = "", hint: str = "") -> None:
    """Refuse constant or near-constant images: they carry no tissue contrast (saturated, blank...).

    The rule: at least :data:`MIN_DISTINCT_VALUES` grey values (counted on a sub-sample of large images)
    and ``max - min >= MIN_RANGE_FRACTION * (2**bits - 1)``. Real and synthetic mammograms have
    hundreds to thousands of values spread over most of their range.
    """
    lo, hi = int(pixels.min()), int(pixels.max())
    where = f" {after}" if after else ""
    if lo == hi:
        raise ImageReadError(
            f"{path}: every pixel has the value {lo}{where}: no tissue contrast, not a mammogram{hint}"
        )
    step = max(1, int((pixels.size / 1e6) ** 0.5))
    sample = pixels[::step, ::step]
    distinct = int(np.count_nonzero(np.bincount(sample.ravel())))
    if distinct < MIN_DISTINCT_VALUES:
        raise ImageReadError(
            f"{path}: only {distinct} distinct grey values{where} (at least {MIN_DISTINCT_VALUES} expected): "
            f"no tissue contrast, not a mammogram{hint}"
        )
    floor = MIN_RANGE_FRACTION * (2.0**bits - 1)
    if hi - lo < floor:
        raise ImageReadError(
            f"{path}: values span only {lo}..{hi}{where} ({hi - lo} levels; at least {math.ceil(floor)} expected "
            f"of {bits}-bit data): no tissue contrast, not a mammogram{hint}"
        )


_WARNED_LOW_BITS: set[str] = set()


def _warn_low_bits(path: Path, bits: int, what: str) -> None:
    """One warning per file and process (training reads the same files every epoch)."""
    key = str(path)
    if key in _WARNED_LOW_BITS or len(_WARNED_LOW_BITS) > 100_000:
        return
    _WARNED_LOW_BITS.add(key)
    logger.warning(
        "%s: %d-bit %s: only %d grey levels (mammograms are 10-16 bit); GMIC was trained on 12-16 bit "
        "images, so predictions may be less reliable",
        path,
        bits,
        what,
        2**bits,
    )


# --- reading ---------------------------------------------------------------------------------------


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
        ImageReadError: missing/empty/unreadable file, not a regular file (directory, dangling link,
            FIFO, device), too large, another format (gzip, JPEG, text...), truncated or corrupt data,
            colour or multi-frame images, zero-size or oversized headers, images smaller than
            :data:`MIN_IMAGE_SIDE`, images without tissue contrast, "FOR PROCESSING" or non-MG DICOMs,
            and (when asked) unknown laterality/view. The message names the file.
    """
    file_path = Path(path)
    data = _read_bytes(file_path)
    kind = _content_kind(file_path, data)
    if kind == "png":
        pixels, meta = _read_png(file_path, data)
    elif kind == "npy":
        pixels, meta = _read_npy(file_path, data)
    else:
        pixels, meta = _read_dicom(file_path, data, apply_voi=apply_voi)
    if meta.laterality is None or meta.view is None:
        side, view = laterality_view_from_name(file_path.name)
        if meta.laterality is None and side is not None:
            meta.laterality, meta.laterality_source = side, "filename"
        if meta.view is None and view is not None:
            meta.view, meta.view_source = view, "filename"
    if require_laterality_view:
        _ = meta.full_view  # raises with a specific message
    return pixels, meta


# PNG colour types (IHDR byte 9) and how messages call them.
_PNG_COLOUR_MODELS = {
    2: "RGB colour (3 channels)",
    3: "palette (indexed colour)",
    4: "grey+alpha (2 channels)",
    6: "RGBA colour (4 channels)",
}


def _png_header(path: Path, data: bytes) -> tuple[int, int, int, int]:
    """``(rows, cols, bit_depth, colour_type)`` from the IHDR chunk, checked before any decoding."""
    if len(data) < 33:
        raise ImageReadError(f"{path}: truncated PNG ({len(data)} bytes; the IHDR header is incomplete)")
    length, chunk = struct.unpack_from(">I4s", data, 8)
    if chunk != b"IHDR" or length != 13:
        raise ImageReadError(f"{path}: corrupt PNG (the first chunk is {chunk!r}, not a valid IHDR)")
    cols, rows, depth, colour = struct.unpack_from(">IIBB", data, 16)
    return rows, cols, depth, colour


def _read_png(path: Path, data: bytes) -> tuple[np.ndarray, ImageMeta]:
    from PIL import Image

    rows, cols, depth, colour = _png_header(path, data)
    _check_header_size(path, "PNG", rows, cols)
    if colour in _PNG_COLOUR_MODELS:
        fix = "drop the alpha channel" if colour == 4 else "convert it to grayscale"
        raise ImageReadError(
            f"{path}: PNG colour model is {_PNG_COLOUR_MODELS[colour]}, {depth} bits; mammograms must be "
            f"single-channel grayscale PNG (8- or 16-bit): {fix}"
        )
    if colour != 0:
        raise ImageReadError(f"{path}: corrupt PNG (unknown colour type {colour} in the IHDR header)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            mode = img.mode
            img.load()
            pixels = np.asarray(img)
    except Exception as exc:  # Pillow raises OSError/SyntaxError/ValueError for damaged files
        raise ImageReadError(f"{path}: truncated or corrupt PNG ({exc})") from exc
    if pixels.ndim != 2:
        raise ImageReadError(f"{path}: expected a 2-D grayscale PNG, got array shape {pixels.shape}")
    if mode == "1":
        pixels = pixels.astype(np.uint8)
        bits = 1
    elif pixels.dtype == np.uint8:
        bits = depth if depth < 8 else 8
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
    _check_contrast(path, out, bits)
    meta = ImageMeta(path=str(path), format="png", shape=(out.shape[0], out.shape[1]), bits_stored=bits)
    if bits <= 8:
        _warn_low_bits(path, bits, "PNG")
        meta.notes.append(f"{bits}-bit source")
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


def _dicom_int(path: Path, ds: Any, keyword: str, default: int) -> int:
    """An integer tag (``default`` when absent or empty); a non-numeric value is a clear error."""
    try:
        value = ds.get(keyword, None)
        return default if value is None or value == "" else int(value)
    except (TypeError, ValueError) as exc:
        raise ImageReadError(f"{path}: DICOM {keyword} is not a number ({exc})") from exc


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
    frames = _dicom_int(path, ds, "NumberOfFrames", 1)
    _check_header_size(
        path, "DICOM", _dicom_int(path, ds, "Rows", 0), _dicom_int(path, ds, "Columns", 0), frames
    )
    bits_allocated = _dicom_int(path, ds, "BitsAllocated", 16)
    if bits_allocated not in (1, 8, 16, 32, 64):
        raise ImageReadError(f"{path}: DICOM BitsAllocated is {bits_allocated}; expected 8, 16 or 32")

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
    if frames > 1:
        raise ImageReadError(
            f"{path}: multi-frame DICOM ({frames} frames, e.g. tomosynthesis); expected a 2-D mammogram"
        )
    _ensure_transfer_syntax(ds)
    _check_uncompressed_length(path, ds, frames, bits_allocated)
    try:
        stored = ds.pixel_array
    except Exception as exc:
        if str(ds.file_meta.TransferSyntaxUID) in _HTJ2K and not has_module("openjpeg"):
            # Pillow decodes JPEG 2000 but not its High-Throughput variant: pylibjpeg-openjpeg does.
            raise ImageReadError(
                f"{path}: {missing_extra('openjpeg', 'High-Throughput JPEG 2000 DICOM', exc)}"
            ) from exc
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
    voi = [n for n in notes if n.startswith("VOI")]
    _check_contrast(
        path,
        pixels,
        bits_stored if mapping == "identity" else 16,
        after="after the DICOM VOI window/LUT" if voi else "",
        hint="; the window hides the tissue (preprocess --no-voi reads the stored values)" if voi else "",
    )
    if bits_stored <= 8:
        _warn_low_bits(path, bits_stored, "DICOM")
        notes.append(f"{bits_stored}-bit source")

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


def _check_uncompressed_length(path: Path, ds: Any, frames: int, bits_allocated: int) -> None:
    """Uncompressed pixel data shorter than its header says: the file was cut (a partial copy/download)."""
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_compressed or "PixelData" not in ds:
        return
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    expected = (rows * cols * max(frames, 1) * samples * bits_allocated + 7) // 8
    found = len(ds.PixelData or b"")
    if found < expected:
        raise ImageReadError(
            f"{path}: truncated DICOM: the pixel data is {found:,} bytes, the header ({rows}x{cols}, "
            f"{bits_allocated}-bit) needs {expected:,}; the file was cut short (copy or download again)"
        )


# High-Throughput JPEG 2000 (Lossless, Lossless RPCL, lossy): pydicom decodes it with pylibjpeg-openjpeg only.
_HTJ2K = frozenset({"1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"})


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
    kind = _content_kind(file_path, data, accepted=("png", "dicom"))
    if kind == "png":
        from PIL import Image

        rows, cols, _, _ = _png_header(file_path, data)
        _check_header_size(file_path, "PNG", rows, cols)
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                arr = np.asarray(img)
        except Exception as exc:
            raise ImageReadError(f"{file_path}: truncated or corrupt mask PNG ({exc})") from exc
        if arr.ndim == 3:
            arr = arr[..., :3].max(axis=2) if arr.shape[2] >= 3 else arr[..., 0]
    else:
        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
        except Exception as exc:
            raise ImageReadError(
                f"{file_path}: cannot read mask DICOM ({type(exc).__name__}: {exc})"
            ) from exc
        frames = _dicom_int(file_path, ds, "NumberOfFrames", 1)
        _check_header_size(
            file_path,
            "DICOM",
            _dicom_int(file_path, ds, "Rows", 0),
            _dicom_int(file_path, ds, "Columns", 0),
            frames,
        )
        _ensure_transfer_syntax(ds)
        try:
            arr = ds.pixel_array
        except Exception as exc:
            raise ImageReadError(
                f"{file_path}: cannot read mask DICOM ({type(exc).__name__}: {exc})"
            ) from exc
    if arr.ndim != 2:
        raise ImageReadError(f"{file_path}: mask must be 2-D, got shape {arr.shape}")
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise ImageReadError(
            f"{file_path}: mask is {arr.shape[0]}x{arr.shape[1]} but the image is {shape[0]}x{shape[1]}"
        )
    return np.asarray(arr != 0)


@dataclass(frozen=True)
class DicomIdentity:
    """Who and what a DICOM file shows, from its header alone (see :func:`read_dicom_identity`).

    Attributes:
        patient_id: ``PatientID``.
        study_uid: ``StudyInstanceUID``.
        accession_number: ``AccessionNumber`` (the exam's id in the RIS; used when the study UID is missing).
        sop_instance_uid: ``SOPInstanceUID`` (the image's own id).
        laterality: ``"L"``/``"R"`` from ``ImageLaterality`` then ``Laterality``.
        view: ``"CC"``/``"MLO"`` from ``ViewPosition`` then ``ViewCodeSequence``.
    """

    patient_id: str | None = None
    study_uid: str | None = None
    accession_number: str | None = None
    sop_instance_uid: str | None = None
    laterality: str | None = None
    view: str | None = None

    @property
    def exam_key(self) -> str | None:
        """The exam: the study UID, else ``<PatientID>_<AccessionNumber>`` (accession numbers are
        only unique within one site), else ``None``."""
        if self.study_uid:
            return self.study_uid
        if self.accession_number:
            return f"{self.patient_id}_{self.accession_number}" if self.patient_id else self.accession_number
        return None


_IDENTITY_TAGS = [
    "PatientID",
    "StudyInstanceUID",
    "AccessionNumber",
    "SOPInstanceUID",
    "ImageLaterality",
    "Laterality",
    "ViewPosition",
    "ViewCodeSequence",
]


def read_dicom_identity(path: str | os.PathLike[str]) -> DicomIdentity | None:
    """Patient, study, laterality and view of a DICOM file, reading its header only.

    The file goes through the same guards as :func:`read_image` (regular file, size), then only the
    elements before the pixel data are parsed (``stop_before_pixels``; values over 1 KB are not read).

    Returns:
        ``None`` when the content is not DICOM (a PNG, say), else a :class:`DicomIdentity`.

    Raises:
        ImageReadError: the file cannot be opened or its header cannot be parsed.
    """
    import pydicom

    file_path = Path(path)
    with _open_checked(file_path) as handle:
        try:
            head = handle.read(SNIFF_BYTES)
            if sniff_format(head) != "dicom":
                return None
            handle.seek(0)
            ds = pydicom.dcmread(
                handle, force=True, stop_before_pixels=True, defer_size="1 KB", specific_tags=_IDENTITY_TAGS
            )
            side, view = _dicom_laterality_view(ds)
            return DicomIdentity(
                patient_id=_dicom_str(ds, "PatientID"),
                study_uid=_dicom_str(ds, "StudyInstanceUID"),
                accession_number=_dicom_str(ds, "AccessionNumber"),
                sop_instance_uid=_dicom_str(ds, "SOPInstanceUID"),
                laterality=side,
                view=view,
            )
        except ImageReadError:
            raise
        except Exception as exc:  # pydicom raises many types on damaged headers
            raise ImageReadError(
                f"{file_path}: cannot parse the DICOM header ({type(exc).__name__}: {exc})"
            ) from exc
