"""Untrusted model files: a file is checked against the model its metadata describes before anything is built.

Crafted files: metadata claiming a model far larger than the file's weights, header tables that lie about
shapes, dtypes or byte ranges, legacy pickles that declare storages the file does not hold, and pickles that
would run code. Each must be refused with a :class:`CheckpointError` that names the file and the offending key
or field, without a traceback at the CLI and without allocating the claimed model.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pickle
import resource
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mammogmic
from mammogmic import GMIC, GMICConfig, load_model, load_official_checkpoint, save_model
from mammogmic.errors import CheckpointError, ConfigError
from mammogmic.models import BaselineConfig, ResNetBaseline, official_state_dict, save_official_checkpoint
from mammogmic.models import checkpoint as ckpt
from mammogmic.models.checkpoint import MAX_HEADER_BYTES

TINY = GMICConfig(global_width=1, local_width=2, crop_size=(32, 32), attention_dim=4)  # 94 KB of weights
GIB = 1024**3


# -- helpers ---------------------------------------------------------------------------------------------------
def _tiny_file(
    tmp_path: Path, name: str = "tiny.safetensors"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and raw (string) metadata of a real saved tiny GMIC."""
    torch.manual_seed(0)
    path = save_model(GMIC(TINY), tmp_path / name)
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    return load_file(str(path)), metadata


def _with_config(metadata: dict[str, str], **changes: Any) -> dict[str, str]:
    config = json.loads(metadata["model_config"])
    config.update(changes)
    return {**metadata, "model_config": json.dumps(config)}


def _hostile_model(tmp_path: Path, name: str, **config: Any) -> Path:
    """A tiny model's weights under metadata that claims ``config``."""
    tensors, metadata = _tiny_file(tmp_path, f"src_{name}")
    path = tmp_path / name
    save_file(tensors, str(path), metadata=_with_config(metadata, **config))
    return path


def _header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


# A legacy (pre-zip) torch.save file written by hand, so that it can declare storages it does not hold.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _FakeStorage:
    def __init__(self, key: str, numel: int, kind: Any = torch.FloatStorage) -> None:
        self.key, self.numel, self.kind = key, numel, kind


class _FakeTensor:
    def __init__(self, storage: _FakeStorage, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce__(self):  # type: ignore[no-untyped-def]
        strides = tuple(math.prod(self.shape[i + 1 :]) for i in range(len(self.shape)))
        hooks: collections.OrderedDict[str, Any] = collections.OrderedDict()
        return (torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, strides, False, hooks))


class _LegacyPickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _FakeStorage):
            return ("storage", obj.kind, obj.key, "cpu", obj.numel, None)
        return None


