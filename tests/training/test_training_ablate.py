"""The ablation plan covers the paper's table (the runs themselves are too slow for a unit test)."""

from __future__ import annotations

from mammogmic.training.ablate import AblationSettings, _variants
from mammogmic.training.demo import demo_train_config


def test_variants_cover_the_paper_table() -> None:
    base = demo_train_config("unused.csv")
    runs = _variants(base, AblationSettings())
    names = [name for _, name, _ in runs]
    assert names[0] == "base"
    assert {"uniform attention", "random patches", "GAP", "GMP"} <= set(names)
    ks = sorted({*(int(n[2:]) for n in names if n.startswith("K=")), base.model.num_patches})
    assert ks == [1, 2, 3, 4, 5, 6]
    for _, _, overrides in runs[1:]:
        cfg = base.replace(**overrides)  # every variant is a valid config
        assert cfg != base
    only_k = _variants(base, AblationSettings(groups=("k",)))
    assert all(group in ("base", "k") for group, _, _ in only_k)
