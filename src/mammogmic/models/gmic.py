"""GMIC: global network -> saliency -> top-t% -> retrieve_roi -> local network -> gated attention -> fusion.

Shapes for the paper's setting (input 2944x1920, K=6, 256x256 patches, ResNet-18 local network)::

    x            (N, 1, 2944, 1920)
    h_g          (N, 256, 46, 30)      global network f_g (stride 64)
    saliency     (N, 2, 46, 30)        sigmoid(conv1x1(h_g)), benign / malignant (saliency_head "fusion": the 1x1
                                       convolution is the fusion layer's weights for h_g; saliency_symmetry
                                       "point": its mean
                                       with the maps of the input turned by 180 degrees; "point_at_inference":
                                       their geometric mean, in eval mode only; "flips_at_inference": the
                                       geometric mean over the input and its three mirrorings, eval mode only;
                                       saliency_grid "fine_at_inference": h_g and the maps 92x60, half the
                                       stride, in eval mode only)
    y_global     (N, 2)                top-t% pooling of each map
    locations    (N, 6, 2)             upper-left (row, col) of each patch, input pixels
    patches      (N, 6, 1, 256, 256)   cut from x at full resolution
    h_crops      (N, 6, 512)           local network f_l + global average pooling
    attention    (N, 6)                gated attention, sums to 1
    z            (N, 512)              attention-weighted sum of h_crops
    y_local      (N, 2)                sigmoid(W z)
    y_fusion     (N, 2)                sigmoid(Linear([max-pool(h_g), z]))

No gradient flows through patch *selection* (an argmax); gradients do flow into the patch pixels.

The three heads (saliency 1x1 convolution, local classifier, fusion layer) run in the model's own precision
(float32) even under ``torch.autocast``: their outputs are the scores that validation and evaluation rank, and
bf16/fp16 would round them to 2-3 significant digits (52 distinct scores among 192 validation images in a bf16
run). The heads are well under 0.1% of the forward pass's multiply-adds, so this costs nothing measurable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from mammogmic.models.config import REFLECTIONS, BaselineConfig, GMICConfig
from mammogmic.models.resnet import ResNet22, ResNetV1
from mammogmic.models.roi import (
    crop_patches,
    greedy_windows,
    grid_to_pixels,
    normalize_saliency,
    random_windows,
    reflect_on_cells,
    top_t_pool,
    window_on_grid,
)


class FusionMaps(nn.Module):
    """The saliency head of ``saliency_head: fusion``: a 1x1 convolution whose weights are the fusion layer's
    weights for the global features (its first ``global_dim`` columns), so each map is the fusion head's
    class-activation map. It holds no parameters: the fusion layer is referenced, not registered, so the state
    dict and the optimizer see its weights once, as ``fusion.weight``."""

    def __init__(self, fusion: nn.Linear, global_dim: int) -> None:
        super().__init__()
        object.__setattr__(self, "_fusion", fusion)  # not a submodule
        self.global_dim = global_dim

    @property
    def weight(self) -> torch.Tensor:
        """``(C, global_dim, 1, 1)``: a view of the fusion layer's weights."""
        fusion: nn.Linear = self.__dict__["_fusion"]
        return fusion.weight[:, : self.global_dim, None, None]

    def forward(self, h_g: torch.Tensor) -> torch.Tensor:
        return F.conv2d(h_g, self.weight)


