"""The training objectives: GMIC's (paper Eq. 13), DMV-CNN's (:class:`DMVLoss`), the patch classifier's
(:class:`PatchLoss`).

GMIC:

``L = sum_c [BCE(y_c, y_global_c) + BCE(y_c, y_local_c) + BCE(y_c, y_fusion_c)] + beta * L1(A)``

* BCE terms are summed over classes (benign, malignant) and averaged over the images of the batch. Unknown
  labels (NaN) contribute nothing; each term is normalised by the number of images with a known label.
* ``L1(A)`` is the saliency maps' L1 norm. Since ``A = sigmoid(.) >= 0`` it is their sum. The released models'
  beta values (3.3e-6 .. 2.3e-4) only make sense for a *sum over the positions* (2 x 46 x 30 for a full-size
  input), so ``saliency_reduction="sum"`` (default) sums over classes and positions and averages over the
  batch; ``"mean"`` averages over positions instead (multiply beta by ``C*h*w`` to compare).
* Which heads are trained follows ``GMICConfig.prediction``: the global head is always trained (it selects
  the patches), the local head unless the prediction is global-only, the fusion head only for ``"fusion"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mammogmic.errors import ConfigError
from mammogmic.models.dmv import DMVOutput
from mammogmic.models.gmic import GMICOutput
from mammogmic.models.roi import top_t_pool


@dataclass(frozen=True)
class LossConfig:
    """Attributes:
    beta: weight of the saliency L1 term (model 1 of the release: 3.259e-6).
    saliency_reduction: ``"sum"`` or ``"mean"`` over saliency positions (see module docstring).
    """

    beta: float = 3.259e-6
    saliency_reduction: str = "sum"

    def __post_init__(self) -> None:
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or self.beta < 0:
            raise ConfigError(f"beta: expected a non-negative number, got {self.beta!r}")
        if self.saliency_reduction not in ("sum", "mean"):
            raise ConfigError(
                f"saliency_reduction: expected 'sum' or 'mean', got {self.saliency_reduction!r}"
            )


@dataclass
class LossOutput:
    total: torch.Tensor
    bce_global: torch.Tensor
    bce_local: torch.Tensor
    bce_fusion: torch.Tensor
    saliency_l1: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        """Detached scalar values, for logging."""
        return {
            k: float(getattr(self, k).detach())
            for k in ("total", "bce_global", "bce_local", "bce_fusion", "saliency_l1")
        }


def _masked_bce(pred: torch.Tensor, target: torch.Tensor, known: torch.Tensor, logits: bool) -> torch.Tensor:
    safe_target = torch.where(known, target, torch.zeros_like(target))
    if logits:
        per = F.binary_cross_entropy_with_logits(pred, safe_target, reduction="none")
    else:
        # BCE on probabilities with logs clamped at -100 like torch's BCELoss, written out so that a NaN
        # prediction gives a NaN loss (for the trainer's non-finite check) instead of raising. The clamp sits
        # *inside* the log: a saturated probability (exactly 0 or 1) then gets a zero gradient, not 0/0 = NaN.
        tiny = torch.finfo(pred.dtype).tiny
        floor = torch.full_like(pred, -100.0)
        log_p = torch.where(pred <= 0, floor, torch.log(pred.clamp_min(tiny))).clamp_min(-100.0)
        log_1mp = torch.where(pred >= 1, floor, torch.log((1 - pred).clamp_min(tiny))).clamp_min(-100.0)
        per = -(safe_target * log_p + (1 - safe_target) * log_1mp)
    per = per * known
    n_images = known.any(dim=1).sum().clamp_min(1)
    return per.sum() / n_images


class GMICLoss(nn.Module):
    """Eq. 13. ``forward(output, labels)``: labels ``(N, C)`` float in {0, 1}, NaN for unknown."""

    def __init__(self, config: LossConfig | None = None, prediction: str = "fusion") -> None:
        super().__init__()
        self.config = config or LossConfig()
        self.prediction = prediction
        # Set by the trainer during ``schedule.t_warmup_epochs``: the global BCE then pools the maps with this
        # t instead of taking the model's ``y_global``.
        self.percent_t: float | None = None

    def forward(self, out: GMICOutput, labels: torch.Tensor) -> LossOutput:
        labels = labels.to(out.y_global.dtype)
        known = ~torch.isnan(labels)
        zero = out.y_global.new_zeros(())
        # BCE on probabilities is computed in float32 even under autocast.
        y_global = out.y_global if self.percent_t is None else top_t_pool(out.saliency, self.percent_t)
        bce_global = _masked_bce(y_global.float(), labels.float(), known, logits=False)
        bce_local = (
            _masked_bce(out.logits_local.float(), labels.float(), known, logits=True)
            if self.prediction != "global"
            else zero
        )
        bce_fusion = (
            _masked_bce(out.logits_fusion.float(), labels.float(), known, logits=True)
            if self.prediction == "fusion"
            else zero
        )
        sal = out.saliency.float().flatten(1)
        l1 = sal.abs().sum(dim=1) if self.config.saliency_reduction == "sum" else sal.abs().mean(dim=1)
        saliency_l1 = l1.mean()
        total = bce_global + bce_local + bce_fusion + self.config.beta * saliency_l1
        return LossOutput(total, bce_global, bce_local, bce_fusion, saliency_l1)


class DMVLoss(nn.Module):
    """View-wise DMV-CNN: negative log-likelihood of each head's ``(N, 4, 2)`` log-softmax outputs.

    ``forward(output, labels)``: labels ``(N, 4)`` in :data:`~mammogmic.models.DMV_LABELS` order, 0/1, NaN for
    unknown. The loss is the mean, over both heads (CC, MLO) and every known label, of ``-log p(label)``.
    """

    def forward(self, out: DMVOutput, labels: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(labels)
        target = torch.where(known, labels, torch.zeros_like(labels)).long().unsqueeze(-1)  # (N, 4, 1)
        terms = []
        for log_probs in out.log_probs.values():
            nll = -log_probs.float().gather(-1, target).squeeze(-1)  # (N, 4)
            terms.append((nll * known).sum() / known.sum().clamp_min(1))
        return torch.stack(terms).mean()


class PatchLoss(nn.Module):
    """The patch classifier: cross-entropy of its logits ``(N, K)`` against one-hot labels ``(N, K)``."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels.argmax(dim=1))
