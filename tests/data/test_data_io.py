"""read_image on PNG and DICOM, good and bad inputs (each with its specific message)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from data_helpers import synthetic_breast, write_dicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, RLELossless

from mammogmic.data import read_image
from mammogmic.data.io import laterality_view_from_name, read_mask
from mammogmic.errors import ImageReadError


def _png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def test_png_16_and_8_bit_keep_values(tmp_path: Path) -> None:
    img16 = synthetic_breast((64, 48)) * 10
    pixels, meta = read_image(_png(tmp_path / "a_L_CC.png", img16))
    assert pixels.dtype == np.uint16 and meta.bits_stored == 16 and meta.format == "png"
    np.testing.assert_array_equal(pixels, img16)
    assert (meta.laterality, meta.view, meta.laterality_source) == ("L", "CC", "filename")
    img8 = (synthetic_breast((64, 48)) // 20).astype(np.uint8)
    pixels8, meta8 = read_image(_png(tmp_path / "b.png", img8))
    assert pixels8.dtype == np.uint16 and meta8.bits_stored == 8
    np.testing.assert_array_equal(pixels8, img8)  # values kept, not stretched
    assert meta8.laterality is None and meta8.view is None


def test_names_with_spaces_and_non_ascii(tmp_path: Path) -> None:
    folder = tmp_path / "dossier patiente é"
    folder.mkdir()
    path = _png(folder / "Mammo gramm ü R-MLO.png", synthetic_breast((40, 40)))
    _, meta = read_image(path)
    assert (meta.laterality, meta.view) == ("R", "MLO")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("0_L-CC.png", ("L", "CC")),
        ("P_00001_RIGHT_MLO.dcm", ("R", "MLO")),
        ("53582540_d3f2_MG_L_ML_ANON.dcm", ("L", None)),
        ("exam_RCC.png", ("R", "CC")),
        ("L_CC_vs_R_CC.png", (None, "CC")),
        ("image.png", (None, None)),
    ],
)
def test_laterality_view_from_name(name: str, expected: tuple[str | None, str | None]) -> None:
    assert laterality_view_from_name(name) == expected


def test_dicom_monochrome2_tags_and_window(tmp_path: Path) -> None:
    pixels = synthetic_breast((64, 48), "R")
    path = write_dicom(tmp_path / "x.dcm", pixels, laterality="R", view="MLO")
    out, meta = read_image(path)
    np.testing.assert_array_equal(out, pixels)
    assert (meta.laterality, meta.view, meta.view_source) == ("R", "MLO", "dicom")
    assert meta.value_mapping == "identity" and meta.bits_stored == 12
    windowed = write_dicom(tmp_path / "w.dcm", pixels, WindowCenter=2000, WindowWidth=1000)
    # Window 1500..2500: background goes to the bottom, all tissue (2501..3000) saturates at the top:
    # two grey values are left, so the image is refused, and the message says the window did it.
    with pytest.raises(
        ImageReadError, match=r"w\.dcm: only 2 distinct grey values after the DICOM VOI window"
    ):
        read_image(windowed)
    wide = write_dicom(tmp_path / "wide.dcm", pixels, WindowCenter=2048, WindowWidth=4096)
    out_w, meta_w = read_image(wide)
    assert "VOI window applied" in meta_w.notes
    assert np.unique(out_w).size == np.unique(pixels).size  # a window over the whole range keeps every level
    soft, meta_soft = read_image(write_dicom(tmp_path / "s.dcm", pixels, WindowCenter=2750, WindowWidth=401))
    assert meta_soft.value_mapping.startswith("linear")  # fractional window output: mapped to 16 bits
    order = np.argsort(pixels.ravel(), kind="stable")
    assert np.all(np.diff(soft.ravel()[order].astype(np.int64)) >= 0)  # monotone in the stored value
    out_raw, _ = read_image(windowed, apply_voi=False)
    np.testing.assert_array_equal(out_raw, pixels)


def test_dicom_monochrome1_is_inverted_and_padding_zeroed(tmp_path: Path) -> None:
    pixels = synthetic_breast((64, 48))
    stored = (4095 - pixels).astype(np.uint16)  # MONOCHROME1: air is bright
    stored[0, :5] = 7  # padding marker
    path = write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", PixelPaddingValue=7)
    out, meta = read_image(path)
    expected = pixels.copy()
    expected[0, :5] = 0
    np.testing.assert_array_equal(out, expected)
    assert "MONOCHROME1 inverted" in meta.notes


def test_dicom_rescale_and_view_code_sequence(tmp_path: Path) -> None:
    pixels = synthetic_breast((64, 48))
    code = Dataset()
    code.CodeValue = "399368009"
    code.CodingSchemeDesignator = "SCT"
    path = write_dicom(
        tmp_path / "r.dcm",
        pixels,
        view=None,
        laterality=None,
        Laterality="L",
        RescaleSlope=2,
        RescaleIntercept=-100,
        ViewCodeSequence=[code],
    )
    out, meta = read_image(path)
    assert (meta.laterality, meta.view) == ("L", "MLO")
    # Range [-100, 8090] maps linearly onto 0..65535, so the order of values is kept.
    lo, hi = -100.0, 4095 * 2 - 100.0
    expected = np.rint((pixels * 2.0 - 100 - lo) * 65535 / (hi - lo))
    np.testing.assert_array_equal(out, expected.astype(np.uint16))


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_dicoms(tmp_path: Path, syntax: object) -> None:
    pixels = synthetic_breast((64, 48))
    path = write_dicom(tmp_path / "c.dcm", pixels, transfer_syntax=syntax)
    out, meta = read_image(path)
    np.testing.assert_array_equal(out, pixels)
    assert meta.transfer_syntax == str(syntax)


def test_jpeg2000_without_pylibjpeg_openjpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The light install has no pylibjpeg-openjpeg: Pillow's OpenJPEG decodes JPEG 2000 to the same values, and
    High-Throughput JPEG 2000 (which only pylibjpeg-openjpeg decodes) names the extra that installs it."""
    import pydicom
    from pydicom.pixels import get_decoder
    from pydicom.uid import HTJ2KLossless

    import mammogmic.data.io as io_module

    pixels = synthetic_breast((64, 48))
    path = write_dicom(tmp_path / "j2k.dcm", pixels, transfer_syntax=JPEG2000Lossless)
    monkeypatch.delitem(get_decoder(JPEG2000Lossless)._available, "pylibjpeg")  # Pillow is left
    out, _ = read_image(path)
    np.testing.assert_array_equal(out, pixels)

    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless  # an HTJ2K decoder reads a part-1 code stream too
    ds.save_as(tmp_path / "ht.dcm")
    monkeypatch.delitem(get_decoder(HTJ2KLossless)._available, "pylibjpeg")
    monkeypatch.setattr(io_module, "has_module", lambda name: name != "openjpeg")
    with pytest.raises(
        ImageReadError,
        match=r"ht\.dcm: High-Throughput JPEG 2000 DICOM needs pylibjpeg-openjpeg, part of the 'htj2k' extra: "
        r"pip install 'mammogmic\[htj2k\]'",
    ):
        read_image(tmp_path / "ht.dcm")


