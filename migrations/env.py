"""Alembic environment for searchsvc.

Run by :class:`searchsvc.storage.db.Database` (which passes its URL, and an open connection, in
``config.attributes``) and by the ``alembic`` command line with ``alembic.ini`` (URL from
``SEARCHSVC_DATABASE_URL``, else ``sqlalchemy.url`` in the ini file, else the default SQLite
file ``$SEARCHSVC_HOME/searchsvc.db``).

Every online migration runs inside :func:`searchsvc.storage.db.session.migration_transaction`: one
transaction, serialized against concurrent migrations (PostgreSQL advisory lock, SQLite
``BEGIN IMMEDIATE``), with SQLite foreign keys off while tables are rebuilt.
"""

from __future__ import annotations

import os
from logging.config import fileConfig
from pathlib import Path
from typing import Any

from alembic import context
from sqlalchemy import URL, Connection

from searchsvc.core.config import Settings
from searchsvc.storage.db.schema import Base
from searchsvc.storage.db.session import (
    create_engine_for_url,
    migration_transaction,
    normalize_url,
)

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> URL:
    given = config.attributes.get("url")
    if given is not None:
        return normalize_url(given)
    raw = os.environ.get("SEARCHSVC_DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    if not raw:
        home = Path(os.environ.get("SEARCHSVC_HOME") or ".searchsvc").expanduser()
        raw = Settings(home=home).sqlalchemy_url
    return normalize_url(raw)


def _options(dialect_name: str) -> dict[str, Any]:
    return {
        "target_metadata": target_metadata,
        # SQLite cannot ALTER most things: rebuild the table (copy and rename) instead.
        "render_as_batch": dialect_name == "sqlite",
        "compare_type": True,
    }


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: print the SQL instead of running it."""
    url = _url()
    context.configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **_options(url.get_backend_name()),
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    with migration_transaction(connection):
        # The whole run is one transaction on every backend (SQLite included), see above.
        context.configure(
            connection=connection, transactional_ddl=True, **_options(connection.dialect.name)
        )
        with context.begin_transaction():
            context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine_for_url(_url())
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
