"""searchsvc.storage.db: migrations, schema equality with the ORM, sessions and errors.

Each test that takes ``backend`` runs on SQLite (a file under ``tmp_path``) and on the
PostgreSQL server named by ``SEARCHSVC_TEST_POSTGRES_URL`` (default: the local ``test``
database), in throwaway databases created for the test and dropped after it. An unreachable
server fails those tests; set ``SEARCHSVC_TEST_POSTGRES_URL=skip`` to skip them instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.pool import NullPool

from searchsvc.core.errors import DatabaseError, SearchsvcError
from searchsvc.storage.db import (
    Base,
    Database,
    Image,
    ImageStatus,
    ModelKind,
    ModelVersion,
    Product,
    QueryLog,
)
from searchsvc.storage.db.session import migrations_dir, normalize_url, redact_url

ROOT = Path(__file__).resolve().parents[1]
PG_ENV = "SEARCHSVC_TEST_POSTGRES_URL"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


# --------------------------------------------------------------------------- fixtures


class PostgresServer:
    """Makes throwaway databases on the test server; they are dropped at teardown."""

    def __init__(self, raw_url: str) -> None:
        self.url = normalize_url(raw_url)
        self.admin = sa.create_engine(
            self.url,
            isolation_level="AUTOCOMMIT",
            poolclass=NullPool,
            connect_args={"connect_timeout": 5},
        )
        self.created: list[str] = []

    def new_url(self) -> str:
        name = f"searchsvc_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"
        try:
            with self.admin.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        except sa.exc.SQLAlchemyError as exc:
            reason = " ".join(str(getattr(exc, "orig", exc)).split())
            pytest.fail(
                f"PostgreSQL test server {redact_url(self.url)} is unusable ({reason}); start it,"
                f" point {PG_ENV} at another server, or set {PG_ENV}=skip",
                pytrace=False,
            )
        self.created.append(name)
        return self.url.set(database=name).render_as_string(hide_password=False)

    def drop_created(self) -> None:
        if not self.created:
            return
        with self.admin.connect() as conn:
            for name in self.created:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.clear()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    raw = os.environ.get(PG_ENV, "").strip() or DEFAULT_PG_URL
    if raw.lower() == "skip":
        pytest.skip(f"{PG_ENV}=skip")
    server = PostgresServer(raw)
    yield server
    server.admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def new_url(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[], str]]:
    """A factory of URLs of fresh, empty databases of the backend under test.

    Called inside the test, so that an unreachable server fails the test (not an error in
    set-up, and never a skip).
    """
    if backend == "sqlite":
        counter = iter(range(1_000_000))
        # A directory that does not exist yet: Database must create it.
        yield lambda: f"sqlite:///{tmp_path / f'home{next(counter)}' / 'searchsvc.db'}"
        return
    server: PostgresServer = request.getfixturevalue("pg_server")
    try:
        yield server.new_url
    finally:
        server.drop_created()


@pytest.fixture
def open_db() -> Iterator[Callable[..., Database]]:
    """``Database(...)`` that is disposed at teardown (so PostgreSQL databases can be dropped)."""
    opened: list[Database] = []

    def make(url: str, **kwargs: Any) -> Database:
        db = Database(url, **kwargs)
        opened.append(db)
        return db

    yield make
    for db in opened:
        db.dispose()


# --------------------------------------------------------------------------- helpers


def schema_diff(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def table_names(engine: sa.Engine) -> list[str]:
    return sorted(sa.inspect(engine).get_table_names())


def snapshot(engine: sa.Engine) -> dict[str, Any]:
    """Everything the inspector reports about the application tables, order-insensitive."""
    inspector = sa.inspect(engine)
    out: dict[str, Any] = {}
    for table in sorted(inspector.get_table_names()):
        if table == "alembic_version":
            continue
        columns = sorted(
            (
                col["name"],
                str(col["type"].compile(dialect=engine.dialect)),
                col["nullable"],
                None if col.get("default") is None else str(col["default"]),
            )
            for col in inspector.get_columns(table)
        )
        pk = inspector.get_pk_constraint(table)
        fks = sorted(
            (
                fk["name"],
                tuple(fk["constrained_columns"]),
                fk["referred_table"],
                tuple(fk["referred_columns"]),
                (fk.get("options") or {}).get("ondelete"),
            )
            for fk in inspector.get_foreign_keys(table)
        )
        uniques = sorted(
            (uq["name"], tuple(uq["column_names"]))
            for uq in inspector.get_unique_constraints(table)
        )
        indexes = sorted(
            (ix["name"], tuple(ix["column_names"]), bool(ix["unique"]))
            for ix in inspector.get_indexes(table)
        )
        out[table] = {
            "columns": columns,
            "pk": (pk["name"], tuple(pk["constrained_columns"])),
            "fks": fks,
            "uniques": uniques,
            "indexes": indexes,
        }
    return out


def orm_table_names() -> list[str]:
    return sorted(Base.metadata.tables)


# --------------------------------------------------------------------------- migrations


def test_migrations_up_down_up_match_orm(backend: str, new_url, open_db) -> None:
    db = open_db(new_url())
    head = db.head_revision()
    assert head is not None
    assert db.current_revision() == head
    assert table_names(db.engine) == sorted([*orm_table_names(), "alembic_version"])
    assert schema_diff(db.engine) == []

    db.downgrade("base")
    assert db.current_revision() is None
    assert table_names(db.engine) == ["alembic_version"]
    if backend == "postgres":
        with db.engine.connect() as conn:
            leftovers = conn.exec_driver_sql(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = current_schema() ORDER BY 1"
            ).scalars()
            # The version table and its primary key index; no sequence, index or type left.
            assert list(leftovers) == ["alembic_version", "alembic_version_pkc"]
            assert (
                conn.exec_driver_sql(
                    "SELECT count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace"
                    " WHERE n.nspname = current_schema() AND t.typtype = 'e'"
                ).scalar_one()
                == 0
            )
    else:
        with db.engine.connect() as conn:
            names = conn.exec_driver_sql("SELECT name FROM sqlite_master ORDER BY 1").scalars()
            assert [n for n in names if not n.startswith("sqlite_autoindex")] == ["alembic_version"]

    db.upgrade()
    assert db.current_revision() == head
    assert schema_diff(db.engine) == []


def test_migrated_schema_equals_create_all(backend: str, new_url, open_db) -> None:
    """Names (naming convention), types, nullability, server defaults, FK actions, unique
    constraints and indexes of the migrated schema are those of ``Base.metadata.create_all``."""
    migrated = open_db(new_url())
    reference = open_db(new_url(), auto_migrate=False)
    Base.metadata.create_all(reference.engine)

    got, want = snapshot(migrated.engine), snapshot(reference.engine)
    assert sorted(got) == orm_table_names()
    for table in want:
        assert got[table] == want[table], table

    # The reflected FK actions are real (not None on both sides): they match the ORM's.
    reflected = {(table, fk[0], fk[4]) for table, info in got.items() for fk in info["fks"]}
    declared = {
        (t.name, fk.name, fk.ondelete)
        for t in Base.metadata.sorted_tables
        for fk in t.foreign_key_constraints
    }
    assert reflected == declared
    assert all(ondelete in {"CASCADE", "SET NULL"} for _, _, ondelete in declared)


def test_auto_migrate_twice_is_idempotent(
    backend: str, new_url, open_db, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = new_url()
    first = open_db(url)
    with first.session() as session:
        session.add(Product(id="p1", title="kept"))
    first.dispose()

    def must_not_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("upgrade ran although the schema is at head")

    monkeypatch.setattr(command, "upgrade", must_not_run)
    second = open_db(url)
    third = open_db(url)
    assert second.current_revision() == third.current_revision() == second.head_revision()
    with third.session() as session:
        assert session.get(Product, "p1") is not None


@pytest.mark.slow
def test_concurrent_first_use_by_several_processes(backend: str, new_url) -> None:
    url = new_url()
    start_at = time.time() + 3.0  # after every process has imported searchsvc
    code = textwrap.dedent(
        f"""
        import time
        from searchsvc.storage.db import Database
        time.sleep(max(0.0, {start_at!r} - time.time()))
        db = Database({url!r})
        print(db.current_revision())
        db.dispose()
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    results = [(*p.communicate(timeout=120), p.returncode) for p in procs]
    db = Database(url, auto_migrate=False)
    try:
        for out, err, rc in results:
            assert rc == 0, err
            assert out.strip() == db.head_revision()
        assert db.current_revision() == db.head_revision()
        assert schema_diff(db.engine) == []
    finally:
        db.dispose()