def test_dicom_refusals(tmp_path: Path) -> None:
    pixels = synthetic_breast((64, 48))
    raw = write_dicom(tmp_path / "raw.dcm", pixels, PresentationIntentType="FOR PROCESSING")
    with pytest.raises(ImageReadError, match=r"raw\.dcm: DICOM is a 'FOR PROCESSING'"):
        read_image(raw)
    ct = write_dicom(tmp_path / "ct.dcm", pixels, Modality="CT")
    with pytest.raises(ImageReadError, match=r"ct\.dcm: DICOM modality is 'CT', not 'MG'"):
        read_image(ct)
    unknown = write_dicom(tmp_path / "scan.dcm", pixels, laterality=None, view=None)
    with pytest.raises(ImageReadError, match=r"scan\.dcm: cannot tell the laterality"):
        read_image(unknown, require_laterality_view=True)
    no_view = write_dicom(tmp_path / "scan_L.dcm", pixels, view="LM")
    with pytest.raises(ImageReadError, match=r"scan_L\.dcm: cannot tell the view"):
        read_image(no_view, require_laterality_view=True)


def test_dicom_without_pixel_data_and_truncated(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "full.dcm", synthetic_breast((64, 48)))
    data = path.read_bytes()
    truncated = tmp_path / "trunc.dcm"
    truncated.write_bytes(data[: len(data) - 3000])
    with pytest.raises(
        ImageReadError,
        match=r"trunc\.dcm: truncated DICOM: the pixel data is [0-9,]+ bytes, the header \(64x48, 16-bit\) needs 6,144",
    ):
        read_image(truncated)
    import pydicom

    ds = pydicom.dcmread(path)
    del ds.PixelData
    nopix = tmp_path / "nopix.dcm"
    ds.save_as(nopix)
    with pytest.raises(ImageReadError, match=r"nopix\.dcm: DICOM has no pixel data"):
        read_image(nopix)


