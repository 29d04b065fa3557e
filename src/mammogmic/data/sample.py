"""The one path from an image file (or manifest row) to a model input: training, validation, prediction.

Every caller — ``mammogmic train`` (training and validation samples), ``mammogmic predict`` / ``visualize``,
:class:`~mammogmic.data.dataset.MammogramDataset` and the demo — builds its inputs here, so that a model is
applied to exactly the kind of input it was trained on::

    read (PNG / DICOM / cache) -> breast crop -> optimal centre        load_source()   (once per image)
    -> orient -> window of the contract's size around the centre        window_sample() (per window)
       (augmentation: the official position and size noise, window resized back with INTER_CUBIC)
    -> per-image standardisation (the official float32 maths); masks through the same geometry

Heat-map channels (DMV-CNN's patch-classifier maps, ``mammogmic heatmaps``): a model whose contract says
``heatmaps`` gets ``(3, H, W)`` inputs, the image then its benign and malignant maps, cut and resized with the
image and not standardised (:func:`window_sample`). A row's maps come from its ``heatmap_path`` (a manifest
column, or :func:`attach_heatmaps` for a folder of ``mammogmic heatmaps`` outputs). GMIC with ``in_channels: 3``
and DMV-CNN's image + heat-maps models both take this path.

DMV-CNN (the GMIC paper's comparison model) takes the same path with its own windows per view angle
(:func:`dmv_contracts`: the official 2677x1942 and 2974x1748 windows, scaled with the contract's input size)
and the four views of an exam drawn together (:func:`dmv_exam_passes`).

Where a model input lies in its source image (crop offset, mirroring, window, resize) is an
:class:`InputGeometry` (:func:`input_geometry`): the one map from model-input coordinates back to source pixels
(``mammogmic predict --dicom-out`` places patches and saliency maps on the source DICOM with it).

What a trained model depends on in that path is its :class:`InputContract` (input size, window size, crop
morphology, VOI handling, augmentation noise, TTA default, class order). The trainer stores it in the model
file; ``predict`` reads it back from there (:func:`mammogmic.models.read_model_metadata`).

Rows without a preprocess cache (``cached_path`` + ``best_center``) are cropped and centred on the fly, so a
manifest works with or without ``mammogmic preprocess``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mammogmic.data.io import read_image, read_mask
from mammogmic.data.preprocessing import (
    MODEL_INPUT_SHAPE,
    VIEWS,
    CropNoise,
    Window,
    best_center,
    crop_breast,
    model_input,
    needs_flip,
    orient,
    parse_view,
    sample_window,
    scaled_train_noise,
    standardize,
)
from mammogmic.errors import ImageReadError, MammogmicError, PreprocessingError

__all__ = [
    "DMV_CONTRACTS",
    "DMV_WINDOWS",
    "HEATMAP_ARRAYS",
    "OFFICIAL_CONTRACT",
    "ImageItem",
    "InputContract",
    "InputGeometry",
    "SampleError",
    "Source",
    "attach_heatmaps",
    "breast_labels",
    "demo_contract",
    "dmv_contract",
    "dmv_contracts",
    "dmv_exam_passes",
    "dmv_exam_windows",
    "heatmap_file",
    "heatmap_input",
    "input_geometry",
    "items_from_manifest",
    "load_source",
    "read_heatmaps",
    "scaled_crop_settings",
    "tta_rng",
    "window_sample",
    "window_samples",
]

#: Erosion/dilation iterations and buffer of the official crop, tuned for full-field mammograms.
_OFFICIAL_ITERATIONS, _OFFICIAL_BUFFER = 100, 50


def scaled_crop_settings(height: int) -> tuple[int, int]:
    """Crop ``(iterations, buffer)`` for images of ``height`` rows: the official 100/50 scaled from 2944 rows.

    The official morphology (100 erosions) erases a whole breast at demo sizes such as 512x320; scaling it
    keeps the same relative margin. Full-size images keep the official values.
    """
    scale = min(1.0, height / MODEL_INPUT_SHAPE[0])
    return max(1, round(_OFFICIAL_ITERATIONS * scale)), max(1, round(_OFFICIAL_BUFFER * scale))


@dataclass(frozen=True)
class InputContract:
    """Everything between a file and the model input that a trained model depends on.

    Attributes:
        input_shape: model input ``(height, width)``.
        window_shape: window cut around the optimal centre, in source pixels; resized to ``input_shape``
            when different (``None``: the input shape, the official behaviour).
        crop_iterations: erosion/dilation iterations of the breast crop (official 100).
        crop_buffer: crop margin in pixels (official 50).
        apply_voi: apply the DICOM VOI LUT / window when reading DICOM files.
        max_crop_noise: augmentation: maximal window shift (rows, cols) in source pixels.
        max_crop_size_noise: augmentation: maximal change of each window border in source pixels.
        tta: default number of test-time windows (1: the deterministic window only).
        class_order: meaning of the model's output columns.
        heatmaps: the model takes the benign and malignant heat maps as two more input channels (image,
            benign, malignant). Written to a model file only when true, so the contract of an image-only
            model reads as it did before the field existed.
    """

    input_shape: tuple[int, int] = MODEL_INPUT_SHAPE
    window_shape: tuple[int, int] | None = None
    crop_iterations: int = _OFFICIAL_ITERATIONS
    crop_buffer: int = _OFFICIAL_BUFFER
    apply_voi: bool = True
    max_crop_noise: tuple[int, int] = (100, 100)
    max_crop_size_noise: int = 100
    tta: int = 1
    class_order: tuple[str, str] = ("benign", "malignant")
    heatmaps: bool = False

    def __post_init__(self) -> None:
        def pair(name: str, value: Any, low: int) -> tuple[int, int]:
            try:
                a, b = (int(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"input contract: {name} must be two integers, got {value!r}") from None
            if a < low or b < low:
                raise ValueError(f"input contract: {name} must be >= {low}, got {value!r}")
            return a, b

        object.__setattr__(self, "input_shape", pair("input_shape", self.input_shape, 32))
        if self.window_shape is not None:
            object.__setattr__(self, "window_shape", pair("window_shape", self.window_shape, 32))
        object.__setattr__(self, "max_crop_noise", pair("max_crop_noise", self.max_crop_noise, 0))
        for name in ("crop_iterations", "crop_buffer", "max_crop_size_noise", "tta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "tta" else 0):
                raise ValueError(f"input contract: {name} must be a non-negative integer, got {value!r}")
        if tuple(self.class_order) != ("benign", "malignant"):
            raise ValueError(f"input contract: class_order {self.class_order!r} is not (benign, malignant)")
        object.__setattr__(self, "class_order", tuple(self.class_order))
        if not isinstance(self.heatmaps, bool):
            raise ValueError(f"input contract: heatmaps must be true or false, got {self.heatmaps!r}")

    @property
    def channels(self) -> int:
        """Input channels: 1 (image), 3 with heat maps."""
        return 3 if self.heatmaps else 1

    @property
    def window(self) -> tuple[int, int]:
        """The window size in source pixels."""
        return self.window_shape or self.input_shape

    @property
    def noise(self) -> CropNoise:
        """The augmentation noise (training windows and TTA)."""
        return CropNoise(self.max_crop_noise, self.max_crop_size_noise)

    def _fields(self) -> dict[str, Any]:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (stored in model files)."""
        out = self._fields()
        if not self.heatmaps:
            del out["heatmaps"]  # image-only contracts keep the form (and run keys) they had before the field
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputContract:
        """The contract stored by :meth:`to_dict`; unknown keys are refused (a newer file format)."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"input contract: unknown field(s) {unknown}")
        values = dict(data)
        for key in ("input_shape", "window_shape", "max_crop_noise", "class_order"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    def differences(self, other: InputContract) -> list[tuple[str, Any, Any]]:
        """``(field, self's value, other's value)`` for every field where the two disagree."""
        mine, theirs = self._fields(), other._fields()
        return [(k, mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]]


#: The official release's inference pipeline (2944x1920 windows, 100 crop iterations, no TTA).
OFFICIAL_CONTRACT = InputContract()

#: DMV-CNN's official input windows per view angle, for the official 2944x1920 input size.
DMV_WINDOWS: dict[str, tuple[int, int]] = {"CC": (2677, 1942), "MLO": (2974, 1748)}


def dmv_contracts(base: InputContract = OFFICIAL_CONTRACT) -> dict[str, InputContract]:
    """DMV-CNN's window contract per view angle for a run whose (GMIC-sized) contract is ``base``.

    The crop and the optimal centre are ``base``'s (:func:`load_source`: the centre is found for ``base``'s
    window, as in the official DMV-CNN runs, whose centre comes from GMIC's 2944x1920 stage); around it each
    view angle cuts DMV-CNN's window, :data:`DMV_WINDOWS` scaled by ``base``'s size over 2944x1920 (exactly
    the official windows for :data:`OFFICIAL_CONTRACT`), with ``base``'s noise and heat-map channels.
    """

    def scaled(shape: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
        return (
            max(32, round(shape[0] * size[0] / MODEL_INPUT_SHAPE[0])),
            max(32, round(shape[1] * size[1] / MODEL_INPUT_SHAPE[1])),
        )

    out = {}
    for angle, window in DMV_WINDOWS.items():
        out[angle] = replace(
            base,
            input_shape=scaled(window, base.input_shape),
            window_shape=None if base.window_shape is None else scaled(window, base.window_shape),
        )
    return out


#: DMV-CNN's official pipeline: the same crop and centre stages as GMIC's, windows of the official DMV-CNN
#: input sizes per view angle (CC 2677x1942, MLO 2974x1748), the same augmentation noise.
DMV_CONTRACTS: dict[str, InputContract] = dmv_contracts(OFFICIAL_CONTRACT)


def dmv_contract(view: str, contracts: Mapping[str, InputContract] = DMV_CONTRACTS) -> InputContract:
    """DMV-CNN's contract for ``view`` (``"L-CC"`` etc.) among ``contracts`` (default the official ones)."""
    return contracts[parse_view(view)[1]]


