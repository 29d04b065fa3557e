"""Synthetic screening mammograms (``mammogmic synth``).

Public API: :class:`SynthConfig`, :func:`generate_exam`, :func:`generate_dataset`.
"""

from __future__ import annotations

from mammogmic.data.synth.config import SynthConfig, parse_density
from mammogmic.data.synth.dataset import generate_dataset
from mammogmic.data.synth.exam import VIEWS, generate_exam

__all__ = ["VIEWS", "SynthConfig", "generate_dataset", "generate_exam", "parse_density"]
