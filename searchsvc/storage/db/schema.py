"""The metadata schema: SQLAlchemy 2 typed ORM. Alembic migrations in ``migrations/`` build
exactly this schema (a test compares them)."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Explicit constraint names so that migrations are identical on SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class ImageStatus(enum.StrEnum):
    PENDING = "pending"  # registered, not yet embedded by the active embedder
    INDEXED = "indexed"  # its vector is in the active collection
    FAILED = "failed"  # could not be decoded or embedded; ``error`` says why
    REMOVED = "removed"  # gone from the catalog (``ingest --sync``); point deleted


class ModelKind(enum.StrEnum):
    EMBEDDER = "embedder"
    STIR = "stir"


def _enum_values(enum_cls: type[enum.Enum]) -> list[str]:
    """Persist an enum by its value (``"pending"``), not its Python name (``"PENDING"``)."""
    return [str(member.value) for member in enum_cls]


class UTCDateTime(TypeDecorator[dt.datetime]):
    """``TIMESTAMP WITH TIME ZONE`` that always returns aware UTC datetimes.

    PostgreSQL returns aware values by itself; SQLite stores the text without an offset and
    would hand back naive datetimes (which cannot be compared with ``utcnow()``). Values
    are converted to UTC on the way in (naive ones are taken as UTC) and marked UTC on the
    way out, so both databases behave alike.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


_TZ = UTCDateTime()


class Product(Base):
    __tablename__ = "products"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    title: Mapped[str | None] = mapped_column(Text)
    category: Mapped[str | None] = mapped_column(String(255), index=True)
    price: Mapped[float | None] = mapped_column(Float)
    url: Mapped[str | None] = mapped_column(Text)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    removed: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen_run_id: Mapped[int | None] = mapped_column(Integer)
    """The last ingest run that found this product in the catalog (``--sync`` removes the
    rest without holding the whole catalog in memory)."""
    created_at: Mapped[dt.datetime] = mapped_column(_TZ, default=utcnow, server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(_TZ, default=utcnow, onupdate=utcnow)

    # The database cascades the delete (ondelete="CASCADE"); without passive_deletes the ORM
    # would instead load the images and set their NOT NULL product_id to NULL.
    images: Mapped[list[Image]] = relationship(
        back_populates="product", cascade="all, delete-orphan", passive_deletes=True
    )


class ModelVersion(Base):
    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[ModelKind] = mapped_column(
        Enum(
            ModelKind,
            name="model_kind",
            native_enum=False,
            length=16,
            values_callable=_enum_values,
        )
    )
    arch: Mapped[str] = mapped_column(String(255))
    file: Mapped[str] = mapped_column(Text)
    """Path of the safetensors file (its JSON config sits beside it)."""
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    collection: Mapped[str | None] = mapped_column(String(255))
    """Embedders only: the Qdrant collection holding this version's vectors."""
    notes: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(_TZ, default=utcnow, server_default=func.now())
    promoted_at: Mapped[dt.datetime | None] = mapped_column(_TZ)

    __table_args__ = (
        Index("ix_model_versions_kind_active", "kind", "active"),
        # At most one active version per kind, enforced by the database: two processes that
        # both find no embedder on first use cannot both create an active one.
        Index(
            "uq_model_versions_kind_active_only",
            "kind",
            unique=True,
            sqlite_where=text("active"),
            postgresql_where=text("active"),
        ),
    )


class Image(Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    product_id: Mapped[str] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(512))
    """Name inside the product's folder; (product_id, filename) identifies a catalog image."""
    source_path: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[ImageStatus] = mapped_column(
        Enum(
            ImageStatus,
            name="image_status",
            native_enum=False,
            length=16,
            values_callable=_enum_values,
        ),
        default=ImageStatus.PENDING,
        index=True,
    )
    error: Mapped[str | None] = mapped_column(Text)
    point_id: Mapped[str | None] = mapped_column(String(36))
    embedder_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL")
    )
    last_seen_run_id: Mapped[int | None] = mapped_column(Integer)
    embed_deliveries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Embed deliveries of these bytes that started and never finished (the worker died:
    out of memory, a crash in a decoder); past ``embed_max_deliveries`` the image fails."""
    created_at: Mapped[dt.datetime] = mapped_column(_TZ, default=utcnow, server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(_TZ, default=utcnow, onupdate=utcnow)

    product: Mapped[Product] = relationship(back_populates="images")

    __table_args__ = (UniqueConstraint("product_id", "filename"),)


class IngestRun(Base):
    __tablename__ = "ingest_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    catalog_path: Mapped[str] = mapped_column(Text)
    started_at: Mapped[dt.datetime] = mapped_column(_TZ, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(_TZ)
    status: Mapped[str] = mapped_column(String(32), default="running")
    counts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    problems: Mapped[list[Any]] = mapped_column(JSON, default=list)
    """The first problems found (file and reason); ``counts`` has the totals."""


class QueryLog(Base):
    __tablename__ = "query_log"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(_TZ, default=utcnow, index=True)
    image_hash: Mapped[str] = mapped_column(String(64))
    image_path: Mapped[str | None] = mapped_column(Text)
    """Stored copy of the query photo (the most valuable training data)."""
    filters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    top_k: Mapped[int] = mapped_column(Integer)
    results: Mapped[list[Any]] = mapped_column(JSON, default=list)
    embedder_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL")
    )
    stir_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL")
    )
    reranked: Mapped[bool] = mapped_column(Boolean, default=False)
    rerank_reason: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[float] = mapped_column(Float)
    timings_ms: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    feedback: Mapped[list[Feedback]] = relationship(
        back_populates="query", cascade="all, delete-orphan", passive_deletes=True
    )


class Feedback(Base):
    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    query_id: Mapped[str] = mapped_column(ForeignKey("query_log.id", ondelete="CASCADE"))
    product_id: Mapped[str] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"))
    positive: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[dt.datetime] = mapped_column(_TZ, default=utcnow)

    query: Mapped[QueryLog] = relationship(back_populates="feedback")

    __table_args__ = (Index("ix_feedback_query_id", "query_id"),)


class StoredPixels(Base):
    """Model-ready pixels of the cluster's pixel store (``SEARCHSVC_PIXEL_STORE=postgresql``,
    :class:`searchsvc.storage.pixels.DatabasePixelStore`): raw ``size x size x 3`` bytes by
    content hash. Empty under the embedded default, whose pixels are in a local file."""

    __tablename__ = "pixels"

    content_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