def demo_contract(input_shape: tuple[int, int]) -> InputContract:
    """A contract for reduced-size images whose window is the whole input: crop and noise scaled to the size."""
    iterations, buffer = scaled_crop_settings(input_shape[0])
    noise = scaled_train_noise(input_shape)
    return InputContract(
        input_shape=input_shape,
        crop_iterations=iterations,
        crop_buffer=buffer,
        max_crop_noise=noise.max_crop_noise,
        max_crop_size_noise=noise.max_crop_size_noise,
    )


@dataclass
class ImageItem:
    """One image with whatever is known about it (from a manifest, DICOM tags or its file name)."""

    image_id: str
    path: Path
    view: str | None = None  # "L-CC" style; read from the file (tags or name) when None
    horizontal_flip: str = "NO"
    exam_id: str | None = None
    patient_id: str | None = None
    breast_id: str | None = None
    benign_label: float = math.nan
    malignant_label: float = math.nan
    breast_benign_label: float = math.nan
    breast_malignant_label: float = math.nan
    cached_path: Path | None = None
    best_center: tuple[int, int] | None = None
    window_location: tuple[int, int, int, int] | None = None  # crop box of the cache in the raw image
    benign_mask_path: Path | None = None
    malignant_mask_path: Path | None = None
    cached_benign_mask_path: Path | None = None  # masks already cropped by ``mammogmic preprocess``
    cached_malignant_mask_path: Path | None = None
    heatmap_path: Path | None = None  # ``.npz`` of ``mammogmic heatmaps`` (benign and malignant maps)
    extra: dict[str, str] = field(default_factory=dict)

    def labels(self, level: str = "image") -> tuple[float, float]:
        """``(benign, malignant)`` at ``image`` or ``breast`` level (NaN = unknown)."""
        if level == "image":
            return self.benign_label, self.malignant_label
        if level == "breast":
            return self.breast_benign_label, self.breast_malignant_label
        raise ValueError(f"label level must be 'image' or 'breast', got {level!r}")

    @property
    def has_masks(self) -> bool:
        return any(
            p is not None
            for p in (
                self.benign_mask_path,
                self.malignant_mask_path,
                self.cached_benign_mask_path,
                self.cached_malignant_mask_path,
            )
        )


