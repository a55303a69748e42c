"""Typed errors.

Every failure a caller can provoke with bad input maps to one of these, so a service can
tell "your request was wrong" (a ``HyperLoRAError``) from "we have a bug" (anything else).
"""

from __future__ import annotations


class HyperLoRAError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInputError(HyperLoRAError, ValueError):
    """A document, prompt, description or argument that cannot be used as given."""


class EmptyDocumentError(InvalidInputError):
    """A document with no usable text (empty or whitespace only)."""


class DocumentTooLargeError(InvalidInputError):
    """A document over the configured size limit."""


class BaseModelMismatchError(HyperLoRAError):
    """An adapter or checkpoint made for a different base model."""


class CheckpointError(HyperLoRAError):
    """A checkpoint or adapter file that is missing, corrupt, unsafe or of the wrong shape."""


class UnsafeFileError(CheckpointError):
    """A file we refuse to open at all: a pickle, or a path escaping its store."""


class AdapterNotFoundError(HyperLoRAError, KeyError):
    """An adapter id or reference that the store did not issue (or not to this namespace)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "adapter not found"


class HypernetworkMissingError(HyperLoRAError):
    """A call that needs a hypernetwork (internalize, generate_skill) on a model loaded without one."""


class MissingDependencyError(HyperLoRAError, ImportError):
    """An optional framework (LangChain, LlamaIndex, ...) that is not installed."""
