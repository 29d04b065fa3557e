"""A throw-away Orthanc PACS for the DICOMweb tests: 127.0.0.1 only, temporary storage, DICOMweb plugin.

Debian's packages ``orthanc`` and ``orthanc-dicomweb`` provide the server and the plugin (``.ci/run`` installs
them). :func:`find_orthanc` says what is missing; :class:`OrthancServer` writes the JSON configuration, starts
``Orthanc cfg.json``, waits until the REST API and the DICOMweb root answer, and stops it.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

#: Where Debian's orthanc-dicomweb puts the plugin (the first that exists is used).
PLUGIN_CANDIDATES = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
)


def find_orthanc() -> tuple[Path | None, Path | None]:
    """``(Orthanc binary, DICOMweb plugin)``, each ``None`` when not installed."""
    binary = shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if Path(p).is_file()), None
    )
    plugin = next((p for p in PLUGIN_CANDIDATES if p.is_file()), None)
    if plugin is None:
        found = (
            sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))
            if Path("/usr/lib/orthanc").is_dir()
            else []
        )
        plugin = found[0] if found else None
    return (Path(binary) if binary else None), plugin


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OrthancServer:
    """One Orthanc process (use as a context manager).

    Args:
        binary: the ``Orthanc`` executable.
        plugin: the DICOMweb plugin library.
        root: temporary folder for the configuration, storage, index and log.
    """

    def __init__(self, binary: Path, plugin: Path, root: Path) -> None:
        self.binary, self.plugin, self.root = binary, plugin, root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.log = root / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None

    def config(self) -> dict[str, object]:
        return {
            "Name": "mammogmic-test",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,  # 127.0.0.1 only
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,  # no DICOM port; a free one in case the option is unknown
            "DicomPort": free_port(),
            "Plugins": [str(self.plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StorageCompression": False,
        }

    def __enter__(self) -> OrthancServer:
        cfg = self.root / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=1))
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [str(self.binary), str(cfg)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            self._wait_ready(30.0)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self.process.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.dicomweb}/studies", timeout=2) as answer:
                    if answer.status in (200, 204):
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not answer within {seconds:g} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def upload(self, path: Path) -> None:
        """Store one DICOM file through Orthanc's REST API (``POST /instances``)."""
        request = urllib.request.Request(
            f"{self.url}/instances",
            data=path.read_bytes(),
            method="POST",
            headers={"Content-Type": "application/dicom"},
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            status = json.loads(answer.read())
        if status.get("Status") not in ("Success", "AlreadyStored"):
            raise RuntimeError(f"Orthanc did not store {path}: {status}")