def items_from_manifest(manifest: Any, split: str | None = None) -> list[ImageItem]:
    """Items of a manifest (a path or a :class:`~mammogmic.data.manifest.Manifest`), optionally one split.

    Labels and masks are kept; rows written by ``mammogmic preprocess`` (``cached_path`` + ``best_center``)
    load the cached crop and skip the crop and centre stages. A ``heatmap_path`` column (an ``.npz`` of
    ``mammogmic heatmaps``, relative to the manifest's folder like every path) gives the row's heat maps.

    Raises:
        ManifestError: unreadable manifest or bad rows (all listed by line).
    """
    from mammogmic.data.manifest import Manifest, load_manifest

    table = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    if split is not None:
        table = table.filter(split=split)

    def label(value: int | None) -> float:
        return math.nan if value is None else float(value)

    items = []
    for row in table:
        cached = row.preprocessed
        window = row.window_location
        items.append(
            ImageItem(
                image_id=row.image_id,
                path=table.resolve(row.image_path) or table.root,
                view=row.full_view,
                horizontal_flip=row.horizontal_flip,
                exam_id=row.exam_id,
                patient_id=row.patient_id,
                breast_id=row.breast_id or f"{row.exam_id}_{row.laterality}",
                benign_label=label(row.benign_label),
                malignant_label=label(row.malignant_label),
                breast_benign_label=label(row.breast_benign_label),
                breast_malignant_label=label(row.breast_malignant_label),
                cached_path=table.resolve(row.cached_path) if cached else None,
                best_center=(int(row.best_center[0]), int(row.best_center[1]))
                if cached and row.best_center
                else None,
                window_location=(
                    (int(window[0]), int(window[1]), int(window[2]), int(window[3]))
                    if cached and window
                    else None
                ),
                benign_mask_path=table.resolve(row.benign_mask_path),
                malignant_mask_path=table.resolve(row.malignant_mask_path),
                cached_benign_mask_path=table.resolve(row.extra.get("cached_benign_mask_path"))
                if cached
                else None,
                cached_malignant_mask_path=(
                    table.resolve(row.extra.get("cached_malignant_mask_path")) if cached else None
                ),
                heatmap_path=table.resolve(row.extra.get("heatmap_path") or None),
                extra=dict(row.extra),
            )
        )
    return items