def _write_legacy(
    path: Path, shapes: dict[str, tuple[int, ...]], declared: dict[str, int] | None = None
) -> None:
    """Zero tensors of ``shapes`` (int64 ``num_batches_tracked``, float32 others), each in its own storage;
    ``declared`` overrides a storage's claimed element count (the file still holds only the real elements)."""
    declared = declared or {}
    storages = {}
    for i, (name, shape) in enumerate(shapes.items()):
        kind = torch.LongStorage if name.endswith("num_batches_tracked") else torch.FloatStorage
        storages[name] = _FakeStorage(str(i), math.prod(shape), kind)
    claims = {name: declared.get(name, s.numel) for name, s in storages.items()}
    for name, s in storages.items():
        s.numel = claims[name]
    state = collections.OrderedDict((n, _FakeTensor(storages[n], shape)) for n, shape in shapes.items())
    with open(path, "wb") as f:
        for obj in (_LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(obj, f, protocol=2)
        _LegacyPickler(f, protocol=2).dump(state)
        pickle.dump([s.key for s in storages.values()], f, protocol=2)
        for name, s in storages.items():
            f.write(struct.pack("<q", s.numel))
            f.write(b"\0" * (8 if s.kind is torch.LongStorage else 4) * math.prod(shapes[name]))


def _spy_torch_load(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    real = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "load", spy)
    return calls


def _assert_clean(message: str) -> None:
    assert "weights_only=False" not in message and "\x1b[" not in message and "Traceback" not in message


# -- .safetensors: config from the metadata ----------------------------------------------------------------------
@pytest.mark.parametrize("field", ["global_width", "local_width"])
def test_metadata_claiming_4096_widths_is_refused(tmp_path: Path, field: str) -> None:
    """The attacker's file: ~100 KB of weights, metadata claiming a 4096-wide network (228 G parameters)."""
    path = _hostile_model(tmp_path, "wide.safetensors", **{field: 4096})
    assert path.stat().st_size < 120_000
    with pytest.raises(CheckpointError, match=rf"wide\.safetensors: invalid model_config.*{field}.*4096"):
        load_model(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("global_width", -16),
        ("local_width", 0),
        ("attention_dim", 10**9),
        ("num_patches", 10**6),
        ("num_classes", 2.0),
        ("global_width", "16"),
        ("attention_dim", True),
        ("percent_t", 1.5),
        ("percent_t", float("nan")),
        ("percent_t", "0.02"),
        ("crop_size", [256, -1]),
        ("crop_size", [100_000, 256]),
        ("crop_size", [256, 256, 256]),
        ("in_channels", 1.0),
        ("local_arch", "resnet152"),
        ("global_arch", ["resnet22"]),
    ],
)
def test_config_out_of_bounds_names_the_field(tmp_path: Path, field: str, value: Any) -> None:
    path = _hostile_model(tmp_path, "bad_config.safetensors", **{field: value})
    with pytest.raises(
        CheckpointError,
        match=rf"bad_config\.safetensors: invalid model_config in the file's metadata: {field}",
    ):
        load_model(path)


def test_patch_area_and_baseline_bounds() -> None:
    # K x crop may not exceed the area of a 2944x1920 input: the local network's memory grows with it.
    with pytest.raises(ConfigError, match="num_patches x crop_size"):
        GMICConfig(num_patches=64, crop_size=(1024, 1024))
    GMICConfig(num_patches=10, crop_size=(512, 512))  # generous settings stay valid
    with pytest.raises(ConfigError, match="width"):
        BaselineConfig(width=100_000)
    with pytest.raises(ConfigError, match="in_channels"):
        BaselineConfig(in_channels=1000)


def test_unknown_config_fields_and_model_type(tmp_path: Path) -> None:
    path = _hostile_model(tmp_path, "extra_field.safetensors", **{"x" * 500: 1})
    with pytest.raises(CheckpointError, match="unknown field") as info:
        load_model(path)
    assert "x" * 61 not in str(info.value)  # untrusted names are cut short
    tensors, metadata = _tiny_file(tmp_path)
    save_file(tensors, str(tmp_path / "kind.safetensors"), metadata={**metadata, "model_type": "\x1b[31mvgg"})
    with pytest.raises(CheckpointError, match="unknown model_type") as info:
        load_model(tmp_path / "kind.safetensors")
    _assert_clean(str(info.value))


def test_in_bounds_config_larger_than_its_weights_is_refused_unbuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config within every bound can still describe GBs of weights: the file's tensor table must match it."""
    claimed = TINY.replace(global_width=128, local_width=512)
    specs = ckpt._expected_specs(GMIC, claimed)
    assert sum(math.prod(shape) * 4 for shape, _ in specs.values()) > 3 * GIB
    path = _hostile_model(tmp_path, "big.safetensors", global_width=128, local_width=512)
    built: list[GMICConfig] = []
    monkeypatch.setitem(ckpt._MODEL_TYPES, "gmic", (lambda c: built.append(c) or GMIC(c), GMICConfig))
    with pytest.raises(
        CheckpointError,
        match=r"big\.safetensors: checkpoint does not match.*shape mismatch\(es\): "
        r"attention\.U\.weight: file \(4, 16\) vs model \(4, 4096\)",
    ):
        load_model(path)
    assert built == [claimed]  # only the meta-device build ran (its constructor was called under "meta")