def test_alembic_command_line_uses_the_same_migrations(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli' / 'searchsvc.db'}"
    env = {
        **os.environ,
        "SEARCHSVC_DATABASE_URL": url,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }

    def alembic(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout + proc.stderr

    alembic("upgrade", "head")
    head = Database(url, auto_migrate=False).head_revision()  # the newest revision, any id
    assert f"{head} (head)" in alembic("current")
    assert "No new upgrade operations detected" in alembic("check")
    db = Database(url, auto_migrate=False)
    try:
        assert db.current_revision() == db.head_revision()
    finally:
        db.dispose()


def test_migrations_directory_is_the_package() -> None:
    import migrations

    assert migrations_dir() == Path(migrations.__file__).resolve().parent
    assert (migrations_dir() / "versions" / "0001_initial.py").is_file()


# --------------------------------------------------------------------------- behaviour


def test_foreign_keys_are_enforced_and_cascade(backend: str, new_url, open_db) -> None:
    db = open_db(new_url())
    db.downgrade("base")  # the migration connection goes back to the pool ...
    db.upgrade()  # ... and must have foreign keys on again
    if backend == "sqlite":
        with db.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000

    with pytest.raises(sa.exc.IntegrityError), db.session() as session:
        session.add(
            Image(
                product_id="missing",
                filename="a.jpg",
                source_path="/x/a.jpg",
                content_hash="0" * 64,
                size_bytes=1,
            )
        )

    with db.session() as session:
        version = ModelVersion(kind=ModelKind.EMBEDDER, arch="vit", file="/m.safetensors")
        product = Product(id="p1")
        session.add_all([version, product])
        session.flush()
        session.add(
            Image(
                product_id="p1",
                filename="a.jpg",
                source_path="/x/a.jpg",
                content_hash="0" * 64,
                size_bytes=1,
                embedder_version_id=version.id,
            )
        )
        session.add(
            QueryLog(
                id=str(uuid.uuid4()),
                image_hash="1" * 64,
                top_k=5,
                latency_ms=1.0,
                embedder_version_id=version.id,
            )
        )
    with db.session() as session:
        session.execute(sa.delete(ModelVersion))  # ON DELETE SET NULL
        assert session.scalars(sa.select(Image.embedder_version_id)).all() == [None]
        assert session.scalars(sa.select(QueryLog.embedder_version_id)).all() == [None]
    with db.session() as session:
        session.delete(session.get(Product, "p1"))  # ON DELETE CASCADE (passive in the ORM)
    with db.session() as session:
        assert session.scalars(sa.select(Image)).all() == []


def test_enums_stored_by_value_and_datetimes_are_aware(backend: str, new_url, open_db) -> None:
    db = open_db(new_url())
    with db.session() as session:
        session.add(Product(id="p1"))
        session.flush()
        session.add(
            Image(
                product_id="p1",
                filename="a.jpg",
                source_path="/x/a.jpg",
                content_hash="0" * 64,
                size_bytes=1,
            )
        )
    with db.session() as session:
        raw = session.execute(sa.text("SELECT status FROM images")).scalar_one()
        assert raw == "pending"
        image = session.scalars(sa.select(Image)).one()
        assert image.status is ImageStatus.PENDING
        for value in (image.created_at, image.updated_at, image.product.created_at):
            assert value.utcoffset() is not None and value.utcoffset().total_seconds() == 0


def test_session_commits_and_rolls_back(backend: str, new_url, open_db) -> None:
    db = open_db(new_url())

    with pytest.raises(RuntimeError, match="boom"), db.session() as session:
        session.add(Product(id="rolled-back"))
        session.flush()  # the row reached the database inside the transaction
        raise RuntimeError("boom")
    assert not session.in_transaction()  # closed

    with db.session() as session:
        session.add(Product(id="committed", title="t"))
    with db.session() as session:
        assert session.get(Product, "rolled-back") is None
        product = session.get(Product, "committed")
        assert product is not None
    assert product.title == "t"  # usable after the block (expire_on_commit=False)


def test_parallel_constructions_in_threads(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    url = f"sqlite:///{tmp_path / 'threads' / 'searchsvc.db'}"
    with ThreadPoolExecutor(max_workers=4) as pool:
        dbs = list(pool.map(lambda _: Database(url), range(4)))
    try:
        assert {db.current_revision() for db in dbs} == {dbs[0].head_revision()}
    finally:
        for db in dbs:
            db.dispose()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_gets_a_fresh_pool(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'fork' / 'searchsvc.db'}")
    try:
        with db.session() as session:  # the parent now has a pooled connection
            session.add(Product(id="parent"))
        parent_pool = db.engine.pool
        pid = os.fork()
        if pid == 0:  # child: exit code 0 only if the pool was replaced and works
            ok = db.engine.pool is not parent_pool
            try:
                with db.session() as session:
                    ok = ok and session.get(Product, "parent") is not None
                    session.add(Product(id="child"))
            except BaseException:
                ok = False
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert db.engine.pool is parent_pool
        with db.session() as session:
            assert session.get(Product, "child") is not None
    finally:
        db.dispose()


def test_in_memory_sqlite_is_one_shared_database() -> None:
    with Database("sqlite://") as db:
        with db.session() as session:
            session.add(Product(id="p1"))
        with db.session() as session:
            assert session.get(Product, "p1") is not None
        assert schema_diff(db.engine) == []


# --------------------------------------------------------------------------- URLs and errors


def test_unreachable_server_raises_one_line_error_without_password() -> None:
    url = "postgresql://alice:s3cr3t@127.0.0.1:1/nowhere"
    with pytest.raises(SearchsvcError) as info:
        Database(url)
    message = str(info.value)
    assert isinstance(info.value, DatabaseError)
    assert "\n" not in message
    assert "s3cr3t" not in message
    assert "alice:***@127.0.0.1:1/nowhere" in message
    assert "cannot connect" in message

    # Without auto_migrate nothing connects until first use, which fails the same way.
    db = Database(url, auto_migrate=False)
    assert db.engine.dialect.driver == "psycopg"  # postgresql:// means psycopg 3
    assert "s3cr3t" not in repr(db)
    with pytest.raises(DatabaseError, match="cannot connect") as info2, db.session() as session:
        session.execute(sa.text("SELECT 1"))
    assert "s3cr3t" not in str(info2.value) and "\n" not in str(info2.value)
    db.dispose()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "not a valid SQLAlchemy URL"),
        ("", "not a valid SQLAlchemy URL"),
        ("nosuchdb://u:pw@host/db", "unsupported URL or missing driver"),
    ],
)
def test_bad_urls_raise_database_error(url: str, expected: str) -> None:
    with pytest.raises(DatabaseError, match=expected) as info:
        Database(url)
    assert "pw@" not in str(info.value)
    assert "\n" not in str(info.value)