def heatmap_file(folder: Path, image_id: str) -> Path:
    """Where ``mammogmic heatmaps --out folder`` writes (and predict and training read) an image's heat maps."""
    from mammogmic.evaluation.outputs import file_stem  # the one id -> file-name rule (evaluation imports us)

    return Path(folder) / f"{file_stem(image_id)}.npz"


def attach_heatmaps(items: Sequence[ImageItem], folder: Path | None) -> None:
    """Give every item without a ``heatmap_path`` its file in ``folder`` (:func:`heatmap_file`); a row's own
    ``heatmap_path`` column wins. ``folder=None`` changes nothing."""
    if folder is None:
        return
    for item in items:
        if item.heatmap_path is None:
            item.heatmap_path = heatmap_file(folder, item.image_id)


def breast_labels(views: Sequence[ImageItem]) -> tuple[float, float]:
    """``(benign, malignant)`` label of the breast these images show: the maximum of their known breast-level
    labels, else of their image labels (NaN when none is known)."""
    out = []
    for kind in ("benign", "malignant"):
        known = [x for x in (getattr(v, f"breast_{kind}_label") for v in views) if not math.isnan(x)]
        if not known:
            known = [x for x in (getattr(v, f"{kind}_label") for v in views) if not math.isnan(x)]
        out.append(max(known) if known else math.nan)
    return out[0], out[1]


@dataclass
class Source:
    """An image after reading, cropping and centring: what every window of it is cut from.

    Attributes:
        cropped: raw-orientation cropped pixels (the preprocess cache's content).
        view: ``"L-CC"`` etc.
        horizontal_flip: the manifest's flag (``NO``: right views are mirrored to face right).
        center: optimal centre ``(row, col)`` in the oriented cropped image.
        masks: raw-orientation cropped ``(benign, malignant)`` masks, when asked and the item has any.
        heatmaps: raw-orientation ``(2, H, W)`` benign and malignant heat maps of the cropped image (the
            extra input channels of heat-map models; :func:`read_heatmaps`).
        crop_box: ``(top, bottom, left, right)`` of ``cropped`` in the source image, ends exclusive (``None``:
            a preprocess cache whose manifest row has no ``window_location``).
    """

    cropped: np.ndarray
    view: str
    horizontal_flip: str
    center: tuple[int, int]
    masks: list[np.ndarray] | None = None
    heatmaps: np.ndarray | None = None
    crop_box: tuple[int, int, int, int] | None = None


def _read_cached(path: Path) -> np.ndarray:
    """A cached crop or mask: ``.npy`` from ``mammogmic preprocess`` (never unpickled) or an image file."""
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ImageReadError(
                f"{path}: unreadable cache file ({exc}); rerun mammogmic preprocess"
            ) from exc
        if array.ndim != 2:
            raise ImageReadError(f"{path}: cache array has shape {array.shape}, expected 2-D")
        return np.asarray(array)
    return read_image(path)[0]


def _no_breast_hint(exc: PreprocessingError, shape: tuple[int, ...], contract: InputContract) -> str:
    iterations, buffer = scaled_crop_settings(int(shape[0]))
    message = str(exc)
    if iterations < contract.crop_iterations and "erosion" in message:
        message += (
            f" ({contract.crop_iterations} erosion iterations on a {shape[0]}x{shape[1]} image; for images "
            f"smaller than full-field mammograms use {iterations}: predict --crop-iterations {iterations}, "
            f"train --set data.crop_iterations={iterations})"
        )
    return message