# -- .safetensors: the header's tensor table ------------------------------------------------------------------
def _mutate(tensors: dict[str, torch.Tensor], case: str) -> tuple[dict[str, torch.Tensor], str]:
    t = dict(tensors)
    if case == "wrong_shape":
        t["attention.V.weight"] = torch.zeros(3, 3)
        return t, r"shape mismatch\(es\): attention\.V\.weight: file \(3, 3\) vs model \(4, 16\)"
    if case == "missing":
        del t["fusion.bias"]
        return t, r"1 missing key\(s\): fusion\.bias"
    if case == "extra":
        t["backdoor.weight"] = torch.zeros(2)
        return t, r"1 unexpected key\(s\): backdoor\.weight"
    if case == "wrong_dtype":
        t["fusion.weight"] = t["fusion.weight"].to(torch.int32)
        return t, r"dtype mismatch\(es\): fusion\.weight: file torch\.int32 vs model torch\.float32"
    if case == "bool_dtype":
        t["fusion.bias"] = t["fusion.bias"] > 0
        return t, r"dtype mismatch\(es\): fusion\.bias: file torch\.bool"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["wrong_shape", "missing", "extra", "wrong_dtype", "bool_dtype"])
def test_header_mismatch_names_the_key(tmp_path: Path, case: str) -> None:
    tensors, metadata = _tiny_file(tmp_path)
    changed, expected = _mutate(tensors, case)
    path = tmp_path / f"{case}.safetensors"
    save_file(changed, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=rf"{case}\.safetensors: checkpoint does not match.*{expected}"):
        load_model(path)


def test_half_precision_weights_still_load(tmp_path: Path) -> None:
    tensors, metadata = _tiny_file(tmp_path)
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(half, str(tmp_path / "half.safetensors"), metadata=metadata)
    model = load_model(tmp_path / "half.safetensors")
    assert torch.equal(model.state_dict()["fusion.weight"], half["fusion.weight"].float())


