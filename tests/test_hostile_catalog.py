"""The hostile catalog (issue 17): every kind of bad input a file share produces, plus the
broken-file corpus of the end-to-end tests, ingested by the real CLI in a subprocess on
SQLite and on PostgreSQL. It must end (the subprocess timeout is the bound: an opened pipe
would block forever), exit 0, name each hostile item, index every good image, and open
nothing outside the catalog (an audit hook in the subprocess reports every file opened)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from catalog_factory import make_catalog
from PIL import Image
from sqlalchemy import select
from test_db import DEFAULT_PG_URL, PG_ENV, PostgresServer
from test_embedded_e2e import _salt_with_broken_files

from searchsvc.storage.db import Database
from searchsvc.storage.db import Image as ImageRow

REPO = Path(__file__).resolve().parent.parent
INGEST_BOUND_S = 300

# Runs the CLI with an audit hook: every file the process opens under SEARCHSVC_TEST_WATCH
# is printed to stderr, so the test sees what was read, not only what was stored.
AUDITED_CLI = """
import os, sys
watch = os.environ["SEARCHSVC_TEST_WATCH"]
def hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if path.startswith(watch):
            sys.stderr.write("OPENED " + repr(path) + "\\n")
sys.addaudithook(hook)
from searchsvc.cli import main
main(["ingest", sys.argv[1], "--json"])
"""


def build_hostile_catalog(tmp_path: Path) -> tuple[Path, Path, dict[str, str], int]:
    """Returns (catalog, the private folder outside it, item -> a word its reason must
    hold, how many good images it holds)."""
    generated = make_catalog(tmp_path / "catalog", products=12, views=2)
    root = generated.root
    expected = _salt_with_broken_files(root)
    good = 12 * 2 + 1  # + the corpus's PNG named .jpg, which is a fine image

    # Metadata as JSONL (deep nesting is a JSON thing); the corpus's two bad CSV rows
    # become their JSONL equivalents.
    (root / "products.csv").unlink()
    del expected["products.csv line 14"], expected["products.csv line 15"]
    lines = [
        json.dumps({"product_id": pid, "title": f"Product {n}", "category": "shoes"})
        for n, pid in enumerate(generated.product_ids)
    ]
    hostile_rows = {
        '{"product_id": "p001", "price": "not-a-number"}': "price",
        '{"product_id": "p002", "price": ' + "9" * 5000 + "}": "invalid JSON",
        '{"product_id": "p003", "spec": ' + "[" * 100_000 + "]" * 100_000 + "}": "deeply",
        json.dumps({"product_id": "p004", "spec": _nested(40)}): "nested deeper",
        '{"product_id": "p005", "title": "nul\\u0000"}': "NUL",
        '{"product_id": "p006", "title": "half \\ud800"}': "UTF-8",
        json.dumps({"product_id": "p007", "category": "c" * 300}): "longer than 255",
        json.dumps({"product_id": "p008", "category": "two\nlines"}): "line breaks",
        json.dumps({"product_id": "p009", "notes": "n" * 70_000}): "extra columns",
    }
    for number, (line, word) in enumerate(hostile_rows.items(), start=len(lines) + 1):
        lines.append(line)
        expected[f"products.jsonl line {number}"] = word
    lines.append(json.dumps({"product_id": "p010", "title": "Two\nline title"}))  # fine
    (root / "products.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    # Names that are not UTF-8 or hold control characters.
    raw_root = os.fsencode(root)
    for raw in (b"/caf\xe9", b"/esc\x1bape"):
        os.makedirs(raw_root + raw)
        Image.new("RGB", (32, 32), "red").save(os.fsdecode(raw_root + raw + b"/a.png"))
    expected["caf\\xe9"] = "UTF-8"
    expected["esc\\x1bape"] = "control characters"
    Image.new("RGB", (32, 32), "red").save(os.fsdecode(raw_root + b"/p000/b\xff.png"))
    expected["p000/b\\xff.png"] = "UTF-8"

    # Not regular files: a pipe and a device, never to be opened.
    os.mkfifo(root / "p001" / "pipe.jpg")
    expected["p001/pipe.jpg"] = "named pipe"
    os.mknod(root / "p001" / "device.png", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    expected["p001/device.png"] = "character device"

    # Symbolic links: out of the catalog (to a real image, whose content would be indexed
    # if it were read), looping, dangling; and one inside, which is read.
    private = tmp_path / "private"
    private.mkdir()
    Image.new("RGB", (48, 48), "purple").save(private / "secret.png")
    os.symlink(private / "secret.png", root / "p002" / "secret.png")
    os.symlink(private, root / "p-elsewhere")
    os.symlink("loop-b.png", root / "p003" / "loop-a.png")
    os.symlink("loop-a.png", root / "p003" / "loop-b.png")
    os.symlink("gone.png", root / "p003" / "dangling.png")
    os.symlink("view1.png", root / "p004" / "alias.png")
    good += 1
    expected.update(
        {
            "p002/secret.png": "outside the catalog",
            "p-elsewhere": "outside the catalog",
            "p003/loop-a.png": "loop",
            "p003/loop-b.png": "loop",
            "p003/dangling.png": "dangling",
        }
    )

    # Formats outside the allowed list: by suffix, and by content under an allowed suffix.
    Image.new("RGB", (32, 32), "green").save(root / "p008" / "scan.tiff")
    Image.new("RGB", (32, 32), "green").save(root / "p008" / "scan.png", format="TIFF")
    expected["p008/scan.tiff"] = "not an image file"
    expected["p008/scan.png"] = "TIFF is not accepted"

    # The same bytes under two names of one product: both indexed, one point.
    shutil.copyfile(root / "p009" / "view0.jpg", root / "p009" / "copy.jpg")
    good += 1
    return root, private, expected, good


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = {"x": value}
    return value


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield ""  # the default: SQLite under SEARCHSVC_HOME
        return
    raw = os.environ.get(PG_ENV, "").strip() or DEFAULT_PG_URL
    if raw.lower() == "skip":
        pytest.skip(f"{PG_ENV}=skip")
    server = PostgresServer(raw)
    try:
        yield server.new_url()
    finally:
        server.drop_created()
        server.admin.dispose()


def test_hostile_catalog_ingests_names_every_item_and_reads_nothing_outside(
    tmp_path: Path, database_url: str
) -> None:
    root, private, expected, good = build_hostile_catalog(tmp_path)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEARCHSVC_")}
    env.update(
        {
            "SEARCHSVC_HOME": str(home),
            "SEARCHSVC_MAX_IMAGE_PIXELS": str(2000 * 2000),  # the corpus's huge.png
            "SEARCHSVC_TEST_WATCH": str(tmp_path),
            "OMP_NUM_THREADS": "1",
        }
    )
    if database_url:
        env["SEARCHSVC_DATABASE_URL"] = database_url
    process = subprocess.run(
        [sys.executable, "-c", AUDITED_CLI, str(root)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=INGEST_BOUND_S,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    summary = json.loads(process.stdout)
    problems = {p["item"].split("catalog/")[-1]: p["reason"] for p in summary["problems"]}
    for item, word in expected.items():
        assert item in problems, f"{item} not named; named: {sorted(problems)}"
        assert word in problems[item], f"{item}: {problems[item]!r} lacks {word!r}"

    opened = [line for line in process.stderr.splitlines() if line.startswith("OPENED ")]
    assert any("p000/view0.jpg" in line for line in opened)  # the hook does see reads
    assert not [line for line in opened if str(private) in line]
    assert not [line for line in opened if "pipe.jpg" in line or "device.png" in line]

    db = Database(database_url or f"sqlite:///{home / 'searchsvc.db'}")
    try:
        with db.session() as session:
            found = session.execute(
                select(ImageRow.product_id, ImageRow.filename, ImageRow.status)
            ).all()
    finally:
        db.dispose()
    indexed = {f"{p}/{f}" for p, f, s in found if s.value == "indexed"}
    assert len(indexed) == good == summary["images_embedded"]
    assert {"p004/alias.png", "p009/copy.jpg", "p007/mislabelled.jpg"} <= indexed
    assert {"p002/secret.png", "p001/pipe.jpg"}.isdisjoint({f"{p}/{f}" for p, f, _ in found})
