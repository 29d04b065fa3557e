"""``mammogmic predict --dicomweb URL --study UID [--dicomweb-store]`` against a real Orthanc (DICOMweb plugin).

The ``orthanc`` fixture (tests/conftest.py) starts Debian's Orthanc on 127.0.0.1 with a temporary storage
folder; without the packages these tests skip, and under ``CI`` they fail. The failure tests need no server:
a port nobody listens on (refused) and one that accepts but never answers (timeout).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from mammogmic.cli.main import main
from mammogmic.data.synth import generate_dataset

hd = pytest.importorskip("highdicom")
dicomweb_client = pytest.importorskip("dicomweb_client")


@pytest.fixture(scope="module")
def exam(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One synthetic four-view exam as MG DICOM files (the project's synthetic generator)."""
    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, n_exams=1, size=(256, 160), seed=5, dicom=True)
    return sorted((root / "dicom").glob("*.dcm"))


def _study(paths: list[Path]) -> str:
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def _run(url: str, study: str, out: Path, model: Path, size_args: list[str], *extra: str) -> int:
    args = ["predict", "--dicomweb", url, "--study", study, "--model", str(model), "--out", str(out)]
    return main([*args, *size_args, *extra])


def test_round_trip_through_orthanc(  # type: ignore[no-untyped-def]
    tmp_path: Path, orthanc, exam: list[Path], tiny_model: Path, size_args, dciodvfy
) -> None:
    for path in exam:
        orthanc.upload(path)
    study, out = _study(exam), tmp_path / "out"
    start = time.perf_counter()
    assert _run(orthanc.dicomweb, study, out, tiny_model, size_args, "--dicomweb-store") == 0
    seconds = time.perf_counter() - start
    print(f"round trip (fetch 4 MG, predict, write SR + 4 SEG, STOW): {seconds:.1f} s")

    # Fetched instances are kept, identical to what was uploaded.
    fetched = sorted((out / "retrieved").rglob("*.dcm"))
    assert len(fetched) == 4
    originals = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in exam}
    for path in fetched:
        ds = pydicom.dcmread(path)
        original = originals[str(ds.SOPInstanceUID)]
        assert ds.pixel_array.tobytes() == original.pixel_array.tobytes()
        assert path.parent.name == ds.SeriesInstanceUID and path.parent.parent.name == study

    # Read SR and SEG back from Orthanc: QIDO by modality in the study, WADO of the instances.
    client = dicomweb_client.DICOMwebClient(orthanc.dicomweb)
    series = {
        modality: client.search_for_series(study_instance_uid=study, search_filters={"Modality": modality})
        for modality in ("SR", "SEG")
    }
    assert len(series["SR"]) == 1 and len(series["SEG"]) == 1

    def instances(item: dict) -> list[pydicom.Dataset]:  # type: ignore[type-arg]
        series_uid = item["0020000E"]["Value"][0]
        found = client.search_for_instances(study_instance_uid=study, series_instance_uid=series_uid)
        return [client.retrieve_instance(study, series_uid, i["00080018"]["Value"][0]) for i in found]

    (sr_ds,) = instances(series["SR"][0])
    segs = instances(series["SEG"][0])
    assert len(segs) == 4
    local = {p.stem for p in (out / "dicom").rglob("*.dcm")}
    assert {str(sr_ds.SOPInstanceUID), *(str(s.SOPInstanceUID) for s in segs)} == local  # what we wrote

    assert sr_ds.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
    sr = hd.sr.ComprehensiveSR.from_dataset(sr_ds)
    images = pd.read_csv(out / "image_predictions.csv", dtype={"image_index": str}).set_index("image_index")
    values = {}
    for group in sr.content.get_image_measurement_groups():
        for m in group.get_measurements():
            if m.derivation is None:  # image level: one source image
                (uid,) = [r.referenced_sop_instance_uid for r in m.referenced_images]
                kind = "malignant" if m.name.value == "111047" else "benign"
                values[(uid, kind)] = float(m.value)
    assert len(values) == 8
    for (uid, kind), value in values.items():
        assert uid in originals
        assert value == pytest.approx(images.loc[uid, f"{kind}_pred"], abs=1e-6)  # ids are the SOP UIDs here
    for seg_ds in segs:
        seg = hd.seg.Segmentation.from_dataset(seg_ds)
        ((_, _, uid),) = seg.get_source_image_uids()
        assert uid in originals
    for path in (out / "dicom").rglob("*.dcm"):
        errors, output = dciodvfy(path)
        assert errors == [], output


