"""TrainConfig: presets, YAML + overrides, validation errors that name the dotted field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mammogmic.errors import ConfigError
from mammogmic.training.config import TrainConfig, apply_overrides, list_presets, load_config, parse_override


def test_presets_load_and_differ_where_expected() -> None:
    assert {"gmic_resnet18", "gmic_resnet34", "gmic_resnet50", "tiny_cpu"} <= set(list_presets())
    archs = {
        name: load_config(name).model.local_arch
        for name in ("gmic_resnet18", "gmic_resnet34", "gmic_resnet50")
    }
    assert archs == {"gmic_resnet18": "resnet18", "gmic_resnet34": "resnet34", "gmic_resnet50": "resnet50"}
    paper = load_config("gmic_resnet18")
    assert paper.data.out_shape == (2944, 1920)
    assert paper.model.crop_size == (256, 256) and paper.model.num_patches == 6
    assert paper.data.balanced_sampling is True
    assert load_config("tiny_cpu").data.out_shape == (128, 96)


def test_overrides_parse_yaml_values() -> None:
    cfg = load_config(
        "tiny_cpu",
        [
            "optim.lr=2e-4",
            "data.out_shape=[160, 128]",
            "schedule.patience=null",
            "runtime.amp=bf16",
            "model.crop_size=[16, 16]",
        ],
    )
    assert cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.data.out_shape == (160, 128)
    assert cfg.schedule.patience is None
    assert cfg.runtime.amp == "bf16"
    assert cfg.model.crop_size == (16, 16)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("optim.lr=-1", "optim.lr"),
        ("optim.lrr=1", "optim.lrr"),
        ("optim.betas=[0.9, 1.5]", "optim.betas[1]"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.batch_size=2.5", "data.batch_size"),
        ("data.label_level=exam", "data.label_level"),
        ("data.out_shape=[100]", "data.out_shape"),
        ("data.hflip_prob=1.5", "data.hflip_prob"),
        ("data.vflip_prob=-0.1", "data.vflip_prob"),
        ("data.keep_in_memory=maybe", "data.keep_in_memory"),
        ("model.global_arch=resnet12", "model.global_arch"),
        ("schedule.val_metric=accuracy", "schedule.val_metric"),
        ("runtime.amp=fp8", "runtime.amp"),
        ("runtime.device=tpu", "runtime.device"),
        ("runtime.deterministic=maybe", "runtime.deterministic"),
        ("model.num_patches=0", "model.num_patches"),
        ("model.attention=soft", "model.attention"),
        ("model.crop_size=[512, 512]", "model.crop_size"),
        ("loss.beta=-1", "loss.beta"),
        ("bogus.x=1", "bogus"),
    ],
)
def test_errors_name_the_dotted_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("tiny_cpu", [override])
    assert str(info.value).startswith(f"{field}:"), str(info.value)


def test_unknown_field_suggests_the_close_name() -> None:
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        load_config("tiny_cpu", ["schedule.epoch=3"])


def test_yaml_round_trip_and_relative_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config("tiny_cpu", ["optim.lr=3e-4"])
    saved = cfg.save(tmp_path / "run" / "config.yaml")
    again = load_config(saved)
    assert again == cfg
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    text = yaml.safe_load(saved.read_text())
    text["data"]["manifest"] = "data/manifest.csv"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(text))
    loaded = load_config(tmp_path / "c.yaml")
    assert Path(loaded.data.manifest) == (tmp_path / "data" / "manifest.csv").resolve()
    # A relative path given on the command line means the working folder's file, made absolute at once.
    monkeypatch.chdir(tmp_path / "run")
    assert load_config(tmp_path / "c.yaml", ["data.manifest=m.csv"]).data.manifest == str(
        tmp_path / "run" / "m.csv"
    )
    assert load_config({"data": {"manifest": "m.csv"}}).data.manifest == str(tmp_path / "run" / "m.csv")


def test_saved_config_holds_an_absolute_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig.from_dict({"data": {"manifest": "data/m.csv"}})  # built in Python: relative to the cwd
    saved = cfg.save(tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(saved.read_text())["data"]["manifest"] == str(tmp_path / "data" / "m.csv")
    monkeypatch.chdir(tmp_path / "run")
    assert load_config(saved).data.manifest == str(tmp_path / "data" / "m.csv")


def test_loader_workers_are_capped_by_the_cpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import mammogmic.training.config as config_module

    monkeypatch.setattr(config_module, "available_cpus", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    paper = load_config("gmic_resnet18")
    assert paper.runtime.num_workers == 1  # the preset's 8, on a 2-core machine
    assert paper.to_dict()["runtime"]["num_workers"] == 8  # saved as requested: a larger machine gets 8
    saved = paper.save(tmp_path / "config.yaml")
    monkeypatch.setattr(config_module, "available_cpus", lambda: 64)
    assert load_config(saved).runtime.num_workers == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # torchrun, 16 processes share the 64 CPUs
    assert load_config(saved).runtime.num_workers == 3
    monkeypatch.setattr(config_module, "available_cpus", lambda: 1)
    assert load_config("tiny_cpu", ["runtime.num_workers=4"]).runtime.num_workers == 0


def test_bad_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("no_such_preset")


def test_apply_overrides_does_not_mutate_input() -> None:
    base = {"optim": {"lr": 1.0}}
    out = apply_overrides(base, {"optim.lr": 2.0, "data.tta": 3})
    assert base == {"optim": {"lr": 1.0}}
    assert out == {"optim": {"lr": 2.0}, "data": {"tta": 3}}
    with pytest.raises(ConfigError, match="optim.lr"):
        apply_overrides(out, {"optim.lr.x": 1})
