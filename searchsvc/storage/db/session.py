"""Engine, sessions and schema migrations for the metadata database.

:class:`Database` is the one entry point: it builds the engine for a URL (SQLite file or
PostgreSQL), brings the schema to the newest Alembic revision on construction, and hands
out sessions that commit on success and roll back on error.

Several processes (the CLI, Celery workers) may open the same database at once:

* SQLite runs in WAL mode with a busy timeout, so writers wait for each other instead of
  failing; a migration runs in one ``BEGIN IMMEDIATE`` transaction, so a second process
  waits for the first to finish and then finds the schema at head.
* On PostgreSQL a migration holds a transaction-level advisory lock
  (``pg_advisory_xact_lock``), with the same effect.

Failures to reach or migrate the database raise :class:`searchsvc.core.errors.DatabaseError` with a
one-line message naming the URL (password hidden).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import URL, Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.engine.interfaces import DBAPIConnection, ExceptionContext
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool

from searchsvc.core.config import _redact
from searchsvc.core.errors import DatabaseError

__all__ = [
    "MIGRATION_LOCK_KEY",
    "SQLITE_BUSY_TIMEOUT_MS",
    "Database",
    "create_engine_for_url",
    "migration_transaction",
    "migrations_dir",
    "normalize_url",
    "redact_url",
]

SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long an SQLite connection waits for another process's write lock."""
PG_CONNECT_TIMEOUT_S = 10
"""libpq ``connect_timeout`` unless the URL sets one: an unreachable host fails, not hangs."""
MIGRATION_LOCK_KEY = 0x5EA2_C5DB_0001
"""``pg_advisory_xact_lock`` key that serializes schema migrations of one database."""

_MAX_REASON_CHARS = 400
_ALEMBIC_LOCK = threading.RLock()
"""Alembic commands install module-global proxies (``alembic.context``, ``alembic.op``), so
two threads of one process must not run them at once; processes are kept apart by the
database itself (see :func:`migration_transaction`)."""


# --------------------------------------------------------------------------- URLs


def normalize_url(url: str | URL) -> URL:
    """Parse ``url``; plain ``postgresql://`` (or ``postgres://``) gets the psycopg 3 driver."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        raise DatabaseError(
            f"database URL {_redact(str(url))!r} is not a valid SQLAlchemy URL"
            " (for example sqlite:///path/searchsvc.db or postgresql://user@host/db)"
        ) from None
    if parsed.drivername in {"postgresql", "postgres"}:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def redact_url(url: str | URL) -> str:
    """The URL as text with its password replaced by ``***``."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError, TypeError):
        return _redact(url)


def _one_line(exc: BaseException, secret: str | None = None) -> str:
    """A driver error as one short line (psycopg messages span lines), secret removed."""
    orig = getattr(exc, "orig", None)
    source = orig if isinstance(orig, BaseException) else exc
    message = " ".join(str(source).split()) or type(source).__name__
    if secret:
        message = message.replace(secret, "***")
    if len(message) > _MAX_REASON_CHARS:
        message = message[: _MAX_REASON_CHARS - 3] + "..."
    return message


def _is_sqlite_memory(url: URL) -> bool:
    database = url.database or ""
    return database in {"", ":memory:"} or url.query.get("mode") == "memory"


# --------------------------------------------------------------------------- engine


