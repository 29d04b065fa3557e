"""The input guards of ``mammogmic.data.io``: one test per kind of bad input, each with its message."""

from __future__ import annotations

import gzip
import io
import logging
import os
import signal
import socket
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from data_helpers import synthetic_breast, write_dicom
from PIL import Image

from mammogmic.data import io as mio
from mammogmic.data.io import check_regular_file, read_dicom_identity, read_image, read_mask, sniff_format
from mammogmic.data.synth.dicom import write_dicom as synth_write_dicom
from mammogmic.data.synth.exam import generate_exam
from mammogmic.errors import ImageReadError


@pytest.fixture(autouse=True)
def _fresh_warnings() -> Iterator[None]:
    mio._WARNED_LOW_BITS.clear()
    yield
    mio._WARNED_LOW_BITS.clear()


@pytest.fixture()
def no_hang() -> Iterator[None]:
    """Fail instead of hanging should a guard ever open a FIFO or read a device."""

    def fail(*_: object) -> None:
        raise TimeoutError("the guard blocked on a non-regular file")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def _png_with_header(width: int, height: int, depth: int = 16, colour: int = 0) -> bytes:
    """A PNG whose IHDR says ``width`` x ``height``, with one tiny IDAT: what a decompression bomb looks like."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        mio._PNG_SIGNATURE
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- not a regular file ---------------------------------------------------------------------------


def test_directory_and_unlistable_directory(tmp_path: Path) -> None:
    folder = tmp_path / "scan.png"
    folder.mkdir()
    with pytest.raises(ImageReadError, match=r"scan\.png: is a directory, expected an image file$"):
        read_image(folder)


def test_dangling_link_and_link_loop(tmp_path: Path) -> None:
    link = tmp_path / "gone_L-CC.png"
    link.symlink_to(tmp_path / "deleted.png")
    with pytest.raises(
        ImageReadError, match=r"gone_L-CC\.png: dangling symbolic link \(points to .*deleted\.png"
    ):
        read_image(link)
    loop = tmp_path / "loop.dcm"
    loop.symlink_to(loop)
    with pytest.raises(ImageReadError, match=r"loop\.dcm: symbolic link to .* cannot be followed"):
        read_image(loop)


def test_link_to_a_good_file_is_read(tmp_path: Path) -> None:
    target = _write(tmp_path / "real.png", _png_bytes(synthetic_breast((64, 48)) * 10))
    link = tmp_path / "alias_L-CC.png"
    link.symlink_to(target)
    assert read_image(link)[1].laterality == "L"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_fifo_is_refused_without_opening(tmp_path: Path, no_hang: None) -> None:
    fifo = tmp_path / "pipe_L-CC.png"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes: it must not be opened
    with pytest.raises(ImageReadError, match=r"pipe_L-CC\.png: is a named pipe \(FIFO\), not a regular file"):
        read_image(fifo)
    with pytest.raises(ImageReadError, match="named pipe"):
        read_mask(fifo)
    with pytest.raises(ImageReadError, match="named pipe"):
        read_dicom_identity(fifo)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_device_is_refused(no_hang: None) -> None:
    with pytest.raises(
        ImageReadError, match=r"^/dev/zero: is a character device, not a regular file; it is not opened$"
    ):
        read_image("/dev/zero")


def test_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.dcm"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        with pytest.raises(ImageReadError, match=r"s\.dcm: is a socket"):
            read_image(path)


def test_size_cap_checked_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "big.png", _png_bytes(synthetic_breast((64, 48)) * 10))
    monkeypatch.setattr(mio, "MAX_FILE_BYTES", 100)

    def no_open(*args: object, **kwargs: object) -> None:
        raise AssertionError("a file over the cap was opened")

    monkeypatch.setattr("builtins.open", no_open)
    with pytest.raises(
        ImageReadError,
        match=r"big\.png: file is [0-9,]+ bytes, more than the 100 bytes accepted for one mammogram",
    ):
        read_image(path)


def test_check_regular_file_returns_stat(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.png", b"x")
    assert check_regular_file(path).st_size == 1


# --- the real format, whatever the name -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        (
            "scan.dcm",
            gzip.compress(b"DICM" * 100, mtime=0),  # fixed header: the same test id in every xdist worker
            r"this is a gzip file, not a DICOM file; decompress it first",
        ),
        (
            "scan.png",
            b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\0" * 200,
            r"this is a JPEG image, not a PNG image",
        ),
        ("scan.dcm", b"II*\x00" + b"\0" * 200, r"this is a TIFF image, not a DICOM file"),
        ("scan.png", b"%PDF-1.7\n" + b"\0" * 100, r"this is a PDF document, not a PNG image"),
        ("scan.dcm", b"GIF89a" + b"\0" * 100, r"this is a GIF image, not a DICOM file"),
        ("scan.png", b"BZh91AY&SY" + b"\0" * 50, r"this is a bzip2 file, not a PNG image"),
        (
            "passwd",
            b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin/nologin\n",
            r"this is a text file",
        ),
        ("notes.dcm", "Befund: unauffällig\n".encode(), r"this is a text file, not a DICOM file"),
    ],
)
def test_other_formats_named(tmp_path: Path, name: str, data: bytes, message: str) -> None:
    with pytest.raises(ImageReadError, match=rf"{name}: {message}"):
        read_image(_write(tmp_path / name, data))


def test_zip_named_png(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("a.dcm", b"x")
    with pytest.raises(
        ImageReadError, match=r"s\.png: this is a zip archive, not a PNG image; extract it first"
    ):
        read_image(_write(tmp_path / "s.png", buf.getvalue()))


def test_unknown_binary_named_dcm(tmp_path: Path) -> None:
    path = _write(tmp_path / "noise.dcm", bytes(range(256)) * 4)
    with pytest.raises(ImageReadError, match=r"noise\.dcm: not a DICOM file \(no 'DICM' marker at byte 128"):
        read_image(path)


def test_png_named_dcm_is_read_as_png_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = synthetic_breast((64, 48)) * 10
    path = _write(tmp_path / "0_R-CC.dcm", _png_bytes(image))
    with caplog.at_level(logging.WARNING, logger="mammogmic.data.io"):
        pixels, meta = read_image(path)
    np.testing.assert_array_equal(pixels, image)
    assert meta.format == "png" and (meta.laterality, meta.view) == ("R", "CC")
    assert f"{path}: named .dcm but this is a PNG image; reading it as PNG" in caplog.text


def test_dicom_named_png_is_read_as_dicom(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_dicom(tmp_path / "x.png", synthetic_breast((64, 48)), laterality="R", view="MLO")
    with caplog.at_level(logging.WARNING, logger="mammogmic.data.io"):
        _, meta = read_image(path)
    assert meta.format == "dicom" and (meta.laterality, meta.view) == ("R", "MLO")
    assert "named .png but this is a DICOM file; reading it as DICOM" in caplog.text


def test_sniff_format() -> None:
    assert sniff_format(b"\0" * 128 + b"DICM") == "dicom"
    assert sniff_format(b"II*\x00" + b"\0" * 124 + b"DICM") == "dicom"  # a TIFF/DICOM dual file is DICOM
    # No preamble, implicit VR: (0008,0016) length 4 "1.2\0", then (0008,0018) length 4.
    bare = struct.pack("<HHI", 8, 0x16, 4) + b"1.2\0" + struct.pack("<HHI", 8, 0x18, 4) + b"1.3\0"
    assert sniff_format(bare) == "dicom"
    explicit = struct.pack("<HH", 8, 0x16) + b"UI" + struct.pack("<H", 4) + b"1.2\0"
    assert (
        sniff_format(explicit + struct.pack("<HH", 8, 0x18) + b"UI" + struct.pack("<H", 2) + b"1\0")
        == "dicom"
    )
    assert sniff_format(struct.pack("<HHI", 8, 0x16, 4)) is None  # one header, nothing else: not enough
    assert sniff_format(b"\x08\x00\x16\x00garbage-garbage") is None
    assert sniff_format(b"\x89PNG\r\n\x1a\n....") == "png"
    assert sniff_format(b"RIFF\0\0\0\0WEBPVP8 ") == "webp"
    assert sniff_format("é,ü\n".encode()) == "text"
    assert sniff_format(b"\0\1\2\3\xff\xfe") is None


# --- header sizes before decoding -----------------------------------------------------------------


def test_png_decompression_bomb_refused_from_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "bomb_L-CC.png", _png_with_header(100_000, 100_000))

    def no_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("the bomb reached the decoder")

    monkeypatch.setattr("PIL.Image.open", no_decode)
    with pytest.raises(
        ImageReadError,
        match=r"bomb_L-CC\.png: PNG header claims 100000x100000 pixels \(10,000 megapixels\).*bomb",
    ):
        read_image(path)
    with pytest.raises(ImageReadError, match="decompression bomb"):
        read_mask(path)


def test_png_zero_size_header(tmp_path: Path) -> None:
    with pytest.raises(
        ImageReadError, match=r"z\.png: PNG header says the image is 0x0 pixels \(zero size\)"
    ):
        read_image(_write(tmp_path / "z.png", _png_with_header(0, 0)))


def test_png_truncated_and_corrupt_header(tmp_path: Path) -> None:
    good = _png_bytes(synthetic_breast((64, 48)) * 10)
    with pytest.raises(
        ImageReadError, match=r"h\.png: truncated PNG \(20 bytes; the IHDR header is incomplete\)"
    ):
        read_image(_write(tmp_path / "h.png", good[:20]))
    with pytest.raises(ImageReadError, match=r"c\.png: corrupt PNG \(the first chunk is b'IDAT'"):
        read_image(_write(tmp_path / "c.png", good[:12] + b"IDAT" + good[16:]))
    with pytest.raises(ImageReadError, match=r"t\.png: truncated or corrupt PNG"):
        read_image(_write(tmp_path / "t.png", good[: len(good) // 2]))


def test_dicom_bomb_and_zero_size_refused_from_header(tmp_path: Path) -> None:
    pixels = synthetic_breast((64, 48))
    bomb = write_dicom(tmp_path / "bomb.dcm", pixels)
    import pydicom

    ds = pydicom.dcmread(bomb)
    ds.Rows, ds.Columns = 60000, 60000  # the pixel data stays 6 KB: only the header lies
    ds.save_as(bomb)
    with pytest.raises(ImageReadError, match=r"bomb\.dcm: DICOM header claims 60000x60000 pixels"):
        read_image(bomb)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 4000, 3000, 100
    ds.save_as(bomb)
    with pytest.raises(ImageReadError, match=r"4000x3000 pixels x 100 frames \(1,200 megapixels\)"):
        read_image(bomb)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 0, 0, 1
    ds.PixelData = b""
    zero = tmp_path / "zero.dcm"
    ds.save_as(zero)
    with pytest.raises(ImageReadError, match=r"zero\.dcm: DICOM header says the image is 0x0 pixels"):
        read_image(zero)


# --- colour models ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "mode", "model"),
    [
        (np.zeros((64, 48, 3), np.uint8), None, r"RGB colour \(3 channels\), 8 bits"),
        (np.zeros((64, 48, 4), np.uint8), None, r"RGBA colour \(4 channels\), 8 bits"),
        (
            np.zeros((64, 48, 2), np.uint8),
            "LA",
            r"grey\+alpha \(2 channels\), 8 bits; .*drop the alpha channel",
        ),
    ],
)
def test_colour_models_named(tmp_path: Path, array: np.ndarray, mode: str | None, model: str) -> None:
    path = _write(tmp_path / "c.png", _png_bytes(array, mode))
    with pytest.raises(ImageReadError, match=rf"c\.png: PNG colour model is {model}"):
        read_image(path)


def test_palette_png_named(tmp_path: Path) -> None:
    image = Image.fromarray((synthetic_breast((64, 48)) // 16).astype(np.uint8)).convert("P")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    with pytest.raises(ImageReadError, match=r"p\.png: PNG colour model is palette \(indexed colour\)"):
        read_image(_write(tmp_path / "p.png", buf.getvalue()))


# --- contrast and bit depth -------------------------------------------------------------------------


def test_saturated_dicom_refused(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "white.dcm", np.full((64, 48), 65535, np.uint16), bits_stored=16)
    with pytest.raises(
        ImageReadError, match=r"white\.dcm: every pixel has the value 65535: no tissue contrast"
    ):
        read_image(path)


def test_near_constant_images_refused(tmp_path: Path) -> None:
    few = np.full((64, 48), 30000, np.uint16)
    few[:3, :3] = [[1, 2, 3], [4, 5, 6], [1, 2, 3]]
    with pytest.raises(
        ImageReadError, match=r"few\.png: only 7 distinct grey values \(at least 8 expected\)"
    ):
        read_image(_write(tmp_path / "few.png", _png_bytes(few)))
    narrow = (30000 + np.arange(64 * 48) % 40).astype(np.uint16).reshape(64, 48)  # 40 levels of 65536
    with pytest.raises(
        ImageReadError, match=r"narrow\.png: values span only 30000\.\.30039 \(39 levels; at least 64"
    ):
        read_image(_write(tmp_path / "narrow.png", _png_bytes(narrow)))


def test_eight_bit_data_in_sixteen_bits_passes(tmp_path: Path) -> None:
    """A 16-bit PNG holding 8-bit values (range 255) is a real case and must not be refused."""
    image = (synthetic_breast((64, 48)) // 12).astype(np.uint16)
    assert image.max() <= 255
    read_image(_write(tmp_path / "a.png", _png_bytes(image)))


def test_eight_bit_png_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path / "eight.png", _png_bytes((synthetic_breast((64, 48)) // 12).astype(np.uint8)))
    with caplog.at_level(logging.WARNING, logger="mammogmic.data.io"):
        _, meta = read_image(path)
        read_image(path)
    warnings = [r for r in caplog.records if "8-bit PNG" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    assert "8-bit source" in meta.notes


def test_synthetic_generator_images_pass(tmp_path: Path) -> None:
    """Every view of a few synthetic exams, as PNG and as DICOM, passes every guard (no false refusals)."""
    for seed in range(3):
        for view_name, image, _, meta in generate_exam(seed, (128, 96)):
            png = _write(tmp_path / f"{seed}_{view_name}.png", _png_bytes(image))
            dcm = tmp_path / f"{seed}_{view_name.replace('-', '')}.dcm"
            synth_write_dicom(
                dcm,
                image,
                laterality=meta["laterality"],
                view=meta["view"],
                patient_id="p",
                exam_id=f"e{seed}",
                image_id=f"{seed}{view_name}",
                pixel_mm=0.3,
                instance_number=1,
            )
            for path in (png, dcm):
                pixels, read_meta = read_image(path, require_laterality_view=True)
                np.testing.assert_array_equal(pixels, image)
                assert read_meta.full_view == view_name


# --- header-only identity -------------------------------------------------------------------------


def test_read_dicom_identity_reads_the_header_only(tmp_path: Path) -> None:
    path = write_dicom(
        tmp_path / "1.2.3.dcm",
        synthetic_breast((64, 48)),
        laterality="R",
        view="MLO",
        StudyInstanceUID="1.2.9",
    )
    data = path.read_bytes()
    cut = _write(tmp_path / "cut.dcm", data[: len(data) - 2000])  # damaged pixels do not matter here
    for p in (path, cut):
        identity = read_dicom_identity(p)
        assert identity is not None
        assert (identity.patient_id, identity.study_uid, identity.exam_key) == ("P1", "1.2.9", "1.2.9")
        assert (identity.laterality, identity.view) == ("R", "MLO")
    assert read_dicom_identity(_write(tmp_path / "a.png", _png_bytes(synthetic_breast((64, 48))))) is None


def test_exam_key_falls_back_to_accession_number(tmp_path: Path) -> None:
    import pydicom

    path = write_dicom(tmp_path / "x.dcm", synthetic_breast((64, 48)), PatientID="A", AccessionNumber="77")
    ds = pydicom.dcmread(path)
    del ds.StudyInstanceUID
    ds.save_as(path)
    identity = read_dicom_identity(path)
    assert identity is not None and identity.study_uid is None and identity.exam_key == "A_77"
