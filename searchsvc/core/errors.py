"""Exceptions that carry a one-line, user-facing cause.

The CLI prints ``str(error)`` of any :class:`SearchsvcError` and exits non-zero, so every
message must name the item (setting, file, product, URL) and the reason on its own.
"""

from __future__ import annotations


class SearchsvcError(Exception):
    """Base for every error the CLI reports without a traceback."""


class ConfigError(SearchsvcError):
    """A setting is missing, malformed or out of range."""


class ImageError(SearchsvcError):
    """An image could not be decoded safely. ``source`` names the file or query."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class CatalogError(SearchsvcError):
    """The catalog as a whole cannot be read (missing root, unreadable metadata file)."""


class ModelError(SearchsvcError):
    """A model file is missing, corrupt or does not match its declared architecture."""


class IndexBackendError(SearchsvcError):
    """The vector index cannot be reached or refused an operation."""


class BrokerError(SearchsvcError):
    """The task broker (Redis) cannot be reached."""


class NotFoundError(SearchsvcError):
    """A referenced row (query id, product id) does not exist."""


class DatabaseError(SearchsvcError):
    """The metadata database cannot be reached, opened or migrated. The message names the
    URL with any password hidden."""