def _sqlite_on_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # Busy timeout first: switching to WAL may have to wait for another process.
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS:d}")
        # SQLite can report "locked" here without calling the busy handler (another process
        # creating the file, or checkpointing and removing the WAL as it closes): retry.
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                cursor.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        # In WAL mode NORMAL never corrupts the file; a power cut may lose the last commits,
        # which ingest redoes (rows stay pending until their point is written), and every
        # commit no longer waits for an fsync.
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def create_engine_for_url(url: str | URL, **kwargs: Any) -> Engine:
    """An engine for ``url`` with searchsvc's settings (also used by ``migrations/env.py``).

    SQLite: the file's directory is created; each connection gets ``foreign_keys=ON``,
    ``journal_mode=WAL`` and a busy timeout; an in-memory database is one shared connection.
    PostgreSQL: psycopg 3, a connect timeout and pre-ping (workers outlive connections).
    Failing to connect raises :class:`DatabaseError`, wherever the connection is opened.
    """
    parsed = normalize_url(url)
    safe = redact_url(parsed)
    backend = parsed.get_backend_name()
    connect_args: dict[str, Any] = dict(kwargs.pop("connect_args", {}))
    if backend == "sqlite":
        connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        if _is_sqlite_memory(parsed):
            kwargs.setdefault("poolclass", StaticPool)
            connect_args.setdefault("check_same_thread", False)
        elif not parsed.query.get("uri"):
            parent = Path(parsed.database or "").expanduser().absolute().parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DatabaseError(
                    f"database {safe}: cannot create directory {str(parent)!r}"
                    f" ({exc.strerror or exc})"
                ) from None
    elif backend == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
        if "connect_timeout" not in parsed.query:
            connect_args.setdefault("connect_timeout", PG_CONNECT_TIMEOUT_S)
    try:
        engine = create_engine(parsed, connect_args=connect_args, **kwargs)
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise DatabaseError(
            f"database {safe}: unsupported URL or missing driver ({_one_line(exc)})"
        ) from None

    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)

    password = parsed.password if isinstance(parsed.password, str) else None

    def on_error(context: ExceptionContext) -> None:
        # ``connection is None``: the DBAPI failed while opening a connection (refused, bad
        # password, unknown database, unwritable file). Pre-ping failures are retried by the
        # pool, so they are left alone.
        if context.connection is None and not context.is_pre_ping:
            reason = _one_line(context.original_exception, password)
            raise DatabaseError(f"database {safe}: cannot connect ({reason})")

    event.listen(engine, "handle_error", on_error)
    return engine


def _forget_pool_in_forked_children(engine: Engine) -> None:
    """A forked child (Celery prefork worker) must not reuse the parent's pooled connections
    (for SQLite that can corrupt the file): give it a fresh, empty pool, leaving the parent's
    connections open for the parent."""
    ref = weakref.ref(engine)

    def after_fork_in_child() -> None:
        alive = ref()
        if alive is not None:
            alive.dispose(close=False)

    os.register_at_fork(after_in_child=after_fork_in_child)


# --------------------------------------------------------------------------- migrations


@functools.cache
def migrations_dir() -> Path:
    """The directory of the ``migrations`` package (works from a checkout and installed)."""
    spec = importlib.util.find_spec("migrations")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / "env.py").is_file():
            return Path(location)
    raise DatabaseError(
        "cannot find the searchsvc 'migrations' package (is searchsvc installed completely?)"
    )


@contextlib.contextmanager
def migration_transaction(connection: Connection) -> Iterator[None]:
    """Run a migration in one transaction that also excludes concurrent migrations.

    PostgreSQL: a transaction holding ``pg_advisory_xact_lock(MIGRATION_LOCK_KEY)``.
    SQLite: ``BEGIN IMMEDIATE`` (takes the write lock up front; other processes wait on the
    busy timeout) with foreign keys off for the duration, as SQLite requires for the
    copy-and-rename of batch migrations (with them on, dropping the old ``products`` table
    would cascade-delete every image); ``PRAGMA foreign_key_check`` must pass before commit.

    If ``connection`` is already in a transaction, the caller owns it: the migration joins it.
    """
    dialect = connection.dialect.name
    if connection.in_transaction():
        if dialect == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )
        yield
        return

    if dialect != "sqlite":
        with connection.begin():
            if dialect == "postgresql":
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
                )
            yield
        return

    # pysqlite starts transactions by itself only before DML, so DDL would autocommit one
    # statement at a time. Take manual control for the migration, then restore.
    driver_connection: Any = connection.connection.driver_connection
    if driver_connection is None:
        raise DatabaseError(f"database {redact_url(connection.engine.url)}: connection is closed")
    saved_isolation = driver_connection.isolation_level
    foreign_keys_on = bool(driver_connection.execute("PRAGMA foreign_keys").fetchone()[0])
    driver_connection.isolation_level = None
    try:
        driver_connection.execute("PRAGMA foreign_keys = OFF")  # no effect inside a transaction
        with connection.begin():
            connection.exec_driver_sql("BEGIN IMMEDIATE")
            yield
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                table, rowid, parent, _ = broken[0]
                raise DatabaseError(
                    f"database {redact_url(connection.engine.url)}: migration left"
                    f" {len(broken)} rows violating foreign keys"
                    f" (first: {table} rowid {rowid} -> {parent}); rolled back"
                )
    finally:
        driver_connection.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys_on else 'OFF'}")
        driver_connection.isolation_level = saved_isolation