class SampleError(MammogmicError):
    """An image that cannot become a model input; ``stage`` says where (read, crop, center, masks)."""

    def __init__(self, message: str, stage: str) -> None:
        super().__init__(message)
        self.stage = stage


def load_source(
    item: ImageItem, contract: InputContract, *, masks: bool = False, heatmaps: bool | None = None
) -> Source:
    """Read, crop and centre ``item`` (or load its preprocess cache).

    Args:
        item: the image.
        contract: crop and centre settings (the centre is found for its window).
        masks: also load the lesion masks, when the item has any.
        heatmaps: also read the item's heat maps (``heatmap_path``); ``None``: when ``contract.heatmaps``.

    Raises:
        SampleError: naming the file, with the stage that failed (``heatmaps``: no heat-map file for the
            item, or a bad one).
    """
    if heatmaps is None:
        heatmaps = contract.heatmaps
    stage = "read"
    try:
        if item.cached_path is not None and item.best_center is not None:
            cropped = _read_cached(item.cached_path)
            if item.view is None:
                raise MammogmicError(
                    f"{item.cached_path}: cached image without laterality/view in the manifest"
                )
            view, center, crop_box = item.view, item.best_center, item.window_location
        else:
            pixels, meta = read_image(item.path, apply_voi=contract.apply_voi)
            view = item.view or meta.full_view
            stage = "crop"
            try:
                crop = crop_breast(
                    pixels,
                    view,
                    item.horizontal_flip,
                    iterations=contract.crop_iterations,
                    buffer_size=contract.crop_buffer,
                )
            except PreprocessingError as exc:
                raise PreprocessingError(_no_breast_hint(exc, pixels.shape, contract)) from exc
            cropped = crop.cropped
            stage = "center"
            center = best_center(crop, horizontal_flip=item.horizontal_flip, window_shape=contract.window)
            crop_box = crop.window_location
        source = Source(
            cropped,
            view,
            item.horizontal_flip,
            (int(center[0]), int(center[1])),
            crop_box=_crop_box(crop_box, cropped.shape),
        )
        if masks and item.has_masks:
            stage = "masks"
            source.masks = _load_masks(item, cropped.shape, crop_box)
        if heatmaps:
            stage = "heatmaps"
            if item.heatmap_path is None:
                raise MammogmicError(
                    f"{item.path}: no heat maps for this image, and the model takes them as input channels: "
                    "give a heat-map folder made by mammogmic heatmaps (predict --heatmaps DIR, train "
                    "data.heatmaps_dir) or a heatmap_path manifest column"
                )
            source.heatmaps = read_heatmaps(item.heatmap_path, cropped.shape)
        return source
    except (MammogmicError, OSError, ValueError) as exc:
        message = str(exc)
        if str(item.path) not in message and not (item.cached_path and str(item.cached_path) in message):
            message = f"{item.path}: {message}"  # every error names the file it is about
        raise SampleError(message, stage) from exc


