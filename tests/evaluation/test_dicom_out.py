"""``mammogmic predict --dicom-out``: SR (TID 1500) per study and FRACTIONAL SEG per image.

Every written object goes through dicom3tools' ``dciodvfy`` (no errors allowed) and is read back with
highdicom: the numbers must be those of ``image_predictions.csv`` / ``breast_predictions.csv``, the
references must resolve to the input images, patches and saliency maps must sit where the data path took
them from in the source image (mirroring undone).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from mammogmic.cli.main import main
from mammogmic.data.sample import ImageItem, InputContract, input_geometry, load_source
from mammogmic.data.synth import generate_dataset

hd = pytest.importorskip("highdicom")

# The probability of a class in the SR: (quantity, finding) codes.
QUANTITY = {"malignant": "111047", "benign": "122157"}
FINDING = {"malignant": "21594007", "benign": "30807003"}


@pytest.fixture(scope="module")
def dicom_exams(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two synthetic four-view exams as MG DICOM files (the project's synthetic generator)."""
    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, n_exams=2, size=(256, 160), seed=3, dicom=True)
    return root / "dicom"


def _predict(tmp: Path, inputs: list[Path], model: Path, size_args: list[str], *extra: str) -> int:
    args = ["predict", *map(str, inputs), "--model", str(model), "--out", str(tmp / "out"), *size_args]
    return main([*args, "--dicom-out", str(tmp / "dicom_results"), *extra])


def _measurements(sr) -> list[dict]:  # type: ignore[no-untyped-def]
    """Every probability of the SR: label, class, value, unit, derivation, referenced SOP Instance UIDs."""
    out = []
    for group in sr.content.get_image_measurement_groups():
        for m in group.get_measurements():
            kind = next(k for k, code in FINDING.items() if group.finding_type.value == code)
            assert m.name.value == QUANTITY[kind]
            derivation = m.derivation.value if m.derivation is not None else None
            out.append(
                {
                    "label": str(group.tracking_identifier),
                    "kind": kind,
                    "value": float(m.value),
                    "unit": m.unit.value,
                    "derivation": derivation,
                    "sources": [r.referenced_sop_instance_uid for r in m.referenced_images],
                }
            )
    return out


