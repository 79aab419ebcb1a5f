"""Initial schema: products, model versions, images, ingest runs, query log, feedback.

Revision ID: 0001
Revises:
Create Date: 2026-11-27

Written by hand to match ``searchsvc/db/models.py`` exactly (``tests/test_db.py`` compares the
migrated schema with the ORM metadata on SQLite and PostgreSQL). Constraint and index names
follow ``NAMING_CONVENTION``; they are spelled out (``op.f``) so that this revision does not
change when the convention does. Column types are plain SQLAlchemy types frozen here, not
imports from the application: ``UTCDateTime`` is stored as ``DateTime(timezone=True)`` and
the status/kind enums as ``VARCHAR(16)`` holding the enum values (no CHECK constraint).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

IMAGE_STATUS = ("pending", "indexed", "failed", "removed")
MODEL_KIND = ("embedder", "stir")


def _timestamp() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "products",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("title", sa.Text(), nullable=True),
        sa.Column("category", sa.String(length=255), nullable=True),
        sa.Column("price", sa.Float(), nullable=True),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("attributes", sa.JSON(), nullable=False),
        sa.Column("removed", sa.Boolean(), nullable=False),
        sa.Column("last_seen_run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", _timestamp(), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_products")),
    )
    op.create_index(op.f("ix_products_category"), "products", ["category"], unique=False)

    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                *MODEL_KIND,
                name="model_kind",
                native_enum=False,
                length=16,
                create_constraint=False,
            ),
            nullable=False,
        ),
        sa.Column("arch", sa.String(length=255), nullable=False),
        sa.Column("file", sa.Text(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("collection", sa.String(length=255), nullable=True),
        sa.Column("notes", sa.Text(), nullable=True),
        sa.Column("created_at", _timestamp(), server_default=sa.func.now(), nullable=False),
        sa.Column("promoted_at", _timestamp(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
    )
    op.create_index(
        "ix_model_versions_kind_active", "model_versions", ["kind", "active"], unique=False
    )

    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("product_id", sa.String(length=255), nullable=False),
        sa.Column("filename", sa.String(length=512), nullable=False),
        sa.Column("source_path", sa.Text(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column(
            "status",
            sa.Enum(
                *IMAGE_STATUS,
                name="image_status",
                native_enum=False,
                length=16,
                create_constraint=False,
            ),
            nullable=False,
        ),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("point_id", sa.String(length=36), nullable=True),
        sa.Column("embedder_version_id", sa.Integer(), nullable=True),
        sa.Column("last_seen_run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", _timestamp(), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", _timestamp(), nullable=False),
        sa.ForeignKeyConstraint(
            ["embedder_version_id"],
            ["model_versions.id"],
            name=op.f("fk_images_embedder_version_id_model_versions"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["product_id"],
            ["products.id"],
            name=op.f("fk_images_product_id_products"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint("product_id", "filename", name=op.f("uq_images_product_id")),
    )
    op.create_index(op.f("ix_images_content_hash"), "images", ["content_hash"], unique=False)
    op.create_index(op.f("ix_images_status"), "images", ["status"], unique=False)

    op.create_table(
        "ingest_runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("catalog_path", sa.Text(), nullable=False),
        sa.Column("started_at", _timestamp(), nullable=False),
        sa.Column("finished_at", _timestamp(), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("problems", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingest_runs")),
    )

    op.create_table(
        "query_log",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("image_hash", sa.String(length=64), nullable=False),
        sa.Column("image_path", sa.Text(), nullable=True),
        sa.Column("filters", sa.JSON(), nullable=False),
        sa.Column("top_k", sa.Integer(), nullable=False),
        sa.Column("results", sa.JSON(), nullable=False),
        sa.Column("embedder_version_id", sa.Integer(), nullable=True),
        sa.Column("stir_version_id", sa.Integer(), nullable=True),
        sa.Column("reranked", sa.Boolean(), nullable=False),
        sa.Column("rerank_reason", sa.Text(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("timings_ms", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["embedder_version_id"],
            ["model_versions.id"],
            name=op.f("fk_query_log_embedder_version_id_model_versions"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["stir_version_id"],
            ["model_versions.id"],
            name=op.f("fk_query_log_stir_version_id_model_versions"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_query_log")),
    )
    op.create_index(op.f("ix_query_log_created_at"), "query_log", ["created_at"], unique=False)

    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("query_id", sa.String(length=36), nullable=False),
        sa.Column("product_id", sa.String(length=255), nullable=False),
        sa.Column("positive", sa.Boolean(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.ForeignKeyConstraint(
            ["product_id"],
            ["products.id"],
            name=op.f("fk_feedback_product_id_products"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["query_id"],
            ["query_log.id"],
            name=op.f("fk_feedback_query_id_query_log"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback")),
    )
    op.create_index("ix_feedback_query_id", "feedback", ["query_id"], unique=False)


def downgrade() -> None:
    # Children before parents, each table's indexes before the table.
    op.drop_index("ix_feedback_query_id", table_name="feedback")
    op.drop_table("feedback")
    op.drop_index(op.f("ix_query_log_created_at"), table_name="query_log")
    op.drop_table("query_log")
    op.drop_table("ingest_runs")
    op.drop_index(op.f("ix_images_status"), table_name="images")
    op.drop_index(op.f("ix_images_content_hash"), table_name="images")
    op.drop_table("images")
    op.drop_index("ix_model_versions_kind_active", table_name="model_versions")
    op.drop_table("model_versions")
    op.drop_index(op.f("ix_products_category"), table_name="products")
    op.drop_table("products")
