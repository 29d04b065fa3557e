"""Project exception types. User-facing errors say which file/field/argument is wrong and why."""

from __future__ import annotations


class MammogmicError(Exception):
    """Base class for errors caused by user input (files, configs, arguments)."""


class ConfigError(MammogmicError, ValueError):
    """A configuration value is invalid. The message names the field."""


class CheckpointError(MammogmicError, ValueError):
    """A checkpoint file cannot be used (unsafe, corrupt, or mismatched keys/shapes)."""


class ImageReadError(MammogmicError, ValueError):
    """An image file cannot be read or is not a usable mammogram. The message names the file."""


class PreprocessingError(MammogmicError, ValueError):
    """Preprocessing failed for one image (e.g. no breast found). The message names the image."""


class ManifestError(MammogmicError, ValueError):
    """A manifest is invalid. The message lists every bad row by line number and reason."""


class MissingExtraError(ImportError):
    """An optional dependency group (a pip "extra") is not installed. The message says which and how.

    Not a :class:`MammogmicError`: the input is fine, the installation lacks a package. The CLI turns it into
    exit code 2.
    """