def test_unusable_sqlite_directory_raises_database_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DatabaseError, match="cannot create directory"):
        Database(f"sqlite:///{blocker / 'sub' / 'searchsvc.db'}")


def test_url_normalization_and_redaction() -> None:
    assert normalize_url("postgresql://u@h/d").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/d").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u@h/d").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"
    assert redact_url("postgresql://u:secret@h:5/d") == "postgresql://u:***@h:5/d"


# ------------------------------------------------------------- one active version per kind


def _version_row(kind: ModelKind, active: bool) -> ModelVersion:
    return ModelVersion(kind=kind, arch="a", file="f", config={}, metrics={}, active=active)


def test_one_active_version_per_kind_is_a_database_constraint(
    backend: str, new_url, open_db
) -> None:
    db = open_db(new_url())
    with db.session() as session:
        session.add_all(
            [
                _version_row(ModelKind.EMBEDDER, True),
                _version_row(ModelKind.EMBEDDER, False),
                _version_row(ModelKind.EMBEDDER, False),  # any number of inactive ones
                _version_row(ModelKind.STIR, True),  # one active of each kind
            ]
        )
    with pytest.raises(sa.exc.IntegrityError), db.session() as session:
        session.add(_version_row(ModelKind.EMBEDDER, True))
    with db.session() as session:
        active = session.scalars(
            sa.select(ModelVersion.kind).where(ModelVersion.active.is_(True))
        ).all()
    assert sorted(active) == [ModelKind.EMBEDDER, ModelKind.STIR]


