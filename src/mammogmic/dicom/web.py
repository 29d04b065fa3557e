"""A study from a PACS over DICOMweb, and the results back (``mammogmic predict --dicomweb URL --study UID``).

* :func:`find_study`: QIDO-RS finds the study and its series (nothing is written yet, so a wrong URL, a
  server that is down or a study that is not there fails before any folder is made); other series than MG
  (an earlier SR, a CAD object) are listed and left alone.
* :func:`fetch_study`: the MG series' instances are retrieved one by one with WADO-RS (in their stored
  transfer syntax) into ``DEST/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``, where they stay (an instance already
  there is not fetched again).
* :func:`store_files`: STOW-RS of written SR/SEG files, with the server's per-instance failures.

Every failure is a :class:`DicomWebError` whose message names the server, the request and the cause: cannot
connect (server down, wrong port), no answer within the timeout, HTTP status (with the start of the answer),
study not found, a study without MG series. Nothing is retried silently and nothing already fetched or
written is deleted.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mammogmic._extras import missing_extra
from mammogmic._outdir import atomic_write_bytes
from mammogmic.errors import MammogmicError

try:
    import pydicom
    import requests
    from dicomweb_client.api import DICOMwebClient
except ImportError as exc:  # pragma: no cover - exercised by test_extras
    raise missing_extra("dicomweb_client", "mammogmic predict --dicomweb", exc) from exc

logger = logging.getLogger(__name__)

__all__ = [
    "DicomWebError",
    "Retrieved",
    "Server",
    "Stored",
    "StudyPlan",
    "connect",
    "fetch_study",
    "find_study",
    "store_files",
]

#: A DICOM UID: what may become a file or folder name here.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_MODALITY, _SERIES_UID, _SOP_UID = "00080060", "0020000E", "00080018"


class DicomWebError(MammogmicError):
    """The DICOMweb server could not be used for a request; the message says which and why."""


def _check_uid(value: Any, what: str, url: str) -> str:
    text = str(value or "")
    if not (_UID.fullmatch(text) and len(text) <= 64):
        raise DicomWebError(f"{url}: the server gave {what} {text!r}, which is not a DICOM UID")
    return text


@dataclass(frozen=True)
class Server:
    """A DICOMweb server: its root URL, the per-request timeout (seconds) and the client."""

    url: str
    timeout: float
    client: DICOMwebClient


def connect(url: str, timeout: float) -> Server:
    """The DICOMweb root ``url`` (e.g. ``http://pacs:8042/dicom-web``); every request gives up after
    ``timeout`` seconds without an answer and is not retried (a rerun resumes).

    Raises:
        DicomWebError: not an http(s) URL, or a timeout that is not positive.
    """
    if not re.match(r"https?://[^/]", url):
        raise DicomWebError(f"--dicomweb {url!r}: expected the http:// or https:// URL of the DICOMweb root")
    if not timeout > 0:
        raise DicomWebError(f"--dicomweb-timeout {timeout!r}: expected a positive number of seconds")
    client = DICOMwebClient(url=url.rstrip("/"), timeout=timeout)
    client.set_http_retry_params(retry=False)
    return Server(url.rstrip("/"), float(timeout), client)


def _reason(exc: BaseException) -> str:
    """The innermost cause of a requests error (``[Errno 111] Connection refused``), not urllib3's wrappers."""
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\][^'\")\]]*", text)
    return match.group(0).strip() if match else text[:200]


@contextmanager
def _request(url: str, what: str, timeout: float) -> Iterator[None]:
    """Turn the errors of one DICOMweb request into a :class:`DicomWebError` naming the server and request."""
    try:
        yield
    except requests.exceptions.Timeout as exc:
        raise DicomWebError(
            f"{url}: {what}: no answer within {timeout:g} s (raise --dicomweb-timeout for a slow server)"
        ) from exc
    except requests.exceptions.ConnectionError as exc:
        raise DicomWebError(
            f"{url}: {what}: cannot connect ({_reason(exc)}); is the server running, and is this its DICOMweb "
            "root URL?"
        ) from exc
    except requests.exceptions.HTTPError as exc:
        response = exc.response
        status = f"HTTP {response.status_code} {response.reason}" if response is not None else str(exc)
        body = (response.text or "").strip().replace("\n", " ")[:200] if response is not None else ""
        raise DicomWebError(f"{url}: {what}: {status}{f' ({body})' if body else ''}") from exc
    except requests.exceptions.RequestException as exc:
        raise DicomWebError(f"{url}: {what}: {type(exc).__name__}: {exc}") from exc


def _value(item: dict[str, Any], tag: str) -> str | None:
    """First value of ``tag`` in a DICOM JSON object (QIDO-RS answer)."""
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


@dataclass(frozen=True)
class StudyPlan:
    """What :func:`find_study` found: the study's MG series and the series left alone.

    Attributes:
        study_uid: the StudyInstanceUID.
        mg_series: SeriesInstanceUIDs of its MG series.
        skipped_series: ``(SeriesInstanceUID, Modality)`` of its other series.
    """

    study_uid: str
    mg_series: tuple[str, ...]
    skipped_series: tuple[tuple[str, str], ...] = ()


def find_study(server: Server, study_uid: str) -> StudyPlan:
    """QIDO-RS: check that the study exists and has MG series (nothing is written).

    Raises:
        DicomWebError: the server cannot be used, the study does not exist there, or it has no MG series.
    """
    url, timeout, client = server.url, server.timeout, server.client
    uid = _check_uid(study_uid, "the study UID", url)
    with _request(url, f"QIDO-RS search for study {uid}", timeout):
        found = client.search_for_studies(search_filters={"StudyInstanceUID": uid})
    if not found:
        raise DicomWebError(
            f"{url}: study {uid} not found (QIDO-RS found no study with this StudyInstanceUID)"
        )
    with _request(url, f"QIDO-RS search for the series of study {uid}", timeout):
        series = client.search_for_series(study_instance_uid=uid, fields=["Modality"])
    mg: list[str] = []
    skipped: list[tuple[str, str]] = []
    for item in series:
        series_uid = _check_uid(_value(item, _SERIES_UID), "a SeriesInstanceUID", url)
        modality = (_value(item, _MODALITY) or "").upper()
        if modality == "MG":
            mg.append(series_uid)
        else:
            skipped.append((series_uid, modality or "unknown"))
    if not mg:
        modalities = sorted({m for _, m in skipped}) or ["none"]
        raise DicomWebError(
            f"{url}: study {uid} has no MG (mammography) series; its series' modalities: {', '.join(modalities)}"
        )
    return StudyPlan(uid, tuple(mg), tuple(skipped))


@dataclass
class Retrieved:
    """The MG instances of a study on disk.

    Attributes:
        paths: every MG instance file of the study (downloaded now or kept from an earlier run), sorted.
        n_downloaded: instances fetched by this call.
        n_kept: instances already on disk (not fetched again).
    """

    paths: list[Path] = field(default_factory=list)
    n_downloaded: int = 0
    n_kept: int = 0


def fetch_study(
    server: Server,
    plan: StudyPlan,
    dest: Path,
    *,
    progress: Callable[[int], None] | None = None,
) -> Retrieved:
    """Fetch the instances of the MG series of ``plan`` (from :func:`find_study`) into
    ``dest/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``; instances already there are kept, not fetched again.

    Raises:
        DicomWebError: a request failed (instances fetched before it stay on disk).
    """
    url, timeout, client = server.url, server.timeout, server.client
    uid = plan.study_uid
    out = Retrieved()
    for series_uid in plan.mg_series:
        with _request(url, f"QIDO-RS search for the instances of series {series_uid}", timeout):
            instances = client.search_for_instances(study_instance_uid=uid, series_instance_uid=series_uid)
        for item in instances:
            sop_uid = _check_uid(_value(item, _SOP_UID), "a SOPInstanceUID", url)
            path = dest / uid / series_uid / f"{sop_uid}.dcm"
            if path.exists():
                out.n_kept += 1
            else:
                with _request(url, f"WADO-RS retrieve of instance {sop_uid}", timeout):
                    ds = client.retrieve_instance(
                        uid, series_uid, sop_uid, media_types=(("application/dicom", "*"),)
                    )
                if str(ds.get("SOPInstanceUID", "")) != sop_uid:
                    raise DicomWebError(
                        f"{url}: WADO-RS retrieve of instance {sop_uid} returned instance "
                        f"{ds.get('SOPInstanceUID')!r}"
                    )
                buffer = io.BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
                atomic_write_bytes(path, buffer.getvalue())
                out.n_downloaded += 1
            out.paths.append(path)
            if progress is not None:
                progress(1)
    out.paths.sort()
    return out


@dataclass
class Stored:
    """The answer to a STOW-RS request: SOP Instance UIDs stored, and failed ones with the server's reason."""

    stored: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def store_files(server: Server, paths: Sequence[Path], study_uid: str) -> Stored:
    """STOW-RS ``paths`` (SR and SEG files of study ``study_uid``) to the server in one request.

    Raises:
        DicomWebError: the request failed as a whole (the files stay where they are).
    """
    url, timeout, client = server.url, server.timeout, server.client
    datasets = [pydicom.dcmread(p) for p in paths]
    with _request(url, f"STOW-RS of {len(datasets)} instance(s) to study {study_uid}", timeout):
        answer = client.store_instances(datasets, study_instance_uid=study_uid)
    out = Stored()
    for item in answer.get("ReferencedSOPSequence", []) or []:
        out.stored.append(str(item.ReferencedSOPInstanceUID))
    for item in answer.get("FailedSOPSequence", []) or []:
        out.failed[str(item.ReferencedSOPInstanceUID)] = (
            f"failure reason {item.get('FailureReason', 'unknown')}"
        )
    for ds in datasets:  # an instance the answer does not mention was not confirmed
        uid = str(ds.SOPInstanceUID)
        if uid not in out.stored and uid not in out.failed:
            out.failed[uid] = "not confirmed in the STOW-RS answer"
    return out
