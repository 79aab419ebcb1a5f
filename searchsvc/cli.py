"""``searchsvc``: the command line. Every fatal error is one line on stderr and a non-zero exit."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from searchsvc.core.config import Settings, load_settings, redact_secrets
from searchsvc.core.errors import SearchsvcError

F = TypeVar("F", bound=Callable[..., Any])
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
PROBLEMS_SHOWN = 50


def _fail(message: str, code: int = EXIT_ERROR) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _without_secrets(message: str) -> str:
    """The last guard: no configured password or key reaches the terminal, whichever layer
    (or library) wrote the message."""
    try:
        secrets = load_settings().secrets()
    except SearchsvcError:  # the settings are what failed; their error is redacted already
        return message
    return redact_secrets(message, secrets)


def handle_errors(function: F) -> F:
    """Turn known failures into one line on stderr (no traceback) and an exit code."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except SearchsvcError as exc:
            _fail(_without_secrets(str(exc)))
        except KeyboardInterrupt:
            _fail("interrupted; run the same command again to finish the rest", EXIT_INTERRUPTED)

    return wrapper  # type: ignore[return-value]


def _settings(ctx: click.Context, **overrides: Any) -> Settings:
    home = ctx.obj.get("home") if ctx.obj else None
    if home is not None:
        overrides["home"] = home
    return load_settings(overrides={k: v for k, v in overrides.items() if v is not None})


def _local_server(settings: Settings) -> Any:
    """The running `searchsvc serve` that owns this home's embedded store, if any: then the
    command goes through its API (the store opens in one process only)."""
    from searchsvc.serving.http.local import find_local_server

    server = find_local_server(settings)
    if server is not None:
        click.echo(f"(through the server at {server.url})", err=True)
    return server


def _app(settings: Settings) -> Any:
    from searchsvc.app import App  # imports torch: only for commands that need it

    return App(settings)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    help="Data folder (overrides SEARCHSVC_HOME; default ./.searchsvc).",
)
@click.pass_context
def main(ctx: click.Context, home: Path | None) -> None:
    """Image search for product catalogs: ingest product photos, query with a photo.

    Settings come from SEARCHSVC_* environment variables and an optional TOML file
    (SEARCHSVC_CONFIG, or searchsvc.toml in the home folder); see the README.
    """
    ctx.obj = {"home": home}


@main.command()
@click.argument("catalog", type=click.Path(path_type=Path))
@click.option("--sync", is_flag=True, help="Remove from the index what the catalog no longer has.")
@click.option(
    "--max-delete",
    metavar="N|FRACTION",
    help="With --sync: remove at most N images (an integer) or this share of the catalog "
    "(0.5 or 50%%); default SEARCHSVC_SYNC_MAX_DELETE_FRACTION.",
)
@click.option("--force", is_flag=True, help="With --sync: no limit on what it removes.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per embed task.")
@click.option("--no-progress", is_flag=True, help="No progress bar (summary only).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
@handle_errors
def ingest(
    ctx: click.Context,
    catalog: Path,
    sync: bool,
    max_delete: str | None,
    force: bool,
    batch_size: int | None,
    no_progress: bool,
    as_json: bool,
) -> None:
    """Register CATALOG's products and images, embed new or changed images, index them.

    CATALOG is a folder with one sub-folder of images per product (named by product id)
    and an optional products.csv or products.jsonl. Re-running skips unchanged images.
    """
    from searchsvc.storage.catalog import open_catalog

    if (max_delete is not None or force) and not sync:
        raise click.UsageError("--max-delete and --force only apply with --sync")
    if max_delete is not None and force:
        raise click.UsageError("give --max-delete or --force, not both")
    limit = _delete_limit(max_delete, force)
    settings = _settings(ctx, batch_size=batch_size)
    open_catalog(catalog)
    server = _local_server(settings)
    if server is not None:
        from searchsvc.jobs.ingest import IngestSummary
        from searchsvc.storage.catalog import CatalogProblem

        answer = server.call(
            "POST",
            "/v1/ingest",
            {
                "catalog": str(catalog.resolve()),
                "sync": sync,
                "max_delete": max_delete,
                "force": force,
            },
            timeout=None,
        )
        problems = [CatalogProblem(p["item"], p["reason"]) for p in answer.pop("problems")]
        summary = IngestSummary(**answer, problems=problems)
    else:
        summary = _ingest_here(
            settings, catalog, sync=sync, max_delete=limit, no_progress=no_progress or as_json
        )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "run_id": summary.run_id,
                    **summary.counts(),
                    "problems": [{"item": p.item, "reason": p.reason} for p in summary.problems],
                },
                indent=2,
            )
        )
        return
    click.echo(
        f"ingest run {summary.run_id}: {summary.images_seen} images of "
        f"{summary.products_seen} products in {summary.seconds:.1f} s"
    )
    click.echo(
        f"  new {summary.images_new}, changed {summary.images_changed}, "
        f"unchanged {summary.images_unchanged}, embedded {summary.images_embedded}, "
        f"failed {summary.images_failed}, removed {summary.images_removed}"
    )
    if summary.problem_count:
        click.echo(f"  {summary.problem_count} problems:")
        for problem in summary.problems[:PROBLEMS_SHOWN]:
            click.echo(f"    {problem.item}: {problem.reason}")
        if summary.problem_count > PROBLEMS_SHOWN:
            click.echo(f"    ... and {summary.problem_count - PROBLEMS_SHOWN} more")


