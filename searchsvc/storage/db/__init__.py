"""Metadata database: the ORM schema (:mod:`searchsvc.storage.db.schema`) and :class:`Database`."""

from searchsvc.storage.db.schema import (
    NAMING_CONVENTION,
    Base,
    Feedback,
    Image,
    ImageStatus,
    IngestRun,
    ModelKind,
    ModelVersion,
    Product,
    QueryLog,
    StoredPixels,
    UTCDateTime,
    utcnow,
)
from searchsvc.storage.db.session import Database, normalize_url, redact_url

__all__ = [
    "NAMING_CONVENTION",
    "Base",
    "Database",
    "Feedback",
    "Image",
    "ImageStatus",
    "IngestRun",
    "ModelKind",
    "ModelVersion",
    "Product",
    "QueryLog",
    "StoredPixels",
    "UTCDateTime",
    "normalize_url",
    "redact_url",
    "utcnow",
]