def _crop_box(box: Sequence[int] | None, shape: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    """``box`` as ints when it describes a crop of ``shape`` (a manifest's window_location may not match an
    edited cache: then where the crop lies is unknown)."""
    if box is None:
        return None
    top, bottom, left, right = (int(v) for v in box)
    return (top, bottom, left, right) if (bottom - top, right - left) == tuple(shape[:2]) else None


def _load_masks(
    item: ImageItem, shape: tuple[int, ...], crop_box: tuple[int, int, int, int] | None
) -> list[np.ndarray]:
    out = []
    for cached_mask, raw_mask in (
        (item.cached_benign_mask_path, item.benign_mask_path),
        (item.cached_malignant_mask_path, item.malignant_mask_path),
    ):
        if cached_mask is not None:
            mask = _read_cached(cached_mask) != 0
        elif raw_mask is not None:
            mask = read_mask(raw_mask)
            if crop_box is None:
                raise MammogmicError(
                    f"{raw_mask}: cannot align the mask: the manifest has no window_location"
                )
            top, bottom, left, right = crop_box  # raw-image coordinates: crop like the image
            mask = mask[top:bottom, left:right]
        else:
            mask = np.zeros(shape, dtype=bool)
        if mask.shape != tuple(shape):
            path = cached_mask or raw_mask
            raise MammogmicError(
                f"{path}: mask does not cover the image (after cropping {mask.shape} vs {tuple(shape)})"
            )
        out.append(mask)
    return out


def place_window(source: Source, contract: InputContract, *, rng: Any = None) -> Window:
    """Where the model-input window of ``source`` lies (:func:`~mammogmic.data.preprocessing.sample_window`):
    the deterministic official window, or with ``rng`` (a numpy ``Generator``, or a ``RandomState`` for the
    official DMV-CNN draws) one carrying the contract's augmentation noise."""
    return sample_window(
        source.cropped.shape,
        source.view,
        source.center,
        rng=rng,
        noise=contract.noise if rng is not None else None,
        window_shape=contract.window,
    )


def window_sample(
    source: Source,
    contract: InputContract,
    *,
    rng: Any = None,
    window: Window | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One model input ``(C, H, W)`` float32 and its masks ``(2, H, W)`` uint8 (or ``None``).

    Channel 0 is the standardised image; when the source has heat maps, channels 1 and 2 are its benign and
    malignant maps through the same window and resize, not standardised. With ``rng`` the window carries the
    contract's augmentation noise (training, TTA; :func:`place_window`); without, it is the deterministic
    official window. ``window`` (from :func:`place_window`) gives the window instead.
    """
    if contract.heatmaps and source.heatmaps is None:
        raise ValueError("the input contract takes heat-map channels, but the source has no heat maps")
    if window is None:
        window = place_window(source, contract, rng=rng)
    out = model_input(
        source.cropped,
        source.view,
        source.center,
        out_shape=contract.input_shape,
        horizontal_flip=source.horizontal_flip,
        masks=source.masks,
        auxiliary=None if source.heatmaps is None else list(source.heatmaps),
        window=window,
    )
    image, masks = out if source.masks is not None else (out, None)
    return (image if image.ndim == 3 else image[None]), masks


def tta_rng(seed: int, image_id: str) -> np.random.Generator:
    """The TTA generator of one image: depends on the seed and the id only, not on batch or worker."""
    return np.random.default_rng([seed, zlib.crc32(image_id.encode("utf-8"))])


def _windows(source: Source, contract: InputContract, tta: int, seed: int, image_id: str) -> Iterator[Window]:
    """The windows of :func:`window_samples`, in order: the deterministic one, or ``tta`` noisy ones."""
    if tta <= 1:
        yield place_window(source, contract)
        return
    rng = tta_rng(seed, image_id)
    for _ in range(tta):
        yield place_window(source, contract, rng=rng)


def window_samples(
    source: Source, contract: InputContract, tta: int, seed: int, image_id: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(T, C, H, W)`` inputs: the deterministic window (``tta <= 1``) or ``tta`` noisy windows; masks of the
    first."""
    windows, first_masks = [], None
    for t, window in enumerate(_windows(source, contract, tta, seed, image_id)):
        image, masks = window_sample(source, contract, window=window)
        windows.append(image)
        if t == 0:
            first_masks = masks
    return np.stack(windows), first_masks


@dataclass(frozen=True)
class InputGeometry:
    """Where a model input lies in its source image: the one map between model-input and source pixels.

    The data path takes the source image through: crop (``crop_box``) -> mirror left-right (``mirrored``: the
    breast must face right) -> zero rows added on top (``pad_top``) -> window (``window``, in the padded image)
    -> resize to ``input_shape``. :meth:`to_source` undoes it, :meth:`to_input` does it.

    Coordinates are continuous ``(row, col)`` with pixel edges at integers: pixel ``(0, 0)`` covers
    ``[0, 1) x [0, 1)`` and its centre is ``(0.5, 0.5)`` (DICOM SCOORD's convention, which lists
    ``(col, row)``). Resizing maps edges to edges (OpenCV's pixel-centre alignment).

    Attributes:
        crop_box: ``(top, bottom, left, right)`` of the cropped image in the source image, ends exclusive.
        mirrored: whether the cropped image was mirrored left-right before windowing.
        pad_top: zero rows added above the (oriented) cropped image.
        window: ``(top, bottom, left, right)`` of the window in the padded image, ends exclusive.
        input_shape: the model input ``(height, width)``.
    """

    crop_box: tuple[int, int, int, int]
    mirrored: bool
    pad_top: int
    window: tuple[int, int, int, int]
    input_shape: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        """Source pixels per input pixel ``(rows, cols)`` (window size / input size)."""
        top, bottom, left, right = self.window
        return (bottom - top) / self.input_shape[0], (right - left) / self.input_shape[1]

    def to_source(self, points: Any) -> np.ndarray:
        """Model-input ``(..., 2)`` ``(row, col)`` positions -> source-image positions (float64)."""
        p = np.asarray(points, dtype=np.float64)
        scale_r, scale_c = self.scale
        row = p[..., 0] * scale_r + (self.window[0] - self.pad_top)  # oriented cropped image
        col = p[..., 1] * scale_c + self.window[2]
        if self.mirrored:
            col = (self.crop_box[3] - self.crop_box[2]) - col
        return np.stack([row + self.crop_box[0], col + self.crop_box[2]], axis=-1)

    def to_input(self, points: Any) -> np.ndarray:
        """Source-image ``(..., 2)`` ``(row, col)`` positions -> model-input positions (the inverse of
        :meth:`to_source`)."""
        p = np.asarray(points, dtype=np.float64)
        scale_r, scale_c = self.scale
        row = p[..., 0] - self.crop_box[0]
        col = p[..., 1] - self.crop_box[2]
        if self.mirrored:
            col = (self.crop_box[3] - self.crop_box[2]) - col
        row = (row - (self.window[0] - self.pad_top)) / scale_r
        col = (col - self.window[2]) / scale_c
        return np.stack([row, col], axis=-1)

    def box_to_source(
        self, top_left: Sequence[float], size: Sequence[float]
    ) -> tuple[float, float, float, float]:
        """A model-input box (upper-left ``(row, col)`` and ``(height, width)``) as ``(top, bottom, left,
        right)`` in the source image (mirroring swaps its left and right edges back)."""
        r0, c0 = float(top_left[0]), float(top_left[1])
        corners = self.to_source([[r0, c0], [r0 + float(size[0]), c0 + float(size[1])]])
        rows, cols = sorted(corners[:, 0]), sorted(corners[:, 1])
        return rows[0], rows[1], cols[0], cols[1]

    def maps_to_source(self, maps: np.ndarray, source_shape: Sequence[int]) -> np.ndarray:
        """Maps over the model input (``(C, h, w)``, any resolution: GMIC's saliency is ``h x w`` cells over
        the ``H x W`` input) resampled onto the source pixel grid: ``(C, rows, cols)`` float32.

        Bilinear between cell centres (as ``cv2.resize`` upsamples), nearest value past the outer cell
        centres; zero wherever the model saw no source pixel (outside the window or outside the crop).
        """
        maps = np.asarray(maps, dtype=np.float32)
        if maps.ndim != 3:
            raise ValueError(f"maps must be (C, h, w), got shape {maps.shape}")
        n_rows, n_cols = int(source_shape[0]), int(source_shape[1])
        top, bottom, left, right = self.crop_box
        if not (0 <= top < bottom <= n_rows and 0 <= left < right <= n_cols):
            raise ValueError(f"the crop box {self.crop_box} does not fit in a {n_rows}x{n_cols} source image")
        centres_r = np.arange(n_rows, dtype=np.float64) + 0.5
        centres_c = np.arange(n_cols, dtype=np.float64) + 0.5
        # The map is axis-aligned: input rows depend on source rows only, input columns on source columns.
        in_r = self.to_input(np.stack([centres_r, np.zeros(n_rows)], axis=-1))[:, 0]
        in_c = self.to_input(np.stack([np.zeros(n_cols), centres_c], axis=-1))[:, 1]
        h, w = maps.shape[1:]
        weights_r = _linear_weights(in_r * (h / self.input_shape[0]) - 0.5, h)
        weights_c = _linear_weights(in_c * (w / self.input_shape[1]) - 0.5, w)
        seen_r = (in_r >= 0) & (in_r < self.input_shape[0]) & (centres_r >= top) & (centres_r < bottom)
        seen_c = (in_c >= 0) & (in_c < self.input_shape[1]) & (centres_c >= left) & (centres_c < right)
        weights_r[~seen_r] = 0
        weights_c[~seen_c] = 0
        out = np.einsum("rh,chw,qw->crq", weights_r, maps, weights_c, optimize=True)
        return np.ascontiguousarray(out, dtype=np.float32)


def _linear_weights(positions: np.ndarray, size: int) -> np.ndarray:
    """``(len(positions), size)`` linear-interpolation weights of cell-centre ``positions`` (clamped)."""
    pos = np.clip(positions, 0.0, size - 1.0)
    low = np.floor(pos).astype(np.int64)
    high = np.minimum(low + 1, size - 1)
    frac = (pos - low).astype(np.float32)
    weights = np.zeros((len(pos), size), dtype=np.float32)
    rows = np.arange(len(pos))
    np.add.at(weights, (rows, low), 1.0 - frac)
    np.add.at(weights, (rows, high), frac)
    return weights


def input_geometry(
    source: Source, contract: InputContract, tta: int = 1, seed: int = 0, image_id: str = ""
) -> InputGeometry | None:
    """The :class:`InputGeometry` of the first input :func:`window_samples` builds with the same arguments
    (the one predict's explanations come from); ``None`` when the source's crop box is unknown."""
    if source.crop_box is None:
        return None
    window = next(_windows(source, contract, tta, seed, image_id))
    return InputGeometry(
        crop_box=source.crop_box,
        mirrored=needs_flip(source.view, source.horizontal_flip),
        pad_top=window.pad_top,
        window=window.borders,
        input_shape=contract.input_shape,
    )


# --------------------------------------------------------------------------------------------------
# Heat maps and DMV-CNN

#: Arrays of a heat-map file (``mammogmic heatmaps``): float32, the cropped image's size and orientation.
HEATMAP_ARRAYS = ("benign", "malignant")


def heatmap_input(cropped: np.ndarray, view: str, horizontal_flip: str = "NO") -> np.ndarray:
    """The image DMV-CNN's patch classifier sees (heat maps are made from its patches, and the classifier is
    trained on them): ``cropped`` facing right, float32, standardised over all its pixels."""
    image = np.array(orient(np.asarray(cropped), view, horizontal_flip), dtype=np.float32, order="C")
    return standardize(image)


def read_heatmaps(path: Path, shape: Sequence[int]) -> np.ndarray:
    """The ``(2, H, W)`` float32 benign and malignant heat maps of ``path`` (an ``.npz`` from
    ``mammogmic heatmaps``, never unpickled), checked against the cropped image's ``shape``.

    Raises:
        SampleError: missing or unreadable file, missing arrays, wrong shape or non-finite values (stage
            ``heatmaps``).
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in HEATMAP_ARRAYS if k not in data.files]
            if missing:
                raise SampleError(
                    f"{path}: heat-map file without array(s) {', '.join(missing)} (has {', '.join(data.files)})",
                    "heatmaps",
                )
            maps = np.stack([np.asarray(data[k], dtype=np.float32) for k in HEATMAP_ARRAYS])
    except (OSError, ValueError) as exc:
        raise SampleError(f"{path}: unreadable heat-map file ({exc})", "heatmaps") from exc
    if maps.shape[1:] != tuple(shape):
        raise SampleError(
            f"{path}: heat maps of shape {maps.shape[1:]}, but the cropped image is {tuple(shape)}; "
            f"were they made for this image and crop?",
            "heatmaps",
        )
    if not np.isfinite(maps).all():
        raise SampleError(f"{path}: heat maps contain NaN or infinite values", "heatmaps")
    return maps


def dmv_exam_passes(
    sources: Mapping[str, Source],
    tta: int = 1,
    rng: Any = None,
    contracts: Mapping[str, InputContract] = DMV_CONTRACTS,
) -> Iterator[dict[str, np.ndarray]]:
    """DMV-CNN inputs of one exam, one pass at a time: ``{view: (C, H, W)}`` for the four views, each under
    its angle's contract in ``contracts`` (:func:`dmv_contracts`; default the official windows).

    ``tta <= 1``: one pass of deterministic windows. Otherwise ``tta`` passes of noisy windows drawn from
    ``rng`` in the official order: pass by pass, and within a pass L-CC, R-CC, L-MLO, R-MLO. Seeded with
    ``numpy.random.RandomState(seed)`` this replays the official ``--use-augmentation --num-epochs tta`` run
    of a one-exam list.
    """
    missing = [v for v in VIEWS if v not in sources]
    if missing:
        raise ValueError(f"DMV-CNN needs all four views; missing {', '.join(missing)}")
    if tta > 1 and rng is None:
        raise ValueError("TTA windows need a random generator")
    for _ in range(max(tta, 1)):
        noise_rng = rng if tta > 1 else None
        yield {
            view: window_sample(sources[view], dmv_contract(view, contracts), rng=noise_rng)[0]
            for view in VIEWS
        }


def dmv_exam_windows(
    sources: Mapping[str, Source],
    tta: int = 1,
    rng: Any = None,
    contracts: Mapping[str, InputContract] = DMV_CONTRACTS,
) -> dict[str, np.ndarray]:
    """All passes of :func:`dmv_exam_passes` stacked: ``{view: (T, C, H, W)}``."""
    passes = list(dmv_exam_passes(sources, tta, rng, contracts))
    return {view: np.stack([p[view] for p in passes]) for view in VIEWS}