def _delete_limit(max_delete: str | None, force: bool) -> Any:
    """``--max-delete`` / ``--force`` as a DeleteLimit (None: the setting's default)."""
    from searchsvc.jobs.ingest import DeleteLimit, parse_delete_limit

    if force:
        return DeleteLimit()
    if max_delete is None:
        return None
    try:
        return parse_delete_limit(max_delete)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-delete") from None


def _ingest_here(
    settings: Settings, catalog: Path, *, sync: bool, max_delete: Any, no_progress: bool
) -> Any:
    """The ingest in this process (no server owns the store), with a progress bar."""
    from searchsvc.storage.catalog import count_image_files

    app = _app(settings)
    try:
        progress = None
        bar = None
        if not no_progress:
            from tqdm import tqdm

            from searchsvc.core.progress import bar_disabled

            bar = tqdm(
                total=count_image_files(
                    catalog, follow_outside=settings.follow_symlinks_outside_catalog
                ),
                unit="img",
                desc="ingest",
                file=sys.stderr,
                disable=bar_disabled(True),
            )

            def progress(done: int, failed: int) -> None:
                assert bar is not None
                bar.update(done - bar.n)
                bar.set_postfix(failed=failed, refresh=False)

        try:
            return app.ingest(
                catalog,
                sync=sync,
                progress=progress,
                max_delete=max_delete,
                notice=lambda message: click.echo(f"warning: {message}", err=True),
            )
        finally:
            if bar is not None:
                bar.close()
    finally:
        app.close()


def _parse_filters(values: tuple[str, ...]) -> dict[str, str]:
    filters: dict[str, str] = {}
    for value in values:
        key, sep, wanted = value.partition("=")
        if not sep or not key or not wanted:
            raise SearchsvcError(f"--filter {value!r}: expected FIELD=VALUE, e.g. category=shoes")
        if key not in {"category", "product_id"}:
            raise SearchsvcError(f"--filter {value!r}: can filter on category or product_id")
        filters[key] = wanted
    return filters


