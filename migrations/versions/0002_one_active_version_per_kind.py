"""At most one active model version per kind: a partial unique index.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Before this, "one active version of each kind" was a convention: two processes starting at
once on an empty database could both create an active embedder. The index makes the
database refuse the second. A database that already holds several active versions of a
kind keeps the newest active (the one ``active_version`` served).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "uq_model_versions_kind_active_only"


def upgrade() -> None:
    versions = sa.table(
        "model_versions",
        sa.column("id", sa.Integer()),
        sa.column("kind", sa.String()),
        sa.column("active", sa.Boolean()),
    )
    newer = versions.alias("newer")
    op.execute(
        versions.update()
        .where(
            versions.c.active.is_(True),
            sa.exists().where(
                newer.c.kind == versions.c.kind,
                newer.c.active.is_(True),
                newer.c.id > versions.c.id,
            ),
        )
        .values(active=False)
    )
    op.create_index(
        INDEX,
        "model_versions",
        ["kind"],
        unique=True,
        sqlite_where=sa.text("active"),
        postgresql_where=sa.text("active"),
    )


def downgrade() -> None:
    op.drop_index(INDEX, table_name="model_versions")