# --------------------------------------------------------------------------- Database


class Database:
    """The metadata database: engine, sessions and migrations.

    ``Database(url)`` upgrades the schema to the newest revision (a single cheap query when
    it is already there); pass ``auto_migrate=False`` to leave the schema alone.
    """

    def __init__(self, url: str | URL, *, auto_migrate: bool = True) -> None:
        self.url: URL = normalize_url(url)
        self.engine: Engine = create_engine_for_url(self.url)
        self._sessionmaker = sessionmaker(bind=self.engine, expire_on_commit=False)
        self._script: ScriptDirectory | None = None
        _forget_pool_in_forked_children(self.engine)
        if auto_migrate:
            try:
                self.upgrade()
            except BaseException:
                self.engine.dispose()
                raise

    @property
    def safe_url(self) -> str:
        """The URL with its password hidden, for messages and ``searchsvc status``."""
        return redact_url(self.url)

    def __repr__(self) -> str:
        return f"Database({self.safe_url!r})"

    def __enter__(self) -> Database:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.dispose()

    # ----------------------------------------------------------------- sessions

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits when the block ends, rolls back if it raises, and closes.

        Objects stay usable after the block (``expire_on_commit=False``); lazy relationships
        that were not loaded inside it cannot be loaded afterwards.
        """
        session = self._sessionmaker()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    # --------------------------------------------------------------- migrations

    def alembic_config(self, connection: Connection | None = None) -> Config:
        """An Alembic config for this database, for ``alembic.command`` functions."""
        config = Config()
        config.set_main_option("script_location", str(migrations_dir()).replace("%", "%%"))
        config.attributes["url"] = self.url
        if connection is not None:
            config.attributes["connection"] = connection
        return config

    @property
    def script(self) -> ScriptDirectory:
        if self._script is None:
            self._script = ScriptDirectory.from_config(self.alembic_config())
        return self._script

    def head_revision(self) -> str | None:
        """The newest revision of the migration scripts."""
        return self.script.get_current_head()

    def current_revision(self) -> str | None:
        """The revision the database is at; ``None`` for an empty (never migrated) database."""
        with self._errors("reading the schema revision"), self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def upgrade(self, revision: str = "head") -> None:
        """Migrate forward to ``revision``; safe to call from several processes at once."""
        with self._errors(f"upgrade to {revision}"), self.engine.connect() as connection:
            if revision == "head":
                current = set(MigrationContext.configure(connection).get_current_heads())
                if current == set(self.script.get_heads()):
                    return
            connection.rollback()  # end the read above; env.py opens its own transaction
            with _ALEMBIC_LOCK:
                command.upgrade(self.alembic_config(connection), revision)

    def downgrade(self, revision: str) -> None:
        """Migrate back to ``revision`` (``"base"`` drops every table but alembic_version)."""
        with self._errors(f"downgrade to {revision}"), self.engine.connect() as connection:
            with _ALEMBIC_LOCK:
                command.downgrade(self.alembic_config(connection), revision)

    def dispose(self) -> None:
        """Close the pooled connections (forked children get a fresh pool by themselves)."""
        self.engine.dispose()

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except DatabaseError:
            raise
        except (SQLAlchemyError, CommandError) as exc:
            password = self.url.password if isinstance(self.url.password, str) else None
            raise DatabaseError(
                f"database {self.safe_url}: {action} failed ({_one_line(exc, password)})"
            ) from exc