def test_declared_bytes_beyond_the_file_name_the_tensor(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = save_model(GMIC(TINY), tmp_path / "cut.safetensors")
    header = _header(path)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    os.truncate(path, path.stat().st_size - 1)
    with pytest.raises(
        CheckpointError, match=rf"cut\.safetensors: tensor {last}: declares bytes .* holds only"
    ):
        load_model(path)


def _write_raw(path: Path, header: dict[str, Any], data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_lying_header_entries_are_refused(tmp_path: Path) -> None:
    meta = {"__metadata__": {"format": "mammogmic"}}
    # An entry claiming 4 GiB of float32 that the file does not hold.
    _write_raw(
        tmp_path / "huge.safetensors",
        {**meta, "w": {"dtype": "F32", "shape": [GIB], "data_offsets": [0, 4 * GIB]}},
        b"\0" * 16,
    )
    with pytest.raises(CheckpointError, match=r"huge\.safetensors: tensor w: declares bytes 0\.\.4294967296"):
        load_model(tmp_path / "huge.safetensors")
    # Offsets that do not hold the declared shape, an unknown dtype, a header over the size limit.
    _write_raw(
        tmp_path / "off.safetensors",
        {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4]}},
        b"\0" * 16,
    )
    with pytest.raises(
        CheckpointError, match=r"off\.safetensors: tensor w: data_offsets \[0, 4\] do not hold"
    ):
        load_model(tmp_path / "off.safetensors")
    _write_raw(
        tmp_path / "f8.safetensors", {"w": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, b"\0"
    )
    with pytest.raises(CheckpointError, match=r"f8\.safetensors: tensor w: unsupported dtype"):
        load_model(tmp_path / "f8.safetensors")
    (tmp_path / "big_header.safetensors").write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b" " * 64)
    with pytest.raises(
        CheckpointError, match=r"big_header\.safetensors: safetensors header of \d+ bytes is over"
    ):
        load_model(tmp_path / "big_header.safetensors")
    (tmp_path / "short.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(CheckpointError, match=r"short\.safetensors: not a safetensors model file"):
        load_model(tmp_path / "short.safetensors")


# -- the CLI, in a subprocess under a memory cap ------------------------------------------------------------------
_CLI = "import sys; from mammogmic.cli.main import main; sys.exit(main())"
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and wait4 peak RSS are Linux's")


def _run_cli(args: list[str], tmp_path: Path, address_space: int = 3 * GIB) -> tuple[int, str, int]:
    """Exit code, stderr and peak RSS in bytes of ``mammogmic ARGS`` in a child process.

    The address space is capped as a safety net (should the claimed model be built after all, the child
    fails instead of taking the machine down); the peak RSS is the child's own, read from ``os.wait4``.
    """

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    src = str(Path(mammogmic.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    env.update(OMP_NUM_THREADS="1", NO_COLOR="1")
    err_path = tmp_path / "stderr.txt"
    with open(os.devnull, "rb") as stdin, open(os.devnull, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CLI, *args], stdin=stdin, stdout=out, stderr=err, env=env, preexec_fn=cap
        )
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return proc.returncode, err_path.read_text(errors="replace"), usage.ru_maxrss * 1024  # Linux: KiB


def _assert_one_clean_line(code: int, stderr: str, name: str) -> None:
    assert code in (1, 2), stderr
    assert "Traceback" not in stderr and name in stderr, stderr
    _assert_clean(stderr)
    assert len(stderr.strip().splitlines()) == 1, stderr


@linux_only
@pytest.mark.parametrize(
    ("claim", "expected"),
    [
        ({"global_width": 4096, "local_width": 4096}, "global_width"),
        ({"global_width": 128, "local_width": 512}, "shape mismatch"),
    ],
    ids=["out_of_bounds", "in_bounds_3GiB"],
)
def test_predict_refuses_hostile_model_without_building_it(
    tmp_path: Path, claim: dict[str, int], expected: str
) -> None:
    """The reported attack: ``predict`` with a small file whose metadata claims GBs (21 GiB resident before)."""
    model = _hostile_model(tmp_path, "hostile.safetensors", **claim)
    image = tmp_path / "image.png"
    Image.fromarray((np.arange(64 * 48).reshape(64, 48) * 20).astype(np.uint16)).save(image)
    args = ["predict", str(image), "--model", str(model), "--out", str(tmp_path / "out"), "--device", "cpu"]
    code, stderr, peak = _run_cli([*args, "--no-progress", "--workers", "0"], tmp_path)
    _assert_one_clean_line(code, stderr, "hostile.safetensors")
    assert expected in stderr
    assert peak < 1.5 * GIB, f"peak RSS {peak / GIB:.2f} GiB"
    print(f"peak RSS of the refusing predict ({claim}): {peak / 2**20:.0f} MiB")


@linux_only
def test_convert_and_smoke_refuse_in_one_line(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.p"
    torch.save({"ds_net.first_conv.weight": _Exploit(str(marker))}, evil)
    code, stderr, _ = _run_cli(
        ["convert", str(evil), str(tmp_path / "out.safetensors"), "--percent-t", "0.02"], tmp_path
    )
    _assert_one_clean_line(code, stderr, "evil.p")
    assert "refusing to load" in stderr and not marker.exists()
    wide = _hostile_model(tmp_path, "wide.safetensors", local_width=4096)
    code, stderr, peak = _run_cli(["smoke", "--model", str(wide), "--input-size", "64", "64"], tmp_path)
    _assert_one_clean_line(code, stderr, "wide.safetensors")
    assert "local_width" in stderr and peak < 1.5 * GIB


# -- official .p files --------------------------------------------------------------------------------------------
def _official_shapes() -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in official_state_dict(GMIC(TINY)).items()}


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_official_mismatch_refused_before_tensors_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    state = official_state_dict(GMIC(TINY))
    state["mil_attn_V.weight"] = torch.zeros(3, 3)
    del state["fusion_dnn.bias"]
    path = tmp_path / f"{fmt}.p"
    torch.save(state, path, _use_new_zipfile_serialization=fmt == "zip")
    calls = _spy_torch_load(monkeypatch)
    with pytest.raises(
        CheckpointError,
        match=rf"{fmt}\.p: checkpoint does not match.*missing key\(s\): fusion\.bias \(fusion_dnn\.bias\).*"
        r"attention\.V\.weight \(mil_attn_V\.weight\): file \(3, 3\) vs model \(4, 16\)",
    ):
        load_official_checkpoint(path, config=TINY)
    # zip: only a memory-mapped load ran; legacy: only the structure scan, torch.load never did.
    assert calls == ([{"map_location": "cpu", "weights_only": True, "mmap": True}] if fmt == "zip" else [])


def test_legacy_storage_larger_than_the_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1 KB legacy file declaring a 16 GiB storage: torch would reserve it before reading; we never get there."""
    shapes = _official_shapes()
    path = tmp_path / "claims_16GiB.p"
    _write_legacy(path, shapes, declared={"fusion_dnn.weight": 4 * GIB})
    calls = _spy_torch_load(monkeypatch)
    with pytest.raises(
        CheckpointError, match=r"claims_16GiB\.p: not a readable PyTorch checkpoint \(.*past the end"
    ):
        load_official_checkpoint(path, config=TINY)
    assert calls == []


def test_hand_written_legacy_file_loads(tmp_path: Path) -> None:
    """The scan accepts what the released files are made of (legacy format, OrderedDict, FloatStorage)."""
    path = tmp_path / "legacy_ok.p"
    _write_legacy(path, _official_shapes())
    model = load_official_checkpoint(path, config=TINY)
    assert all(float(v.abs().sum()) == 0 for k, v in model.state_dict().items() if "num_batches" not in k)


@pytest.mark.parametrize("fmt", ["plain_pickle", "legacy", "zip"])
def test_malicious_pickle_is_refused_in_our_words(tmp_path: Path, fmt: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"sample_model_{fmt}.p"
    payload = {"ds_net.first_conv.weight": _Exploit(str(marker))}
    if fmt == "plain_pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=fmt == "zip")
    with pytest.raises(CheckpointError) as info:
        load_official_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: refusing to load") and "posix.system" in message
    assert "mammogmic will not unpickle" in message and "weights_only=True" in message
    _assert_clean(message)
    assert not marker.exists()


def test_escape_codes_in_key_names_are_not_printed(tmp_path: Path) -> None:
    state = official_state_dict(GMIC(TINY))
    state["\x1b[2J\x1b[31mds_net.evil"] = torch.zeros(1)
    torch.save(state, tmp_path / "ansi.p")
    with pytest.raises(CheckpointError, match="no GMIC module") as info:
        load_official_checkpoint(tmp_path / "ansi.p", config=TINY)
    _assert_clean(str(info.value))


def test_legacy_round_trip_gives_identical_weights(tmp_path: Path) -> None:
    """The released sample_model_N.p files are legacy-format pickles: they go through the structure scan."""
    torch.manual_seed(3)
    model = GMIC(TINY)
    torch.save(official_state_dict(model), tmp_path / "legacy.p", _use_new_zipfile_serialization=False)
    loaded = load_official_checkpoint(tmp_path / "legacy.p", config=TINY)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_fixture_checkpoint_loads_identical_weights(fixtures_dir: Path) -> None:
    path = fixtures_dir / "official_format_seed0.p"
    model = load_official_checkpoint(path)
    reference = torch.load(path, map_location="cpu", weights_only=True)
    ours = official_state_dict(model)
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


# -- file modes ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_saved_model_files_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        gmic = save_model(GMIC(TINY), tmp_path / "m.safetensors")
        baseline = save_model(ResNetBaseline(BaselineConfig(width=4)), tmp_path / "b.safetensors")
        official = save_official_checkpoint(GMIC(TINY), tmp_path / "m.p")
    finally:
        os.umask(old)
    for path in (gmic, baseline, official):
        assert path.stat().st_mode & 0o777 == mode, path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors", "m.p", "m.safetensors"]


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    def fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt._atomic_write(tmp_path / "x.safetensors", fail)
    assert list(tmp_path.iterdir()) == []


def test_metadata_over_the_header_limit_is_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ckpt, "MAX_HEADER_BYTES", 20_000)
    with pytest.raises(CheckpointError, match="metadata too large"):
        save_model(GMIC(TINY), tmp_path / "m.safetensors", metadata={"notes": "x" * 30_000})
    assert list(tmp_path.iterdir()) == []