def test_bad_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.png: file is empty"):
        read_image(empty)
    good = _png(tmp_path / "good.png", synthetic_breast((64, 48)))
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:-60])
    with pytest.raises(ImageReadError, match=r"cut\.png: truncated or corrupt PNG"):
        read_image(cut)
    rgb = _png(tmp_path / "rgb.png", np.zeros((64, 48, 3), np.uint8))
    with pytest.raises(ImageReadError, match=r"rgb\.png: PNG colour model is RGB colour \(3 channels\)"):
        read_image(rgb)
    for side in (1, 10):
        tiny = _png(tmp_path / f"tiny{side}.png", np.ones((side, side), np.uint16))
        with pytest.raises(
            ImageReadError, match=rf"tiny{side}\.png: image is {side}x{side} pixels, too small"
        ):
            read_image(tiny)
    with pytest.raises(ImageReadError, match=r"missing\.png: file not found"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="is a directory, expected an image file"):
        read_image(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ImageReadError, match=r"notes\.txt: this is a text file, not a PNG or DICOM image"):
        read_image(text)
    # The good file next to the bad ones still reads.
    assert read_image(good)[0].shape == (64, 48)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = _png(tmp_path / "locked.png", synthetic_breast((64, 48)))
    path.chmod(0)
    try:
        with pytest.raises(ImageReadError, match=r"locked\.png: permission denied"):
            read_image(path)
    finally:
        path.chmod(0o644)


def test_unreadable_file_message_via_monkeypatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same check for root (CI containers): opening raises PermissionError."""
    path = _png(tmp_path / "locked.png", synthetic_breast((64, 48)))
    real_open = open

    def fake_open(file: object, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        if Path(str(file)) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", fake_open)
    with pytest.raises(ImageReadError, match=r"locked\.png: permission denied"):
        read_image(path)


def test_read_mask(tmp_path: Path) -> None:
    mask = np.zeros((64, 48), np.uint8)
    mask[10:20, 5:9] = 255
    path = _png(tmp_path / "m.png", mask)
    np.testing.assert_array_equal(read_mask(path, (64, 48)), mask > 0)
    with pytest.raises(ImageReadError, match=r"m\.png: mask is 64x48 but the image is 60x48"):
        read_mask(path, (60, 48))


def test_npy_cache_entries(tmp_path: Path) -> None:
    good = tmp_path / "crop.npy"
    np.save(good, synthetic_breast((64, 48)))
    pixels, meta = read_image(good)
    assert meta.format == "npy" and pixels.dtype == np.uint16
    np.testing.assert_array_equal(pixels, synthetic_breast((64, 48)))
    nan = tmp_path / "nan.npy"
    values = synthetic_breast((64, 48)).astype(np.float32)
    values[0, 0] = np.nan
    np.save(nan, values)
    with pytest.raises(ImageReadError, match=r"nan\.npy: array contains NaN or infinite values"):
        read_image(nan)
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ImageReadError, match=r"objects\.npy: truncated or corrupt \.npy file"):
        read_image(objects)  # object arrays would need unpickling: refused


def test_dicom_without_file_meta_header(tmp_path: Path) -> None:
    import pydicom

    pixels = synthetic_breast((64, 48))
    path = write_dicom(tmp_path / "full.dcm", pixels)
    ds = pydicom.dcmread(path)
    bare = tmp_path / "bare_L_CC.dcm"
    del ds.file_meta
    ds.preamble = None
    ds.save_as(bare, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert bare.read_bytes()[128:132] != b"DICM"  # no preamble, no file meta
    out, meta = read_image(bare)
    np.testing.assert_array_equal(out, pixels)
    assert meta.format == "dicom" and (meta.laterality, meta.view) == ("L", "CC")


def test_dicom_voi_lut_sequence(tmp_path: Path) -> None:
    pixels = synthetic_breast((64, 48))
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    lut = (np.arange(4096, dtype=np.uint32) * 10).astype(np.uint16)  # a simple 10x stretch
    item.add_new(0x00283006, "US", lut.tolist())  # LUTData as US values
    path = write_dicom(tmp_path / "lut.dcm", pixels, VOILUTSequence=[item], WindowCenter=10, WindowWidth=2)
    out, meta = read_image(path)
    assert "VOI LUT sequence applied" in meta.notes  # the LUT wins over the window
    np.testing.assert_array_equal(out, pixels.astype(np.uint32) * 10)