def test_study_not_found(tmp_path: Path, orthanc, tiny_model: Path, size_args, capsys) -> None:  # type: ignore[no-untyped-def]
    assert _run(orthanc.dicomweb, "1.2.3.4.5.6", tmp_path / "out", tiny_model, size_args) == 2
    err = capsys.readouterr().err
    assert "study 1.2.3.4.5.6 not found" in err and orthanc.dicomweb in err
    assert not (tmp_path / "out").exists()  # nothing made before the server said so


def test_study_without_mg_series(  # type: ignore[no-untyped-def]
    tmp_path: Path, orthanc, exam: list[Path], tiny_model: Path, size_args, capsys
) -> None:
    ds = pydicom.dcmread(exam[0])
    ds.Modality = "CR"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.ComputedRadiographyImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    path = tmp_path / "cr.dcm"
    ds.save_as(path, enforce_file_format=True)
    orthanc.upload(path)
    assert _run(orthanc.dicomweb, str(ds.StudyInstanceUID), tmp_path / "out", tiny_model, size_args) == 2
    err = capsys.readouterr().err
    assert "has no MG (mammography) series" in err and "CR" in err
    assert not (tmp_path / "out").exists()


def test_store_failure_is_reported_and_nothing_is_lost(  # type: ignore[no-untyped-def]
    tmp_path: Path, orthanc, exam: list[Path], tiny_model: Path, size_args, monkeypatch
) -> None:
    import mammogmic.dicom.web as web

    for path in exam:
        orthanc.upload(path)

    def refused(server, paths, study_uid):  # type: ignore[no-untyped-def]
        raise web.DicomWebError(
            f"{server.url}: STOW-RS of {len(paths)} instance(s): HTTP 503 Service Unavailable"
        )

    monkeypatch.setattr(web, "store_files", refused)
    out = tmp_path / "out"
    assert _run(orthanc.dicomweb, _study(exam), out, tiny_model, size_args, "--dicomweb-store") == 1
    errors = pd.read_csv(out / "errors.csv")
    assert set(errors["stage"]) == {"dicomweb-store"}
    assert (
        errors["error"].str.contains("HTTP 503").all()
        and errors["error"].str.contains("the file is kept").all()
    )
    assert len(list((out / "dicom").rglob("*.dcm"))) == 5  # SR + 4 SEG on disk
    assert len(pd.read_csv(out / "image_predictions.csv")) == 4


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_server_down(tmp_path: Path, tiny_model: Path, size_args, capsys) -> None:  # type: ignore[no-untyped-def]
    url = f"http://127.0.0.1:{_unused_port()}/dicom-web"
    assert _run(url, "1.2.3", tmp_path / "out", tiny_model, size_args) == 2
    err = capsys.readouterr().err
    assert "cannot connect" in err and "Connection refused" in err and url in err
    assert not (tmp_path / "out").exists()


def test_timeout(tmp_path: Path, tiny_model: Path, size_args, capsys) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web"
        start = time.perf_counter()
        rc = _run(url, "1.2.3", tmp_path / "out", tiny_model, size_args, "--dicomweb-timeout", "0.5")
        assert rc == 2 and time.perf_counter() - start < 30
    err = capsys.readouterr().err
    assert "no answer within 0.5 s" in err and "--dicomweb-timeout" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--study", "1.2.3"], "--study needs --dicomweb"),
        (["--dicomweb", "http://127.0.0.1:9/dicom-web"], "--dicomweb needs at least one --study"),
        (["--dicomweb-store"], "--dicomweb-store needs --dicomweb"),
        (["--dicomweb", "ftp://pacs/", "--study", "1.2"], "expected the http:// or https:// URL"),
    ],
)
def test_bad_option_combinations(
    tmp_path: Path, tiny_model: Path, capsys, extra: list[str], message: str
) -> None:  # type: ignore[no-untyped-def]
    args = ["predict", "--model", str(tiny_model), "--out", str(tmp_path / "out"), *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
