"""Finding and naming the images given to ``predict``/``visualize``: folder scans, image ids, DICOM identity.

* :func:`scan_folder` lists what a folder holds that looks like an image: names ending in ``.png``,
  ``.dcm``, ``.dicom`` (whatever they are: directories, dangling links, FIFOs are listed too, so that
  reading reports them instead of the scan skipping them silently) and extension-less or UID-named
  files (``1.2.840.113619.2.55...``, ``IM000001``) whose content starts like DICOM, as PACS exports
  write them. Folder links are not followed.
* :func:`clean_id` keeps an id readable: Unicode stays (``bon image été``), only control characters
  and path separators become ``_``. File names made from ids are a separate matter
  (:func:`mammogmic.evaluation.outputs.file_stem`).
* :func:`unique_ids` is the one de-duplication of ids (``a``, ``a_1``, ``a_2``...).
* :func:`dicom_exam` reads a DICOM header (never the pixels) for the patient and the exam.
"""

from __future__ import annotations

import logging
import os
import stat
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mammogmic.data.io import SNIFF_BYTES, read_dicom_identity, sniff_format
from mammogmic.errors import ImageReadError, MammogmicError

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "FolderScan",
    "clean_id",
    "dicom_exam",
    "id_from_relative_path",
    "scan_folder",
    "strip_image_suffix",
    "unique_ids",
]

IMAGE_SUFFIXES = (".png", ".dcm", ".dicom")
# Names of DICOM files that are not images (the DICOMDIR index of a CD/PACS export).
_NOT_IMAGES = {"DICOMDIR"}


def clean_id(text: str) -> str:
    """An id as readable as its source: Unicode kept (NFC), control characters and ``/``, ``\\`` as ``_``.

    >>> clean_id("bon image été")
    'bon image été'
    >>> clean_id("a/b\\tc")
    'a_b_c'
    """
    text = unicodedata.normalize("NFC", text)
    chars = [
        "_" if ch in "/\\" or unicodedata.category(ch) in ("Cc", "Zl", "Zp", "Cs") else ch for ch in text
    ]
    return "".join(chars).strip() or "image"


def unique_ids(ids: Sequence[str]) -> list[str]:
    """``ids`` with repeats suffixed ``_1``, ``_2``...: the first keeps its id, and a new id never takes
    one that another input already has."""
    taken = set(ids)
    seen: set[str] = set()
    out = []
    for image_id in ids:
        new, n = image_id, 0
        while new in seen or (new != image_id and new in taken):
            n += 1
            new = f"{image_id}_{n}"
        seen.add(new)
        out.append(new)
    return out


def strip_image_suffix(name: str) -> str:
    """``name`` without ``.png``/``.dcm``/``.dicom``; other dots stay (``1.2.840.1`` is a UID, not ``.1``)."""
    if Path(name).suffix.lower() in IMAGE_SUFFIXES:
        return name[: -len(Path(name).suffix)]
    return name


def id_from_relative_path(rel: Path) -> str:
    """``sub/1_R-MLO.png`` → ``sub_1_R-MLO``: folders joined by ``_``, the image suffix dropped."""
    parts = [*rel.parts[:-1], strip_image_suffix(rel.name)]
    return clean_id("_".join(parts))


@dataclass
class FolderScan:
    """What :func:`scan_folder` found.

    Attributes:
        paths: image-like entries, sorted (regular files, and non-files named like images).
        ignored: files left out because neither their name nor their content is an image's.
    """

    paths: list[Path] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)


def _uid_like(name: str) -> bool:
    """No extension, or a numeric one (``1.2.840.10008.5``): a PACS export's naming."""
    suffix = Path(name).suffix
    return suffix == "" or suffix[1:].isdigit()


def _starts_like_dicom(path: Path) -> bool:
    """Regular file whose first bytes sniff as DICOM; opened only after ``stat`` says it is regular."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    with os.fdopen(fd, "rb") as handle:
        try:
            return stat.S_ISREG(os.fstat(fd).st_mode) and sniff_format(handle.read(SNIFF_BYTES)) == "dicom"
        except OSError:
            return False


def scan_folder(folder: Path, exclude: Sequence[Path] = ()) -> FolderScan:
    """Image-like entries below ``folder`` (recursive; folder links are not followed).

    Args:
        folder: the input folder.
        exclude: folders to leave out (the output folder when it lies inside the input).

    Raises:
        MammogmicError: ``folder`` itself cannot be listed.

    Returns:
        A :class:`FolderScan`. Directories and links that cannot be followed are listed when their name
        ends in an image suffix; a sub-folder that cannot be listed is listed itself, so that reading
        reports it.
    """
    skip = [e.resolve() for e in exclude]
    scan = FolderScan()
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as it:
                entries = list(it)
        except OSError as exc:
            if current == folder:
                raise MammogmicError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from exc
            scan.paths.append(Path(current))  # reading reports it as a folder that cannot be listed
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                if any(path.resolve().is_relative_to(s) for s in skip):
                    continue
                pending.append(path)
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    scan.paths.append(path)  # a folder named like an image: reading says what it is
                continue
            if path.suffix.lower() in IMAGE_SUFFIXES:
                scan.paths.append(path)
            elif entry.name not in _NOT_IMAGES and _uid_like(entry.name) and _starts_like_dicom(path):
                scan.paths.append(path)
            else:
                scan.ignored.append(path)
    scan.paths = sorted(set(scan.paths))
    scan.ignored.sort()
    if scan.ignored:
        shown = ", ".join(p.name for p in scan.ignored[:5])
        more = f" and {len(scan.ignored) - 5} more" if len(scan.ignored) > 5 else ""
        logger.info(
            "%s: %d file(s) are not images and were left out: %s%s", folder, len(scan.ignored), shown, more
        )
    return scan


def dicom_exam(path: Path) -> tuple[str | None, str | None]:
    """``(patient_id, exam_id)`` from a DICOM header, or ``(None, None)`` for non-DICOM or unreadable files.

    The exam is the ``StudyInstanceUID``, else ``<PatientID>_<AccessionNumber>``; only the header is read.
    Unreadable files are left for the read stage, which reports them with their reason.
    """
    try:
        identity = read_dicom_identity(path)
    except ImageReadError as exc:
        logger.debug("%s: no DICOM identity (%s)", path, exc)
        return None, None
    if identity is None:
        return None, None
    return identity.patient_id, identity.exam_key
