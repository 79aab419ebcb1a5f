"""The cluster's pixel store: a table of model-ready pixels by content hash.

Revision ID: 0004
Revises: 0001
Create Date: 2026-12-01

``SEARCHSVC_PIXEL_STORE=postgresql`` keeps the reranker's preprocessed pixels here, in the
cluster's database, which every host reaches over the network (a SQLite file on a shared
folder is not safe: its locks do not hold over NFS). Created on every backend so that the
schema matches the ORM everywhere; under the embedded default it stays empty.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "pixels",
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("content_hash", "size", name=op.f("pk_pixels")),
    )


def downgrade() -> None:
    op.drop_table("pixels")
