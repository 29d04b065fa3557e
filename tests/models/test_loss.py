from __future__ import annotations

import math

import pytest
import torch

from mammogmic.errors import ConfigError
from mammogmic.models.gmic import GMICOutput
from mammogmic.training.loss import GMICLoss, LossConfig


def fake_output(p_global: float, logit: float, saliency: torch.Tensor) -> GMICOutput:
    n = saliency.shape[0]
    y = torch.full((n, 2), p_global)
    lg = torch.full((n, 2), logit)
    z = torch.zeros(n, 1)
    return GMICOutput(
        y_fusion=torch.sigmoid(lg),
        y_global=y,
        y_local=torch.sigmoid(lg),
        prediction=y,
        saliency=saliency,
        h_g=z,
        patch_locations=z.long(),
        patches=z,
        h_crops=z,
        patch_attention=z,
        z=z,
        logits_local=lg,
        logits_fusion=lg,
    )


def test_loss_matches_hand_computation() -> None:
    sal = torch.full((2, 2, 3, 4), 0.25)
    out = fake_output(0.8, 0.0, sal)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    res = GMICLoss(LossConfig(beta=0.1, saliency_reduction="sum"))(out, labels)
    bce_g = 2 * (-math.log(0.8) - math.log(0.2)) / 2  # per image: both classes summed
    assert res.bce_global.item() == pytest.approx(bce_g, rel=1e-6)
    assert res.bce_local.item() == pytest.approx(2 * math.log(2), rel=1e-6)
    assert res.saliency_l1.item() == pytest.approx(0.25 * 24)
    assert res.total.item() == pytest.approx(bce_g + 4 * math.log(2) + 0.1 * 6, rel=1e-6)
    mean = GMICLoss(LossConfig(beta=0.1, saliency_reduction="mean"))(out, labels)
    assert mean.saliency_l1.item() == pytest.approx(0.25)


def test_unknown_labels_are_ignored() -> None:
    sal = torch.zeros(2, 2, 2, 2)
    out = fake_output(0.5, 0.0, sal)
    both = GMICLoss(LossConfig(beta=0))(out, torch.tensor([[1.0, 0.0], [float("nan"), float("nan")]]))
    one = GMICLoss(LossConfig(beta=0))(fake_output(0.5, 0.0, sal[:1]), torch.tensor([[1.0, 0.0]]))
    assert torch.isfinite(both.total)
    assert both.total.item() == pytest.approx(one.total.item())


def test_heads_follow_prediction_mode() -> None:
    out = fake_output(0.5, 0.0, torch.zeros(1, 2, 2, 2))
    labels = torch.tensor([[1.0, 0.0]])
    assert GMICLoss(prediction="global")(out, labels).bce_local.item() == 0.0
    assert GMICLoss(prediction="average")(out, labels).bce_fusion.item() == 0.0
    assert GMICLoss(prediction="fusion")(out, labels).bce_fusion.item() > 0.0


@pytest.mark.parametrize(("field", "value"), [("beta", -1.0), ("saliency_reduction", "max")])
def test_bad_loss_config(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        LossConfig(**{field: value})


def test_bce_on_probabilities_matches_torch_and_propagates_nan() -> None:
    import torch.nn.functional as F

    p = torch.tensor([[0.0, 1e-9], [0.3, 1.0]])
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    out = fake_output(0.5, 0.0, torch.zeros(2, 2, 1, 1))
    out.y_global = p
    ours = GMICLoss(LossConfig(beta=0), prediction="global")(out, y).bce_global
    ref = F.binary_cross_entropy(p, y, reduction="sum") / 2
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    out.y_global = torch.tensor([[float("nan"), 0.5], [0.5, 0.5]])
    assert torch.isnan(GMICLoss(LossConfig(beta=0), prediction="global")(out, y).total)


def test_saturated_probabilities_give_finite_gradients() -> None:
    p = torch.tensor([[0.0, 1.0], [1.0, 0.5]], requires_grad=True)
    out = fake_output(0.5, 0.0, torch.zeros(2, 2, 1, 1))
    out.y_global = p
    labels = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    loss = GMICLoss(LossConfig(beta=0), prediction="global")(out, labels).bce_global
    loss.backward()
    assert torch.isfinite(loss) and p.grad is not None and torch.isfinite(p.grad).all()


def test_warm_up_t_pools_the_maps_instead_of_the_models_y_global() -> None:
    sal = torch.zeros(1, 2, 2, 2)
    sal[0, :, 0, 0] = 0.8  # one cell of four at 0.8: GAP gives 0.2, top-25% gives 0.8
    out = fake_output(0.5, 0.0, sal)  # the model's own y_global says 0.5
    labels = torch.tensor([[1.0, 1.0]])
    loss = GMICLoss(LossConfig(beta=0))
    assert loss(out, labels).bce_global.item() == pytest.approx(-2 * math.log(0.5), rel=1e-6)
    loss.percent_t = 1.0
    assert loss(out, labels).bce_global.item() == pytest.approx(-2 * math.log(0.2), rel=1e-6)
    loss.percent_t = 0.25
    assert loss(out, labels).bce_global.item() == pytest.approx(-2 * math.log(0.8), rel=1e-6)
