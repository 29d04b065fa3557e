from __future__ import annotations

import pytest

from mammogmic.data.synth import SynthConfig, generate_exam, parse_density
from mammogmic.data.synth.config import SCREENING_DENSITY_WEIGHTS
from mammogmic.errors import ConfigError


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("malignant_rate", 1.5),
        ("benign_rate", -0.1),
        ("benign_rate", "often"),
        ("calcification_fraction", 2),
        ("mass_diameter_mm", (15.0, 5.0)),
        ("mass_diameter_mm", 7),
        ("calc_cluster_mm", (1.0, 10.0)),
        ("mass_contrast", (0.2, float("nan"))),
        ("malignant_mass_contrast", (0.9, 0.5)),
        ("calc_contrast", (0.1, 1.5)),
        ("density_weights", (0, 0, 0, 0)),
        ("density_weights", (1, 1, 1)),
        ("min_detail_px", 0.0),
        ("noise", -1.0),
        ("vessels", -1),
        ("vessels", 2.5),
        ("spiculated_fraction", 1.1),
        ("texture_beta", 9.0),
        ("split_fractions", (0.7, -0.3, 0.6)),
    ],
)
def test_bad_field_raises_config_error_naming_it(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"^{field}:"):
        SynthConfig(**{field: value})


def test_unknown_key_in_dict_is_named() -> None:
    data = SynthConfig().to_dict()
    data["tumour_rate"] = 0.5
    with pytest.raises(ConfigError, match="tumour_rate"):
        SynthConfig.from_dict(data)


def test_dict_round_trip_and_normalisation() -> None:
    cfg = SynthConfig(density_weights=(1, 1, 0, 0), split_fractions=(2, 1, 1))
    assert cfg.density_weights == (0.5, 0.5, 0.0, 0.0)
    assert cfg.split_fractions == (0.5, 0.25, 0.25)
    assert SynthConfig.from_dict(cfg.to_dict()) == cfg
    demo = SynthConfig.demo()
    assert SynthConfig.from_dict(demo.to_dict()) == demo
    assert demo.malignant_rate > SynthConfig().malignant_rate


def test_config_is_frozen() -> None:
    cfg = SynthConfig()
    with pytest.raises(AttributeError):
        cfg.noise = 2.0  # type: ignore[misc]


def test_parse_density() -> None:
    assert parse_density("mixed") == SCREENING_DENSITY_WEIGHTS
    assert parse_density("c") == (0.0, 0.0, 1.0, 0.0)
    assert parse_density("A,B") == (0.5, 0.5, 0.0, 0.0)
    with pytest.raises(ConfigError, match="^density:"):
        parse_density("E")
    with pytest.raises(ConfigError, match="^density:"):
        parse_density("")


@pytest.mark.parametrize("size", [(32, 160), (256,), ("a", 3), (20000, 100)])
def test_bad_size_is_named(size: object) -> None:
    with pytest.raises(ConfigError, match="^size:"):
        generate_exam(0, size, SynthConfig())  # type: ignore[arg-type]


def test_malignant_masses_draw_their_contrast_from_their_own_range() -> None:
    import numpy as np

    from mammogmic.data.synth.findings import plan_findings

    base = SynthConfig(
        malignant_rate=1.0, benign_rate=1.0, calcification_fraction=0.0, mass_contrast=(0.3, 0.3)
    )
    for config, malignant in ((base, 0.3), (base.replace(malignant_mass_contrast=(0.8, 0.8)), 0.8)):
        findings = plan_findings(np.random.default_rng(0), config)
        assert {f.cls: f.contrast for f in findings} == {"malignant": malignant, "benign": 0.3}