def test_sr_and_seg_are_valid_and_hold_the_csv_numbers(  # type: ignore[no-untyped-def]
    tmp_path: Path, dicom_exams: Path, tiny_model: Path, size_args, breast_png, dciodvfy
) -> None:
    png = tmp_path / "png" / "9_L-CC.png"
    breast_png(png, "L", 0)
    rc = _predict(tmp_path, [dicom_exams, png], tiny_model, size_args, "--save-saliency", "--save-patches")
    assert rc == 0
    out, results = tmp_path / "out", tmp_path / "dicom_results"
    images = pd.read_csv(out / "image_predictions.csv", dtype={"image_index": str})
    breasts = pd.read_csv(out / "breast_predictions.csv", dtype=str)
    run = json.loads((out / "run.json").read_text())
    assert run["dicom_out"]["n_not_dicom"] == 1 and run["dicom_out"]["n_failed"] == 0  # the PNG: said once
    assert (run["dicom_out"]["n_sr"], run["dicom_out"]["n_seg"]) == (2, 8)
    index = pd.read_csv(results / "dicom_outputs.csv", dtype=str)
    assert sorted(index["kind"]) == ["SEG"] * 8 + ["SR"] * 2 and "9_L-CC" not in " ".join(
        index["source_image_ids"]
    )

    sources = {p: pydicom.dcmread(p) for p in sorted(dicom_exams.glob("*.dcm"))}
    by_sop = {str(ds.SOPInstanceUID): (p, ds) for p, ds in sources.items()}
    image_of = {str(ds.SOPInstanceUID): p.stem for p, ds in sources.items()}  # image ids are file stems here
    written = sorted(results.rglob("*.dcm"))
    assert len(written) == 10
    for path in written:
        errors, output = dciodvfy(path)
        assert errors == [], f"{path}:\n{output}"

    patches = json.loads((out / "patches.json").read_text())
    contract = InputContract.from_dict(run["models"][0]["input_contract"])
    for sr_path in sorted((results / "sr").glob("*.dcm")):
        sr = hd.sr.srread(sr_path)
        study = str(sr.StudyInstanceUID)
        study_sources = {u: v for u, v in by_sop.items() if str(v[1].StudyInstanceUID) == study}
        assert len(study_sources) == 4
        first = next(iter(study_sources.values()))[1]
        # Patient and study copied from the sources (empty where a source has none), new series and instance.
        for keyword in ("PatientID", "PatientName", "PatientSex", "StudyID", "StudyDate", "AccessionNumber"):
            assert str(sr.get(keyword) or "") == str(first.get(keyword) or ""), keyword
        assert "AccessionNumber" not in first and sr.AccessionNumber == ""  # type 2: present, unknown
        assert sr.SeriesInstanceUID not in {str(ds.SeriesInstanceUID) for ds in sources.values()}
        assert sr.SOPInstanceUID not in by_sop
        evidence = {
            str(i.ReferencedSOPInstanceUID)
            for s in sr.CurrentRequestedProcedureEvidenceSequence
            for se in s.ReferencedSeriesSequence
            for i in se.ReferencedSOPSequence
        }
        assert evidence == set(study_sources)
        assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"

        found = _measurements(sr)
        assert {m["unit"] for m in found} == {"{probability}"}
        per_image = [m for m in found if m["derivation"] is None]
        per_breast = [m for m in found if m["derivation"] == "373098007"]  # SCT Mean
        assert len(per_image) == 8 and len(per_breast) == 4
        rows = images.set_index("image_index")
        for m in per_image:
            (uid,) = m["sources"]
            assert m["value"] == pytest.approx(rows.loc[image_of[uid], f"{m['kind']}_pred"], abs=1e-6)
        for m in per_breast:
            side = "L" if m["label"].startswith("left") else "R"
            assert {by_sop[u][1].ImageLaterality for u in m["sources"]} == {side} and len(m["sources"]) == 2
            breast = breasts.set_index("breast_id").loc[f"{study}_{side}"]
            assert m["value"] == pytest.approx(float(breast[f"{m['kind']}_pred"]), abs=1e-6)

        # Patch regions: K per image, on that image, where the data path cut them (mirroring undone).
        regions = sr.content.get_planar_roi_measurement_groups()
        assert len(regions) == 4 * 2
        for uid, (path, ds) in study_sources.items():
            mine = [
                g
                for g in regions
                if g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == uid
            ]
            assert len(mine) == 2
            geometry = input_geometry(load_source(ImageItem(path.stem, path), contract), contract)
            entry = patches[image_of[uid]]
            for k, group in enumerate(mine):
                top, bottom, left, right = geometry.box_to_source(entry["locations"][k], entry["crop_size"])
                top, left = max(top, 0), max(left, 0)
                bottom, right = min(bottom, ds.Rows), min(right, ds.Columns)
                expected = [[left, top], [right, top], [right, bottom], [left, bottom], [left, top]]
                np.testing.assert_allclose(group.roi.value, expected, atol=1e-3)
                assert f"patch {k + 1} of 2, attention {entry['attention'][k]:.4f}" in str(
                    group.tracking_identifier
                )

    for seg_path in sorted((results / "seg").glob("*.dcm")):
        seg = hd.seg.segread(seg_path)
        assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
        ((study, series, uid),) = seg.get_source_image_uids()
        path, ds = by_sop[uid]
        assert (study, series) == (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
        assert seg.PatientID == ds.PatientID and seg.StudyInstanceUID == ds.StudyInstanceUID
        labels = [seg.get_segment_description(n).SegmentLabel for n in (1, 2)]
        assert labels == ["benign saliency", "malignant saliency"]
        maps = seg.get_pixels_by_source_instance(
            [uid], segment_numbers=[1, 2], combine_segments=False, rescale_fractional=True
        )[0]
        assert maps.shape == (ds.Rows, ds.Columns, 2)
        npz = np.load(out / "saliency" / f"{image_of[uid]}.npz")
        geometry = input_geometry(load_source(ImageItem(path.stem, path), contract), contract)
        expected = geometry.maps_to_source(npz["saliency"].astype(np.float32), (ds.Rows, ds.Columns))
        np.testing.assert_allclose(np.moveaxis(maps, -1, 0), expected, atol=1 / 255)
        # The maps cover the breast (the pixels the model saw); right views were mirrored for the model, and
        # tests/data/test_input_geometry.py checks with real pixels that the geometry undoes it.
        assert (maps[..., 1] > 0)[ds.pixel_array > 0].mean() > 0.99
        assert geometry.mirrored == (ds.ImageLaterality == "R")


def test_failed_study_is_reported_and_the_others_go_on(  # type: ignore[no-untyped-def]
    tmp_path: Path, dicom_exams: Path, tiny_model: Path, size_args, monkeypatch, dciodvfy
) -> None:
    import mammogmic.dicom.results as results_module

    studies = sorted(
        {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in dicom_exams.glob("*.dcm")}
    )
    real = results_module.build_report

    def failing(study_uid, *args, **kwargs):  # type: ignore[no-untyped-def]
        if study_uid == studies[0]:
            raise ValueError("simulated encoder failure")
        return real(study_uid, *args, **kwargs)

    monkeypatch.setattr(results_module, "build_report", failing)
    assert _predict(tmp_path, [dicom_exams], tiny_model, size_args) == 1
    errors = pd.read_csv(tmp_path / "out" / "errors.csv")
    assert list(errors["stage"]) == ["dicom-sr"] * 4
    assert errors["error"].str.contains(f"study {studies[0]}: no SR written").all()
    assert errors["error"].str.contains("simulated encoder failure").all()
    index = pd.read_csv(tmp_path / "dicom_results" / "dicom_outputs.csv", dtype=str)
    assert list(index.loc[index["kind"] == "SR", "study_instance_uid"]) == [studies[1]]
    assert (index["kind"] == "SEG").sum() == 8  # the failed study's SEGs are still written
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["n_output_errors"] == 4 and run["n_errors"] == 0
    assert len(pd.read_csv(tmp_path / "out" / "image_predictions.csv")) == 8  # predictions are unaffected


def test_never_overwrites_and_keeps_earlier_runs(  # type: ignore[no-untyped-def]
    tmp_path: Path, dicom_exams: Path, tiny_model: Path, size_args
) -> None:
    one = sorted(dicom_exams.glob("*.dcm"))[:1]
    foreign = tmp_path / "dicom_results" / "notes.txt"
    foreign.parent.mkdir()
    foreign.write_text("mine")
    assert _predict(tmp_path, one, tiny_model, size_args) == 2  # a folder holding someone else's file
    assert foreign.read_text() == "mine" and not (tmp_path / "out").exists()
    foreign.unlink()
    assert _predict(tmp_path, one, tiny_model, size_args) == 0
    first = {p: p.read_bytes() for p in (tmp_path / "dicom_results").rglob("*.dcm")}
    assert len(first) == 2
    assert _predict(tmp_path, one, tiny_model, size_args) == 0  # again: new objects beside the old ones
    now = {p: p.read_bytes() for p in (tmp_path / "dicom_results").rglob("*.dcm")}
    assert len(now) == 4 and all(now[p] == data for p, data in first.items())
    index = pd.read_csv(tmp_path / "dicom_results" / "dicom_outputs.csv", dtype=str)
    assert len(index) == 4 and set(index["sop_instance_uid"]) == {p.stem for p in now}


@pytest.mark.parametrize("where", ["out", "inside"])
def test_dicom_out_folder_must_be_its_own(  # type: ignore[no-untyped-def]
    tmp_path: Path, dicom_exams: Path, tiny_model: Path, size_args, capsys, where: str
) -> None:
    target = tmp_path / "out" if where == "out" else tmp_path / "out" / "results"
    args = [
        "predict",
        str(dicom_exams),
        "--model",
        str(tiny_model),
        "--out",
        str(tmp_path / "out"),
        *size_args,
    ]
    assert main([*args, "--dicom-out", str(target)]) == 2
    assert "--dicom-out" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any folder was made