@main.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--top-k", type=click.IntRange(min=1), help="Products to return (SEARCHSVC_TOP_K).")
@click.option(
    "--filter",
    "filters",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Only products whose FIELD equals VALUE (category or product_id); repeatable.",
)
@click.option("--no-rerank", is_flag=True, help="Return the first-stage ranking.")
@click.option(
    "--rerank-top-n",
    type=click.IntRange(min=2),
    help="How many first-stage results the reranker re-sorts (SEARCHSVC_RERANK_TOP_N).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@handle_errors
def query(
    ctx: click.Context,
    image: Path,
    top_k: int | None,
    filters: tuple[str, ...],
    no_rerank: bool,
    rerank_top_n: int | None,
    as_json: bool,
) -> None:
    """Find the products that match the photo IMAGE, best first."""
    from searchsvc.core.images import read_image_bytes

    settings = _settings(ctx)
    wanted = _parse_filters(filters)
    data = read_image_bytes(image, settings.max_image_bytes)
    server = _local_server(settings)
    if server is not None:
        import base64
        import urllib.parse
        from types import SimpleNamespace

        params = {
            k: v
            for k, v in {
                **wanted,
                "top_k": top_k,
                "rerank": "false" if no_rerank else None,
                "rerank_top_n": rerank_top_n,
            }.items()
            if v is not None
        }
        answer = server.call(
            "POST",
            "/v1/search?" + urllib.parse.urlencode(params),
            {"image_b64": base64.b64encode(data).decode()},
            timeout=settings.api_request_timeout_s + 10,
        )
        # The answer as attributes, without importing the query path (and torch) here.
        response = SimpleNamespace(
            **{**answer, "results": [SimpleNamespace(**r) for r in answer["results"]]},
            to_json=lambda: answer,
        )
    else:
        app = _app(settings)
        try:
            response = app.search_service().query(
                data,
                str(image),
                top_k=top_k,
                filters=wanted,
                rerank=False if no_rerank else None,
                rerank_top_n=rerank_top_n,
            )
        finally:
            app.close()
    if as_json:
        click.echo(json.dumps(response.to_json(), indent=2))
        return
    rerank_note = (
        f"reranked by {response.reranker}"
        if response.reranked
        else f"not reranked ({response.rerank_reason})"
    )
    click.echo(f"query {response.query_id}  embedder v{response.embedder_version}, {rerank_note}")
    if not response.results:
        click.echo("  no matching products")
    else:
        click.echo(
            f"  {'#':>3}  {'product':<20} {'score':>7} {'1st':>4} {'stir':>7}  title [category]"
        )
    for r in response.results:
        stir = "-" if r.stir_score is None else f"{r.stir_score:.4f}"
        label = r.title or ""
        if r.category:
            label += f" [{r.category}]"
        click.echo(
            f"  {r.rank:>3}  {r.product_id:<20} {r.score:>7.4f} {r.first_stage_rank:>4} "
            f"{stir:>7}  {label}"
        )
    t = response.timings_ms
    # Not reranked, the stage still spent time (finding which reranker is active, or a
    # worker that failed): shown, but not as a rerank.
    rerank_label = "rerank" if response.reranked else "not reranked, stage"
    click.echo(
        f"  time: decode+embed {t['decode_embed']:.1f} ms | vector search "
        f"{t['vector_search']:.1f} ms | {rerank_label} {t['rerank']:.1f} ms | "
        f"total {t['total']:.1f} ms"
    )
    click.echo(f"  feedback: searchsvc feedback {response.query_id} PRODUCT_ID [--negative]")


@main.command()
@click.argument("query_id")
@click.argument("product_id")
@click.option("--negative", is_flag=True, help="The product was a wrong answer for this query.")
@click.pass_context
@handle_errors
def feedback(ctx: click.Context, query_id: str, product_id: str, negative: bool) -> None:
    """Record that PRODUCT_ID was the right (or, with --negative, a wrong) answer to QUERY_ID."""
    from searchsvc.serving.feedback import record_feedback
    from searchsvc.storage.db import Database

    settings = _settings(ctx)
    server = _local_server(settings)
    if server is not None:
        body = {"query_id": query_id, "product_id": product_id, "positive": not negative}
        feedback_id = server.call("POST", "/v1/feedback", body, timeout=30)["feedback_id"]
    else:
        db = Database(settings.sqlalchemy_url)
        try:
            feedback_id = record_feedback(db, query_id, product_id, positive=not negative)
        finally:
            db.dispose()
    kind = "negative" if negative else "positive"
    click.echo(f"feedback {feedback_id}: {kind} for product {product_id} on query {query_id}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@handle_errors
def status(ctx: click.Context, as_json: bool) -> None:
    """Products, images by status, indexed points, active models, where data lives."""
    settings = _settings(ctx)
    server = _local_server(settings)
    if server is not None:
        report = server.call("GET", "/v1/status", timeout=30)
    else:
        app = _app(settings)
        try:
            report = app.status()
        finally:
            app.close()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"products: {report['products']}")
    images = report["images"]
    click.echo(
        "images: "
        + (", ".join(f"{name} {count}" for name, count in sorted(images.items())) or "none")
    )
    click.echo(f"indexed points: {report['indexed_points']} (collection {report['collection']})")
    for model in report["active_models"]:
        click.echo(f"active {model['kind']}: v{model['id']} {model['arch']} ({model['file']})")
    for name, where in report["locations"].items():
        if where:
            click.echo(f"{name}: {where}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Server processes (more than 1 needs a Qdrant server: cluster settings).",
)
@click.pass_context
@handle_errors
def serve(ctx: click.Context, host: str, port: int, workers: int) -> None:
    """Run the HTTP search API and its page (http://HOST:PORT/; API docs at /docs)."""
    from searchsvc.app import serve as run_server

    run_server(_settings(ctx), host=host, port=port, workers=workers)


@main.command()
@click.option("--apply", is_flag=True, help="Remove what is found (default: a dry run).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@handle_errors
def cleanup(ctx: click.Context, apply: bool, as_json: bool) -> None:
    """Old collections, orphaned pixels, finished retrain runs, query photos past
    SEARCHSVC_QUERY_RETENTION_DAYS: reported, and removed with --apply."""
    from searchsvc.jobs.cleanup import cleanup as run_cleanup

    settings = _settings(ctx)
    app = _app(settings)
    try:
        report = run_cleanup(
            settings,
            app.db,
            app.pixels,
            lambda: app.index("write" if apply else "read"),
            apply=apply,
        )
    finally:
        app.close()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    for line in report.lines():
        click.echo(line)


@main.command("eval")
@click.option(
    "--queries",
    type=click.Path(file_okay=False, path_type=Path),
    help="Labelled query photos (a folder per product, or files named PRODUCT__*.jpg) to run "
    "against the live index; without it, the catalog's validation split.",
)
@click.option(
    "--split",
    "side",
    type=click.Choice(["val", "train"]),
    help="Which side of the catalog split (SEARCHSVC_SPLIT_SEED, SEARCHSVC_VAL_FRACTION); "
    "default val. With --queries: only the photos of that side's products (val: products "
    "the retrain never trained on); default all photos.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write an HTML report with pictures to REPORT/index.html (opens offline): "
    "sampled queries beside their top 5 before and after STIR, CMC@k curves, the "
    "fusion-weight calibration curve.",
)
@click.option(
    "--report-sample",
    default=12,
    show_default=True,
    type=click.IntRange(min=1),
    help="Queries the report shows, drawn by --report-seed before any result is seen.",
)
@click.option("--report-seed", default=0, show_default=True, type=int)
@click.pass_context
@handle_errors
def eval_command(
    ctx: click.Context,
    queries: Path | None,
    side: str | None,
    as_json: bool,
    report_dir: Path | None,
    report_sample: int,
    report_seed: int,
) -> None:
    """Retrieval quality of the serving models: CMC@1/5/10, precision@5, mAP@5/10, for the
    embedder alone and with the active STIR reranking the top 5 and 10 (STIR.md metrics)."""
    from searchsvc.learning import evaluation

    settings = _settings(ctx)
    if report_dir is not None:
        showcase = _write_eval_report(
            settings, queries, side, report_dir, report_sample, report_seed
        )
        if not as_json:
            click.echo("\n".join(showcase))
    record: dict[str, Any]
    if queries is not None:
        query_set = evaluation.load_query_set(queries)
        if side is not None:
            query_set = evaluation.queries_on_side(query_set, settings, side)
        app = _app(settings)
        try:
            search = app.search_service(app.in_process_rerank_stage(), record_queries=False)
            report = evaluation.evaluate_live(search, query_set, max_bytes=settings.max_image_bytes)
        finally:
            app.close()
        record = {
            "source": "live index",
            "queries": str(queries),
            "products": f"{side} side of the split" if side else "all",
        }
    else:
        side = side or "val"
        from searchsvc.storage.db import Database
        from searchsvc.storage.pixels import open_pixel_store

        database = Database(settings.sqlalchemy_url)
        pixel_store = open_pixel_store(settings, database)
        try:
            report, split = evaluation.evaluate_served_on_split(
                settings, database, pixel_store, side=side
            )
        finally:
            pixel_store.close()
            database.dispose()
        record = {"source": f"catalog split ({side})", "split": split}
    if as_json:
        click.echo(json.dumps({**record, **report.to_json()}, indent=2))
        return
    models = ", ".join(f"{kind} {version}" for kind, version in report.models.items())
    click.echo(
        f"{record['source']}: {report.n_queries} queries ({report.n_skipped} without a relevant "
        f"image), gallery {report.n_gallery} images; models: {models}"
    )
    if report.unreadable:
        click.echo(f"  {report.unreadable} images could not be read")
    click.echo(evaluation.format_table({"serving": report}))


def _write_eval_report(
    settings: Settings,
    queries: Path | None,
    side: str | None,
    report_dir: Path,
    sample: int,
    seed: int,
) -> list[str]:
    """Write the HTML report; returns its sampled queries as text lines."""
    from searchsvc.learning import evaluation, report
    from searchsvc.storage.db import Database
    from searchsvc.storage.pixels import open_pixel_store

    database = Database(settings.sqlalchemy_url)
    pixel_store = open_pixel_store(settings, database)
    try:
        if queries is not None:
            query_set = evaluation.load_query_set(queries)
            if side is not None:
                query_set = evaluation.queries_on_side(query_set, settings, side)
            eval_set = evaluation.query_photos_eval_set(settings, database, query_set, pixel_store)
            which = f"of {side}-side products " if side else ""
            source = f"query photos {which}in {queries} against every indexed catalog image"
        else:
            side = side or "val"
            eval_set, _ = evaluation.split_eval_set(settings, database, pixel_store, side=side)
            source = (
                f"catalog split ({side} side): every catalog image queries the others, "
                "logged query photos query them all"
            )
        embedder, stir, models = evaluation.served_models(settings, database)
        quality = report.build_report(
            eval_set,
            embedder,
            stir,
            title="searchsvc retrieval quality",
            source=source,
            models=models,
            top_n=settings.rerank_top_n,
            sample=sample,
            seed=seed,
            batch_size=settings.batch_size,
        )
    finally:
        pixel_store.close()
        database.dispose()
    page = report.write_report(quality, report_dir)
    return [f"report: {page}", *report.showcase_lines(quality, eval_set)]


@main.command("demo-catalog")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--products", default=300, show_default=True, type=click.IntRange(min=1))
@click.option("--views", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.pass_context
@handle_errors
def demo_catalog(ctx: click.Context, out: Path, products: int, views: int, seed: int) -> None:
    """Write a demo catalog of real Fashion-MNIST articles to OUT/catalog, with held-out
    query photos in OUT/queries (each photo a seeded camera change of the article)."""
    from searchsvc.learning.datasets import write_demo_catalog

    settings = _settings(ctx)
    catalog, queries = write_demo_catalog(
        out, products=products, views=views, seed=seed, cache_dir=settings.home / "datasets"
    )
    click.echo(f"catalog: {catalog} ({products} products x {views} photos)")
    click.echo(f"queries: {queries}")


@main.group()
def model() -> None:
    """Model versions: list them, add a reranker file, choose the active reranker."""


@model.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@handle_errors
def model_list(ctx: click.Context, as_json: bool) -> None:
    """Every model version, newest first."""
    from sqlalchemy import select

    from searchsvc.storage.db import Database, ModelVersion

    database = Database(_settings(ctx).sqlalchemy_url)
    try:
        with database.session() as session:
            rows = [
                {
                    "id": row.id,
                    "kind": row.kind.value,
                    "arch": row.arch,
                    "active": row.active,
                    "file": row.file,
                    "metrics": row.metrics,
                    "notes": row.notes,
                }
                for row in session.scalars(select(ModelVersion).order_by(ModelVersion.id.desc()))
            ]
    finally:
        database.dispose()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        flag = "*" if row["active"] else " "
        click.echo(f"{flag} v{row['id']:<4} {row['kind']:<9} {row['arch']:<40} {row['file']}")


@model.command("add")
@click.argument("kind", type=click.Choice(["stir"]))
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--activate", is_flag=True, help="Serve it from now on.")
@click.option("--notes", help="Free text kept with the version.")
@click.pass_context
@handle_errors
def model_add(ctx: click.Context, kind: str, file: Path, activate: bool, notes: str | None) -> None:
    """Register a model FILE (safetensors, its JSON config beside it) as a new version.

    Embedders enter through the retrain, which fills their collection before the switch."""
    from searchsvc.jobs.model_files import register_version
    from searchsvc.storage.db import Database, ModelKind

    settings = _settings(ctx)
    database = Database(settings.sqlalchemy_url)
    try:
        version = register_version(
            database, settings, ModelKind(kind), file, activate=activate, notes=notes
        )
    finally:
        database.dispose()
    click.echo(f"{kind} version {version} registered" + (" and active" if activate else ""))


@model.command("activate")
@click.argument("version", type=int)
@click.pass_context
@handle_errors
def model_activate(ctx: click.Context, version: int) -> None:
    """Make reranker VERSION the active one (no restart: workers reload it)."""
    from searchsvc.storage.db import Database, ModelKind, ModelVersion
    from searchsvc.storage.versions import activate_version

    database = Database(_settings(ctx).sqlalchemy_url)
    try:
        with database.session() as session:
            row = session.get(ModelVersion, version)
            if row is not None and row.kind != ModelKind.STIR:
                raise SearchsvcError(
                    f"model version {version} is an embedder: embedders are switched by the "
                    "retrain, which re-embeds the catalog first"
                )
        activate_version(database, version)
    finally:
        database.dispose()
    click.echo(f"version {version} is active")


@model.command("deactivate-reranker")
@click.pass_context
@handle_errors
def model_deactivate(ctx: click.Context) -> None:
    """Serve queries by the first stage alone until a reranker is activated again."""
    from searchsvc.storage.db import Database, ModelKind
    from searchsvc.storage.versions import deactivate_kind

    database = Database(_settings(ctx).sqlalchemy_url)
    try:
        deactivate_kind(database, ModelKind.STIR)
    finally:
        database.dispose()
    click.echo("no reranker is active")


@main.group()
def db() -> None:
    """The metadata database's schema (Alembic migrations)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.pass_context
@handle_errors
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Migrate the database to REVISION (also done automatically on first use)."""
    from searchsvc.storage.db import Database

    settings = _settings(ctx)
    database = Database(settings.sqlalchemy_url, auto_migrate=False)
    try:
        database.upgrade(revision)
        click.echo(f"database at revision {database.current_revision()}")
    finally:
        database.dispose()


@db.command("current")
@click.pass_context
@handle_errors
def db_current(ctx: click.Context) -> None:
    """Print the database's current migration revision."""
    from searchsvc.storage.db import Database

    settings = _settings(ctx)
    database = Database(settings.sqlalchemy_url, auto_migrate=False)
    try:
        current, head = database.current_revision(), database.head_revision()
        note = "" if current == head else f" (newest: {head}; run 'searchsvc db upgrade')"
        click.echo((current or "none (empty database)") + note)
    finally:
        database.dispose()


if __name__ == "__main__":
    main()