def _full_precision(layer: nn.Linear | nn.Conv2d | FusionMaps, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` computed in the layer's own dtype (float32 for a float32 model), outside any autocast.

    Without autocast this is exactly ``layer(x)`` (the cast is a no-op), so the float32 path is unchanged.
    """
    if x.device.type not in ("cpu", "cuda"):  # the devices torch.autocast knows in every supported torch
        return layer(x)
    with torch.autocast(x.device.type, enabled=False):
        return layer(x.to(layer.weight.dtype))


def _run_trunk(net: nn.Module, x: torch.Tensor, fine: bool = False) -> torch.Tensor:
    """``net(x)`` for a backbone: a float32 backbone runs as it is (so autocast works as usual); one cast to
    bf16 (:func:`mammogmic.models.fuse.cast_for_bf16`) gets its input in bf16 and returns float32 for the heads.
    ``fine``: the backbone's map on a grid of half its stride (:func:`mammogmic.models.resnet.finer_stage`)."""
    dtype = next(net.parameters()).dtype
    if dtype == torch.float32:
        return net(x, fine=fine)
    return net(x.to(dtype), fine=fine).float()


@dataclass
class GMICOutput:
    """Everything one forward pass produces. Probabilities have columns ``[benign, malignant]``."""

    y_fusion: torch.Tensor  # (N, C)
    y_global: torch.Tensor  # (N, C)
    y_local: torch.Tensor  # (N, C)
    prediction: torch.Tensor  # (N, C), the head chosen by GMICConfig.prediction
    saliency: torch.Tensor  # (N, C, h, w) in [0, 1]
    h_g: torch.Tensor  # (N, D_g, h, w)
    patch_locations: torch.Tensor  # (N, K, 2) int64, upper-left (row, col) in input pixels
    patches: torch.Tensor  # (N, K, crop_h, crop_w), first input channel
    h_crops: torch.Tensor  # (N, K, D_l)
    patch_attention: torch.Tensor  # (N, K), sums to 1
    z: torch.Tensor  # (N, D_l)
    logits_local: torch.Tensor  # (N, C)
    logits_fusion: torch.Tensor  # (N, C)


@dataclass
class BaselineOutput:
    """Output of the whole-image baseline: ``prediction`` (= ``y_fusion``) and its logits."""

    prediction: torch.Tensor  # (N, C)
    logits: torch.Tensor  # (N, C)
    feature_map: torch.Tensor  # (N, D, h, w)

    @property
    def y_fusion(self) -> torch.Tensor:
        return self.prediction


class GatedAttention(nn.Module):
    """Gated attention MIL pooling (Ilse et al. 2018), bias-free as in GMIC.

    ``a_k = w^T (tanh(V h_k) * sigmoid(U h_k))``, ``alpha = softmax_k(a)``, ``z = sum_k alpha_k h_k``.
    """

    def __init__(self, dim: int, hidden: int, uniform: bool = False) -> None:
        super().__init__()
        self.V = nn.Linear(dim, hidden, bias=False)
        self.U = nn.Linear(dim, hidden, bias=False)
        self.w = nn.Linear(hidden, 1, bias=False)
        self.uniform = uniform

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h``: (N, K, D) -> ``z`` (N, D), ``alpha`` (N, K)."""
        if self.uniform:
            alpha = h.new_full(h.shape[:2], 1.0 / h.shape[1])
        else:
            scores = self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))).squeeze(-1)  # (N, K)
            alpha = scores.softmax(dim=1)
        z = torch.bmm(alpha.unsqueeze(1), h).squeeze(1)
        return z, alpha


class GMIC(nn.Module):
    """Globally-aware Multiple Instance Classifier (Shen et al., MedIA 2021).

    Args:
        config: architecture; the default is the released GMIC-ResNet-18.

    Example:
        >>> model = GMIC(GMICConfig(global_width=4, local_width=8, crop_size=(32, 32))).eval()
        >>> out = model(torch.randn(2, 1, 256, 192))
        >>> out.saliency.shape, out.patch_locations.shape
        (torch.Size([2, 2, 4, 3]), torch.Size([2, 6, 2]))
    """

    def __init__(self, config: GMICConfig | None = None) -> None:
        super().__init__()
        cfg = config or GMICConfig()
        self.config = cfg
        if cfg.global_arch == "resnet22":
            self.global_net: ResNet22 | ResNetV1 = ResNet22(cfg.in_channels, cfg.global_width)
        else:
            stride = cfg.global_stride or 32
            self.global_net = ResNetV1(cfg.global_arch, cfg.in_channels, cfg.global_width, stride)
        self.saliency_head: nn.Conv2d | FusionMaps = nn.Conv2d(
            cfg.global_dim, cfg.num_classes, kernel_size=1, bias=False
        )
        # The local network keeps the reference's 3-channel stem: a 1-channel patch is repeated (which also
        # lets ImageNet weights load unchanged); a 3-channel input passes its own 3 channels.
        self.local_net = ResNetV1(cfg.local_arch, 3, cfg.local_width)
        self.attention = GatedAttention(
            cfg.feature_dim, cfg.attention_dim, uniform=cfg.attention == "uniform"
        )
        self.local_classifier = nn.Linear(cfg.feature_dim, cfg.num_classes, bias=False)
        self.fusion = nn.Linear(cfg.global_dim + cfg.feature_dim, cfg.num_classes)
        if cfg.saliency_head == "fusion":  # the own head is built first all the same, so that every other
            # part draws the same initial weights whichever head a seed trains (docs/localization.md's runs)
            self.saliency_head = FusionMaps(self.fusion, cfg.global_dim)

    # -- stages -------------------------------------------------------------------------------------------
    def forward_global(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Global network: ``h_g`` (N, D_g, h, w), saliency (N, C, h, w), ``y_global`` (N, C)."""
        cfg = self.config
        net = self.global_net
        fine = cfg.saliency_grid == "fine_at_inference" and not self.training
        h_g = _run_trunk(net, x, fine)
        logits = _full_precision(self.saliency_head, h_g)
        saliency = torch.sigmoid(logits)
        symmetry = cfg.saliency_symmetry
        if symmetry == "point" or (symmetry.endswith("_at_inference") and not self.training):
            grid_hw = (saliency.shape[2], saliency.shape[3])
            stride = net.stride // 2 if fine else net.stride
            views = [logits]
            for dims in REFLECTIONS[symmetry]:
                mirrored = _run_trunk(net, reflect_on_cells(x, grid_hw, stride, net.cell_origin, dims), fine)
                views.append(_full_precision(self.saliency_head, mirrored).flip(dims))
            if symmetry == "point":
                saliency = (saliency + torch.sigmoid(views[1])) / 2
            else:  # only what every orientation marks (the mirrored breasts lie the way no training image did)
                # the geometric mean of the sigmoids in log space: no underflow to 0, finite gradients
                saliency = torch.exp(torch.stack([F.logsigmoid(v) for v in views]).mean(dim=0))
        t = {"top_t": cfg.percent_t, "gap": 1.0, "gmp": 0.0}[cfg.aggregation]
        y_global = saliency.flatten(2).amax(dim=2) if t == 0.0 else top_t_pool(saliency, t)
        return h_g, saliency, y_global

    def retrieve_rois(self, saliency: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
        """Upper-left pixel positions (N, K, 2) of the K patches to read at full resolution."""
        cfg = self.config
        grid_hw = (saliency.shape[2], saliency.shape[3])
        window = window_on_grid(cfg.crop_size, grid_hw, input_hw)
        with torch.no_grad():
            if cfg.patch_selection == "random":
                grid_pos = random_windows(
                    saliency.shape[0], grid_hw, window, cfg.num_patches, saliency.device
                )
            else:
                grid_pos = greedy_windows(
                    normalize_saliency(saliency), window, cfg.num_patches, cfg.patch_overlap
                )
        centered = cfg.patch_alignment == "centered"
        crop_hw = (int(cfg.crop_size[0]), int(cfg.crop_size[1]))
        return grid_to_pixels(grid_pos, grid_hw, input_hw, centered=centered, crop_hw=crop_hw)

    def forward_local(self, patches: torch.Tensor) -> torch.Tensor:
        """Local network on (N, K, C, ch, cw) patches -> (N, K, D_l) feature vectors, one batched pass."""
        n, k, c = patches.shape[:3]
        flat = patches.reshape(n * k, c, *patches.shape[3:])
        if c == 1 and self.local_net.conv1.in_channels == 3:
            flat = flat.expand(-1, 3, -1, -1)
        features = _run_trunk(self.local_net, flat).mean(dim=(2, 3))
        return features.view(n, k, -1)

    def forward(self, x: torch.Tensor) -> GMICOutput:
        """Run GMIC on a batch ``x`` of standardised images ``(N, in_channels, H, W)``."""
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected input of shape (N, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        input_hw = (x.shape[2], x.shape[3])
        h_g, saliency, y_global = self.forward_global(x)
        locations = self.retrieve_rois(saliency, input_hw)
        patches = crop_patches(x, locations, self.config.crop_size)  # (N, K, C, ch, cw)
        h_crops = self.forward_local(patches)
        z, alpha = self.attention(h_crops)
        logits_local = _full_precision(self.local_classifier, z)
        if self.config.fusion_pooling == "top_t":
            global_vec = top_t_pool(h_g, self.config.percent_t)  # (N, D_g)
        else:
            global_vec = h_g.flatten(2).amax(dim=2)  # (N, D_g)
        logits_fusion = _full_precision(self.fusion, torch.cat([global_vec, z], dim=1))
        y_local, y_fusion = torch.sigmoid(logits_local), torch.sigmoid(logits_fusion)
        heads = {"fusion": y_fusion, "global": y_global, "local": y_local}
        prediction = (
            (y_global + y_local) / 2 if self.config.prediction == "average" else heads[self.config.prediction]
        )
        return GMICOutput(
            y_fusion=y_fusion,
            y_global=y_global,
            y_local=y_local,
            prediction=prediction,
            saliency=saliency,
            h_g=h_g,
            patch_locations=locations,
            patches=patches[:, :, 0],
            h_crops=h_crops,
            patch_attention=alpha,
            z=z,
            logits_local=logits_local,
            logits_fusion=logits_fusion,
        )


class ResNetBaseline(nn.Module):
    """The paper's ResNet-34 baseline: whole full-resolution image -> ResNet -> global pooling -> sigmoid."""

    def __init__(self, config: BaselineConfig | None = None) -> None:
        super().__init__()
        cfg = config or BaselineConfig()
        self.config = cfg
        self.backbone = ResNetV1(cfg.arch, cfg.in_channels, cfg.width)
        self.classifier = nn.Linear(self.backbone.out_channels, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> BaselineOutput:
        features = _run_trunk(self.backbone, x)
        pooled = features.mean(dim=(2, 3)) if self.config.pooling == "gap" else features.amax(dim=(2, 3))
        logits = _full_precision(self.classifier, pooled)
        return BaselineOutput(prediction=torch.sigmoid(logits), logits=logits, feature_map=features)
