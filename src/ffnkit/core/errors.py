"""One family of exceptions. Every message says what to do; the CLI prints it on one line and exits 2."""

from __future__ import annotations


class FFNKitError(Exception):
    """Base class of every error ffnkit raises on purpose."""


class UnknownModelError(FFNKitError):
    """A model name that is neither built in, a local folder, nor reachable on the hub."""


class UnsupportedArchitectureError(FFNKitError):
    """A model family ffnkit has no adapter for (and the structural fallback found nothing)."""


class LayerIndexError(FFNKitError, IndexError):
    """A layer or neuron index outside the model."""


class CorpusError(FFNKitError):
    """An unknown corpus name, an empty or too-short text."""


class FetchError(FFNKitError):
    """A package or file could not be fetched (no network, unknown package)."""


class InvalidArgumentError(FFNKitError, ValueError):
    """A ratio, site, option or value outside its allowed range."""


class SavedModelError(FFNKitError):
    """A saved folder that is corrupt, incomplete or not written by ffnkit / transformers."""


class ReadOnlyWeightError(InvalidArgumentError):
    """A write through a handle onto a matrix that is not stored as such (a low-rank product, a
    dequantised matrix): the write could not reach the model."""


class StaleHandleError(InvalidArgumentError):
    """An FFN handle used after a structural change that it did not take part in (find_ffns again)."""


class OutputFolderError(FFNKitError):
    """An output folder ffnkit must not write: not empty (without overwrite), the input, the cache, not
    writable, or on a disk without room."""


class RemoteCodeError(FFNKitError):
    """A model that needs its own Python code (``auto_map``) while ``trust_remote_code`` is off."""
