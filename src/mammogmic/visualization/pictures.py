"""Pictures of each image as soon as it is predicted (``predict --report`` and ``visualize``).

``figures/<stem>.png`` is the full-size explanation figure (:func:`mammogmic.visualization.figure.gmic_figure`);
with ``report=True`` also ``figures/<stem>.npz``, what the exam report draws of the image
(:class:`mammogmic.visualization.report.ViewData`). Both are written while the run goes on, so the full-size arrays
of an image are released right after it: memory does not grow with the number of images.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from mammogmic._outdir import atomic_write_bytes
from mammogmic.data.preprocessing import needs_flip
from mammogmic.evaluation.outputs import file_stem
from mammogmic.visualization.figure import gmic_figure
from mammogmic.visualization.report import ViewData

if TYPE_CHECKING:
    from mammogmic.evaluation.inference import ImageResult

__all__ = ["ResultPictures"]


class ResultPictures:
    """Writes the pictures of each :class:`~mammogmic.evaluation.inference.ImageResult` into ``fig_dir``.

    Args:
        fig_dir: the ``figures`` folder.
        dpi: resolution of the full-size figure.
        report: also write the report's ``<stem>.npz``.
    """

    def __init__(self, fig_dir: Path, dpi: int = 150, report: bool = False) -> None:
        self.fig_dir = fig_dir
        self.dpi = dpi
        self.report = report
        self.n_written = 0

    def __call__(self, res: ImageResult, input_key: str | None = None, run_key: str | None = None) -> bool:
        """Draw one result (needs its explanation and image); ``False`` when there is nothing to draw."""
        if res.saliency is None or res.image is None or res.patch_locations is None:
            return False
        if res.patch_attention is None or res.crop_size is None:
            return False
        masks = res.masks
        stem = file_stem(res.item.image_id)
        fig = gmic_figure(
            image=res.image,
            saliency=res.saliency,
            patch_locations=res.patch_locations,
            crop_size=res.crop_size,
            patch_attention=res.patch_attention,
            benign_mask=masks[0] if masks is not None else None,
            malignant_mask=masks[1] if masks is not None else None,
            scores={"benign": res.benign, "malignant": res.malignant},
            title=f"{res.item.image_id} ({res.view})",
            mirrored=bool(res.view) and needs_flip(res.view, res.item.horizontal_flip),
        )
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=self.dpi)
        atomic_write_bytes(self.fig_dir / f"{stem}.png", buffer.getvalue())
        if self.report:
            ViewData.from_arrays(
                res.item.image_id,
                res.view,
                res.image,
                res.saliency,
                res.patch_locations,
                res.patch_attention,
                res.crop_size,
                masks=masks,
                input_key=input_key,
                run_key=run_key,
            ).save(self.fig_dir / f"{stem}.npz")
        self.n_written += 1
        return True
