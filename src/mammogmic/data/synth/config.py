"""Configuration of the synthetic screening-mammogram generator."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from mammogmic.errors import ConfigError

DENSITY_LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
#: BI-RADS density mix of a screening population (roughly 10/40/40/10 %).
SCREENING_DENSITY_WEIGHTS: tuple[float, float, float, float] = (0.1, 0.4, 0.4, 0.1)


def _range(name: str, value: Any, lo: float, hi: float) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a (min, max) pair of numbers, got {value!r}") from None
    if not (math.isfinite(a) and math.isfinite(b)) or a > b or a < lo or b > hi:
        raise ConfigError(f"{name}: need {lo} <= min <= max <= {hi}, got ({a}, {b})")
    return (a, b)


def _prob(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a probability in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:
        raise ConfigError(f"{name}: expected a probability in [0, 1], got {v}")
    return v


def parse_density(spec: str) -> tuple[float, float, float, float]:
    """Turn a density spec into weights for BI-RADS A..D.

    Args:
        spec: ``"mixed"`` (screening mix 10/40/40/10 %), one letter (``"C"``), or letters separated
            by commas (``"A,B"``: uniform over those).

    Returns:
        Four weights summing to 1.

    Raises:
        ConfigError: the spec is not understood (names the ``density`` field).
    """
    text = str(spec).strip().upper()
    if text == "MIXED":
        return SCREENING_DENSITY_WEIGHTS
    letters = [t.strip() for t in text.replace(" ", ",").split(",") if t.strip()]
    if not letters or any(t not in DENSITY_LETTERS for t in letters):
        raise ConfigError(
            f"density: expected 'mixed' or letters from A,B,C,D (e.g. 'B' or 'A,B'), got {spec!r}"
        )
    w = [1.0 if d in letters else 0.0 for d in DENSITY_LETTERS]
    s = sum(w)
    return (w[0] / s, w[1] / s, w[2] / s, w[3] / s)


@dataclass(frozen=True)
class SynthConfig:
    """What the synthetic exams contain. Frozen and validated on construction.

    Physical sizes are in millimetres and refer to a full-field image of 3328 x 2560 pixels at
    0.07 mm per pixel; at other image sizes they scale with the image (a 736 x 480 image still shows
    a whole breast, with ~0.32 mm pixels).

    Attributes:
        density_weights: probabilities of BI-RADS density A, B, C, D (per exam; both breasts share it).
        malignant_rate: probability that a breast holds a malignant finding.
        benign_rate: probability that a breast holds a benign finding (independent of malignant_rate).
        calcification_fraction: probability that a finding is a calcification cluster rather than a mass.
        mass_diameter_mm: range of mass diameters (both classes draw from the same range, so size does
            not give the class away).
        calc_cluster_mm: range of the extent of calcification clusters (both classes).
        mass_contrast: range of a mass's peak density added to the tissue, as a fraction of the
            fat-to-gland contrast.
        malignant_mass_contrast: the same for malignant masses; ``None`` (default): ``mass_contrast``, so a
            mass's body says nothing of its class and all class evidence lies at its margin (docs/localization.md).
        calc_contrast: range of calcification brightness, as a fraction of the 12-bit range.
        min_detail_px: lower bound, in output pixels, for fine structures (spicule width, fine
            calcification diameter), so that the class evidence survives at reduced image sizes.
        vessels: at most this many blood vessels per view (0: none).
        spiculated_fraction: share of malignant masses with spicules; the others are irregular with an
            indistinct, microlobulated margin and at most a few short spicules.
        noise: scale of the acquisition (quantum + electronic) noise; 0 disables it.
        texture_beta: exponent of the power-law (1/f^beta) parenchymal texture.
        split_fractions: train/val/test fractions of exams (normalised to sum to 1).
    """

    density_weights: tuple[float, float, float, float] = SCREENING_DENSITY_WEIGHTS
    malignant_rate: float = 0.2
    benign_rate: float = 0.25
    calcification_fraction: float = 0.35
    mass_diameter_mm: tuple[float, float] = (8.0, 15.0)
    calc_cluster_mm: tuple[float, float] = (9.0, 16.0)
    mass_contrast: tuple[float, float] = (0.45, 0.7)
    malignant_mass_contrast: tuple[float, float] | None = None
    calc_contrast: tuple[float, float] = (0.22, 0.4)
    min_detail_px: float = 1.3
    vessels: int = 3
    spiculated_fraction: float = 0.7
    noise: float = 1.0
    texture_beta: float = 3.0
    split_fractions: tuple[float, float, float] = field(default=(0.7, 0.15, 0.15))

    def __post_init__(self) -> None:
        try:
            dw = tuple(float(v) for v in self.density_weights)
        except (TypeError, ValueError):
            raise ConfigError(
                f"density_weights: expected four numbers, got {self.density_weights!r}"
            ) from None
        if len(dw) != 4 or any(not math.isfinite(v) or v < 0 for v in dw) or sum(dw) <= 0:
            raise ConfigError(f"density_weights: expected four non-negative weights for A..D, got {dw!r}")
        s = sum(dw)
        object.__setattr__(self, "density_weights", tuple(v / s for v in dw))
        if not isinstance(self.vessels, int) or isinstance(self.vessels, bool) or not 0 <= self.vessels <= 20:
            raise ConfigError(f"vessels: expected an integer in [0, 20], got {self.vessels!r}")
        for name in ("malignant_rate", "benign_rate", "calcification_fraction", "spiculated_fraction"):
            object.__setattr__(self, name, _prob(name, getattr(self, name)))
        object.__setattr__(
            self, "mass_diameter_mm", _range("mass_diameter_mm", self.mass_diameter_mm, 1.0, 60.0)
        )
        object.__setattr__(
            self, "calc_cluster_mm", _range("calc_cluster_mm", self.calc_cluster_mm, 2.0, 60.0)
        )
        object.__setattr__(self, "mass_contrast", _range("mass_contrast", self.mass_contrast, 0.0, 3.0))
        if self.malignant_mass_contrast is not None:
            value = _range("malignant_mass_contrast", self.malignant_mass_contrast, 0.0, 3.0)
            object.__setattr__(self, "malignant_mass_contrast", value)
        object.__setattr__(self, "calc_contrast", _range("calc_contrast", self.calc_contrast, 0.0, 1.0))
        for name, lo, hi in (("min_detail_px", 0.5, 10.0), ("noise", 0.0, 20.0), ("texture_beta", 1.0, 5.0)):
            try:
                v = float(getattr(self, name))
            except (TypeError, ValueError):
                raise ConfigError(f"{name}: expected a number, got {getattr(self, name)!r}") from None
            if not (math.isfinite(v) and lo <= v <= hi):
                raise ConfigError(f"{name}: expected a number in [{lo}, {hi}], got {v}")
            object.__setattr__(self, name, v)
        try:
            sf = tuple(float(v) for v in self.split_fractions)
        except (TypeError, ValueError):
            raise ConfigError(
                f"split_fractions: expected three numbers, got {self.split_fractions!r}"
            ) from None
        if len(sf) != 3 or any(not math.isfinite(v) or v < 0 for v in sf) or sum(sf) <= 0:
            raise ConfigError(
                f"split_fractions: expected three non-negative train/val/test fractions, got {sf!r}"
            )
        object.__setattr__(self, "split_fractions", tuple(v / sum(sf) for v in sf))

    @classmethod
    def demo(cls, **overrides: Any) -> SynthConfig:
        """Preset for the README demo: a few hundred exams at ~736 x 480 train a small GMIC on a CPU.

        About 40 % of breasts hold a malignant finding and 40 % a benign one (independently, so ~16 %
        hold both and ~36 % are normal); densities lean to A-C so findings are not masked too often;
        findings are a little larger and brighter than the default.
        """
        base: dict[str, Any] = {
            "density_weights": (0.25, 0.4, 0.3, 0.05),
            "malignant_rate": 0.4,
            "benign_rate": 0.4,
            "calcification_fraction": 0.3,
            "mass_diameter_mm": (10.0, 16.0),
            "mass_contrast": (0.55, 0.8),
            "calc_contrast": (0.28, 0.45),
            "min_detail_px": 1.5,
            "spiculated_fraction": 1.0,
        }
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes: Any) -> SynthConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of all fields."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SynthConfig:
        """Build from :meth:`to_dict` output; unknown keys raise ConfigError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown SynthConfig field")
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)
