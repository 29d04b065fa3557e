"""Fine-tuning: --init from official and own checkpoints (strict), --init-exclude, freezing, lr groups, config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from training_helpers import BlobImages, tiny_config, write_blob_manifest

from mammogmic.cli.main import main
from mammogmic.data.cache import sha256_file as file_sha256
from mammogmic.errors import CheckpointError, ConfigError
from mammogmic.models import GMIC, read_model_metadata, save_model
from mammogmic.models.checkpoint import ours_to_official
from mammogmic.training.checkpoint import load_checkpoint
from mammogmic.training.config import FREEZE_PARTS, load_config
from mammogmic.training.finetune import initialize_model, matching_names
from mammogmic.training.loop import Trainer, build_model, build_optimizer, build_scheduler

# The released architecture (global width 16, local ResNet-18 width 64, M = 128) on small inputs: K and the
# crop size change no tensor shape, so the official weights load while a step takes well under a second.
RELEASED_ARCH_SMALL_INPUT = [
    "model.global_width=16",
    "model.local_width=64",
    "model.attention_dim=128",
    "model.num_patches=2",
    "model.crop_size=[32, 32]",
]
ONE_STEP = [
    "schedule.epochs=1",
    "schedule.max_steps_per_epoch=1",
    "data.batch_size=2",
    "data.val_split=",
    "data.test_split=",
]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_blob_manifest(tmp_path_factory.mktemp("blobs"), n_exams=2)  # 8 training images


def _sets(*overrides: str) -> list[str]:
    return [arg for text in overrides for arg in ("--set", text)]


def _tiny_file(path: Path, seed: int = 123, **changes: object) -> dict[str, torch.Tensor]:
    """Save a tiny GMIC (``changes`` applied to tiny_cpu's model config) and return its state dict."""
    torch.manual_seed(seed)
    model = GMIC(tiny_config().model.replace(**changes))
    save_model(model, path)
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- the required check: official .p -> train -> the same 258 tensors -------------------------------------
def test_train_init_official_keeps_every_tensor_with_vanishing_lr(
    fixtures_dir: Path, manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    official_path = fixtures_dir / "official_format_seed0.p"
    run = tmp_path / "run"
    args = [
        "train",
        "tiny_cpu",
        *_sets(
            f"data.manifest={manifest}",
            *RELEASED_ARCH_SMALL_INPUT,
            *ONE_STEP,
            "optim.lr=1e-30",  # Adam moves each weight by at most lr: far below any weight's float32 spacing
            "runtime.freeze_batchnorm=true",  # running statistics (and num_batches_tracked) do not move
        ),
        "--init",
        str(official_path),
        "--percent-t",
        "0.02",
        "--out",
        str(run),
        "--no-progress",
    ]
    assert main(args) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["global_step"] == 1

    official = torch.load(official_path, map_location="cpu", weights_only=True)
    assert len(official) == 258
    exported = load_file(str(run / "best_model.safetensors"))
    last = load_checkpoint(run / "last.pt")["model"]
    for trained in (exported, last):
        renamed = {ours_to_official(k): v for k, v in trained.items()}
        assert set(renamed) == set(official)  # all 258 matched by name, num_batches_tracked included
        for key, value in official.items():
            assert renamed[key].shape == value.shape, key
            assert renamed[key].dtype == value.dtype, key
            assert torch.equal(renamed[key], value), key

    sha = file_sha256(official_path)
    record = json.loads((run / "init.json").read_text())
    assert record["sha256"] == sha and record["source_format"] == "official"
    assert len(record["loaded"]) == 258 and record["excluded"] == []
    meta = read_model_metadata(run / "best_model.safetensors")
    assert meta["extra"]["init"]["path"] == str(official_path.resolve())
    assert meta["extra"]["init"]["sha256"] == sha
    assert meta["model_config"]["percent_t"] == 0.02  # --percent-t set the model's t


def test_official_file_into_another_width_names_both_key_spellings(fixtures_dir: Path) -> None:
    cfg = tiny_config(**{"finetune.init": str(fixtures_dir / "official_format_seed0.p")})
    with pytest.raises(CheckpointError) as info:
        initialize_model(build_model(cfg), cfg)
    message = str(info.value)
    assert message.startswith(str(fixtures_dir / "official_format_seed0.p"))
    assert (
        "global_net.stem_conv.weight (ds_net.first_conv.weight): file (16, 1, 7, 7) vs model (4, 1, 7, 7)"
        in (message)
    )


# -- strict loading and --init-exclude -------------------------------------------------------------------
def test_strict_mismatch_lists_the_keys_and_exclude_reinitialises_them(
    manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "other_width.safetensors"
    saved = _tiny_file(path, attention_dim=8)  # tiny_cpu has attention_dim 16
    base = ["train", "tiny_cpu", *_sets(f"data.manifest={manifest}", *ONE_STEP), "--init", str(path)]

    assert main([*base, "--out", str(tmp_path / "strict"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(path) in err and "--init-exclude" in err
    assert "3 shape mismatch(es)" in err
    assert "attention.V.weight: file (8, 64) vs model (16, 64)" in err
    assert "attention.U.weight: file (8, 64) vs model (16, 64)" in err
    assert "attention.w.weight: file (1, 8) vs model (1, 16)" in err
    assert not (tmp_path / "strict" / "last.pt").exists()

    assert main([*base, "--init-exclude", "attention", "--out", str(tmp_path / "ok"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "ok" / "init.json").read_text())["excluded"] == [
        "attention.V.weight",
        "attention.U.weight",
        "attention.w.weight",
    ]

    # The same, in the library with no training step: excluded tensors keep the fresh (seeded) initialisation,
    # even where the file has the right shape (fusion); everything else is the file's.
    cfg = tiny_config(**{"finetune.init": str(path), "finetune.init_exclude": ["attention", "re:^fusion\\."]})
    torch.manual_seed(0)
    model = build_model(cfg)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = initialize_model(model, cfg)
    reinit = {
        "attention.V.weight",
        "attention.U.weight",
        "attention.w.weight",
        "fusion.weight",
        "fusion.bias",
    }
    assert set(report.excluded) == reinit and report.sha256 == file_sha256(path)
    for key, value in model.state_dict().items():
        if key in reinit:
            assert torch.equal(value, fresh[key]), key
            assert value.shape != saved[key].shape or not torch.equal(value, saved[key]), key
        else:
            assert torch.equal(value, saved[key]), key


def test_bad_init_files_exit_2_with_the_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(init: Path, *extra: str) -> str:
        assert main(["train", "tiny_cpu", "--init", str(init), *extra, "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    assert "no such file" in run(tmp_path / "missing.p")
    garbage = tmp_path / "garbage.p"
    garbage.write_bytes(b"not a checkpoint")
    manifest = write_blob_manifest(tmp_path / "m", n_exams=2)
    assert f"error: {garbage}: not a readable PyTorch checkpoint" in run(
        garbage, "--set", f"data.manifest={manifest}"
    )
    garbage_st = tmp_path / "garbage.safetensors"
    garbage_st.write_bytes(b"not a checkpoint")
    err = run(garbage_st, "--set", f"data.manifest={manifest}")
    assert f"error: {garbage_st}: not a readable safetensors file" in err
    other = tmp_path / "ok.safetensors"
    _tiny_file(other)
    err = run(other, "--init-exclude", "fusoin", "--set", f"data.manifest={manifest}")
    assert "finetune.init_exclude[0]" in err and "did you mean 'fusion'" in err


def test_exclude_patterns_glob_module_prefixes_and_regex() -> None:
    names = [
        "fusion.weight",
        "fusion.bias",
        "global_net.stem_conv.weight",
        "global_net.stages.0.0.conv1.weight",
    ]
    assert matching_names(names, ["fusion"]) == {"fusion.weight", "fusion.bias"}
    assert matching_names(names, ["*.weight"]) == {n for n in names if n.endswith(".weight")}
    assert matching_names(names, ["global_net.stem_conv"]) == {"global_net.stem_conv.weight"}
    assert matching_names(names, ["re:stages\\.0"]) == {"global_net.stages.0.0.conv1.weight"}
    assert matching_names(names, ["fus"]) == set()  # a prefix of a name is not a module name


# -- freezing ----------------------------------------------------------------------------------------------
def test_frozen_parts_do_not_move_and_the_others_train(tmp_path: Path) -> None:
    path = tmp_path / "init.safetensors"
    saved = _tiny_file(path)
    cfg = tiny_config(
        **{
            "finetune.init": str(path),
            "model.freeze": ["global", "attention"],
            "optim.lr": 1e-2,
            "schedule.epochs": 1,
            "schedule.max_steps_per_epoch": 2,
            "data.val_split": "",
        }
    )
    trainer = Trainer(cfg, tmp_path / "run", train_images=BlobImages(8), tensorboard=False)
    trainer.fit()
    assert trainer.model is not None
    frozen_modules = ("global_net.", "attention.")
    params = dict(trainer.model.named_parameters())
    for key, value in trainer.model.state_dict().items():
        if key.startswith(frozen_modules):  # weights and batch-norm running statistics alike
            assert torch.equal(value, saved[key]), key
            if key in params:
                assert not params[key].requires_grad, key
        elif key in params:
            assert not torch.equal(value, saved[key]), key
    moved_stats = [k for k in saved if k.startswith("local_net.") and k.endswith("running_mean")]
    assert moved_stats and all(not torch.equal(trainer.model.state_dict()[k], saved[k]) for k in moved_stats)


def test_freeze_parts_cover_every_gmic_module() -> None:
    children = {name for name, _ in GMIC(tiny_config().model).named_children()}
    assert set(FREEZE_PARTS.values()) == children


# -- learning-rate groups ---------------------------------------------------------------------------------
def test_backbone_lr_ratio_makes_two_groups_that_the_schedule_scales(tmp_path: Path) -> None:
    path = tmp_path / "init.safetensors"
    _tiny_file(path)
    cfg = tiny_config(
        **{
            "finetune.init": str(path),
            "finetune.init_exclude": ["fusion"],
            "optim.lr": 1e-3,
            "optim.backbone_lr_ratio": 0.1,
            "optim.warmup_steps": 4,
        }
    )
    model = build_model(cfg)
    initialize_model(model, cfg)
    optimizer = build_optimizer(model, cfg)
    pretrained, new = optimizer.param_groups
    ids = {id(p): name for name, p in model.named_parameters()}
    assert pretrained["name"] == "pretrained" and new["name"] == "new"
    assert {ids[id(p)] for p in new["params"]} == {"fusion.weight", "fusion.bias"}
    assert len(pretrained["params"]) == len(ids) - 2
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=10)
    for step in range(6):
        factor = min(1.0, (step + 1) / 4)
        assert pretrained["lr"] == pytest.approx(1e-4 * factor) and new["lr"] == pytest.approx(1e-3 * factor)
        optimizer.step()
        scheduler.step()

    # Without --init, or with ratio 1, one group at the full lr (as before fine-tuning existed).
    for overrides in ({"optim.backbone_lr_ratio": 0.1}, {"finetune.init": str(path)}):
        single = build_optimizer(model, tiny_config(**overrides))
        assert len(single.param_groups) == 1 and single.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_resume_rebuilds_groups_and_frozen_parts_without_reading_the_file_again(tmp_path: Path) -> None:
    path = tmp_path / "init.safetensors"
    _tiny_file(path)
    cfg = tiny_config(
        **{
            "finetune.init": str(path),
            "finetune.init_exclude": ["local_classifier"],
            "finetune.freeze": ["local"],
            "optim.backbone_lr_ratio": 0.5,
            "schedule.epochs": 1,
            "schedule.max_steps_per_epoch": 2,
            "schedule.checkpoint_every_steps": 1,
            "data.val_split": "",
        }
    )

    def stop_at_step_2(event: str, info: dict[str, object]) -> None:
        if event == "step" and info["step"] == 2:  # last.pt holds step 1
            raise KeyboardInterrupt

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, run, train_images=BlobImages(8), tensorboard=False, callback=stop_at_step_2).fit()
    path.unlink()  # resume must not need the file
    resumed = Trainer(cfg, run, train_images=BlobImages(8), tensorboard=False)
    assert resumed.fit(resume=True).global_step == 2  # the optimizer state loaded into the same two groups
    assert resumed.model is not None and not any(
        p.requires_grad for p in resumed.model.local_net.parameters()
    )
    assert read_model_metadata(run / "best_model.safetensors")["extra"]["init"]["excluded"] == [
        "local_classifier.weight"
    ]


# -- configuration ----------------------------------------------------------------------------------------
def test_model_freeze_is_an_alias_of_finetune_freeze(tmp_path: Path) -> None:
    assert load_config("tiny_cpu", ["model.freeze=[global, local]"]).finetune.freeze == ("global", "local")
    assert load_config("tiny_cpu", ["model.freeze=fusion"]).finetune.freeze == ("fusion",)
    text = yaml.safe_load(load_config("tiny_cpu").to_yaml())
    text["model"]["freeze"] = ["attention"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(text))
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.finetune.freeze == ("attention",) and "freeze" not in cfg.to_dict()["model"]
    # An override of either spelling wins over the file.
    assert load_config(tmp_path / "c.yaml", ["finetune.freeze=[local]"]).finetune.freeze == ("local",)
    assert load_config(tmp_path / "c.yaml", ["model.freeze=[local]"]).finetune.freeze == ("local",)
    assert cfg.replace(**{"model.freeze": ["global"]}).finetune.freeze == ("global",)


@pytest.mark.parametrize(
    ("overrides", "field", "hint"),
    [
        (["model.freeze=[globl]"], "model.freeze[0]", "did you mean 'global'"),
        (["finetune.freeze=[local, fuse]"], "finetune.freeze[1]", "did you mean 'fusion'"),
        (["finetune.init_exclude=[fusion]"], "finetune.init_exclude", "finetune.init"),
        (
            ["finetune.init=a.p", "finetune.init_exclude=['re:(']"],
            "finetune.init_exclude[0]",
            "regular expression",
        ),
        (["finetune.percent_t=0.02"], "finetune.percent_t", "finetune.init"),
        (["finetune.init=a.p", "finetune.percent_t=0.02"], "finetune.percent_t", "model.percent_t 0.1"),
        (["finetune.init=a.p", "finetune.percent_t=2"], "finetune.percent_t", "(0, 1]"),
        (["optim.backbone_lr_ratio=-1"], "optim.backbone_lr_ratio", ">= 0"),
        (["finetune.inti=a.p"], "finetune.inti", "did you mean 'init'"),
    ],
)
def test_finetune_config_errors_name_the_field(overrides: list[str], field: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("tiny_cpu", overrides)
    assert str(info.value).startswith(f"{field}:") and hint in str(info.value), str(info.value)


def test_percent_t_fills_the_model_t_and_init_resolves_against_the_yaml(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump({"model": {"global_width": 4}, "finetune": {"init": "w/m.p", "percent_t": 0.05}})
    )
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.model.percent_t == 0.05 and cfg.finetune.percent_t == 0.05
    assert Path(cfg.finetune.init) == (tmp_path / "w" / "m.p").resolve()
    assert load_config(cfg.to_dict()) == cfg


def test_everything_frozen_is_a_config_error(tmp_path: Path) -> None:
    cfg = tiny_config(**{"finetune.freeze": list(FREEZE_PARTS), "data.val_split": ""})
    with pytest.raises(ConfigError, match="finetune.freeze: .* freezes every parameter"):
        Trainer(cfg, tmp_path, train_images=BlobImages(8), tensorboard=False).fit()