def test_migration_0002_keeps_the_newest_active_version(backend: str, new_url, open_db) -> None:
    """A database where the old race left two active embedders upgrades, serving the newest
    (the one ``active_version`` chose before)."""
    db = open_db(new_url(), auto_migrate=False)
    db.upgrade("0001")
    with db.engine.begin() as conn:
        for active in (True, True, False):
            conn.execute(
                sa.text(
                    "INSERT INTO model_versions (kind, arch, file, config, metrics, active)"
                    " VALUES ('embedder', 'a', 'f', '{}', '{}', :active)"
                ),
                {"active": active},
            )
    db.upgrade()
    with db.session() as session:
        rows = session.execute(sa.select(ModelVersion.id, ModelVersion.active)).all()
    assert sorted(rows) == [(1, False), (2, True), (3, False)]


def test_processes_starting_at_once_create_one_active_embedder(
    backend: str, new_url, tmp_path: Path
) -> None:
    url = new_url()
    start_at = time.time() + 8.0  # after every process has imported torch and timm
    code = textwrap.dedent(
        f"""
        import time
        from searchsvc.core.config import load_settings
        from searchsvc.jobs.model_files import ensure_active_embedder
        from searchsvc.storage.db import Database
        settings = load_settings(env={{
            "SEARCHSVC_HOME": {str(tmp_path / "home")!r},
            "SEARCHSVC_DATABASE_URL": {url!r},
        }})
        db = Database({url!r})
        time.sleep(max(0.0, {start_at!r} - time.time()))
        print(ensure_active_embedder(db, settings).id)
        db.dispose()
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [(*p.communicate(timeout=180), p.returncode) for p in procs]
    for _, err, rc in results:
        assert rc == 0, err
    served = {out.strip() for out, _, _ in results}
    db = Database(url)
    try:
        with db.session() as session:
            active = session.scalars(
                sa.select(ModelVersion.id).where(
                    ModelVersion.kind == ModelKind.EMBEDDER, ModelVersion.active.is_(True)
                )
            ).all()
    finally:
        db.dispose()
    assert len(active) == 1
    assert served == {str(active[0])}  # every process serves the one that won
