"""Reading a catalog folder: metadata rows, problems that name the line, image listing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from searchsvc.core.errors import CatalogError
from searchsvc.storage.catalog import (
    CatalogImage,
    CatalogProblem,
    ProductRecord,
    count_image_files,
    iter_images,
    iter_metadata,
    open_catalog,
)


def records(items: list[ProductRecord | CatalogProblem]) -> list[ProductRecord]:
    return [item for item in items if isinstance(item, ProductRecord)]


def problems(items: list) -> list[CatalogProblem]:
    return [item for item in items if isinstance(item, CatalogProblem)]


def write_csv(root: Path, text: str) -> list[ProductRecord | CatalogProblem]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "products.csv").write_text(text, encoding="utf-8")
    return list(iter_metadata(root))


def write_jsonl(root: Path, lines: list[str]) -> list[ProductRecord | CatalogProblem]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "products.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return list(iter_metadata(root))


# --- products.csv ------------------------------------------------------------------------


def test_csv_known_and_extra_columns(tmp_path: Path):
    items = write_csv(
        tmp_path,
        "product_id,title,category,price,url,colour,size\n"
        "p1,Red shoe,shoes,19.90,https://shop/p1,red,42\n"
        "p2,,, ,,,\n",
    )
    assert problems(items) == []
    first, second = records(items)
    assert first == ProductRecord(
        product_id="p1",
        title="Red shoe",
        category="shoes",
        price=19.9,
        url="https://shop/p1",
        attributes={"colour": "red", "size": "42"},
    )
    assert second.product_id == "p2"
    assert (second.title, second.category, second.price, second.url) == (None,) * 4
    assert set(second.attributes) == {"colour", "size"}


def test_csv_header_names_are_trimmed_and_order_is_free(tmp_path: Path):
    items = write_csv(tmp_path, " price , product_id ,title\n5,p1,Bag\n")
    assert records(items) == [ProductRecord(product_id="p1", title="Bag", price=5.0)]


def test_csv_with_only_product_id(tmp_path: Path):
    items = write_csv(tmp_path, "product_id\np1\np2\n\n")
    assert [r.product_id for r in records(items)] == ["p1", "p2"]
    assert problems(items) == []


def test_csv_with_byte_order_mark(tmp_path: Path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "products.csv").write_bytes(
        b"\xef\xbb\xbfproduct_id,title\r\np1,Shoe\r\n"  # as spreadsheet programs export
    )
    assert records(list(iter_metadata(tmp_path))) == [ProductRecord("p1", title="Shoe")]


def test_csv_quoted_fields(tmp_path: Path):
    items = write_csv(tmp_path, 'product_id,title\np1,"Shoe, red ""classic"""\n')
    assert records(items)[0].title == 'Shoe, red "classic"'


def test_csv_without_product_id_column(tmp_path: Path):
    items = write_csv(tmp_path, "id,title\np1,Shoe\n")
    assert items == [CatalogProblem("products.csv line 1", "header has no 'product_id' column")]
    assert str(items[0]).startswith("products.csv line 1: ")


def test_empty_csv_yields_nothing(tmp_path: Path):
    assert write_csv(tmp_path, "") == []


def test_csv_bad_rows_are_reported_and_the_rest_come_through(tmp_path: Path):
    items = write_csv(
        tmp_path,
        "product_id,title,price\n"  # line 1
        "p1,Shoe,10\n"  # line 2: fine
        "p2,Bag\n"  # line 3: too few fields
        "p3,Hat,12,extra\n"  # line 4: too many fields
        "p4,Scarf,cheap\n"  # line 5: not a number
        "p5,Sock,-1\n"  # line 6: negative
        "p6,Belt,nan\n"  # line 7: not finite
        "a/b,Slash,1\n"  # line 8: '/' in id
        ",Nameless,1\n"  # line 9: empty id
        " p9,Spaced,1\n"  # line 10: leading space
        "p10,Coat,99.5\n",  # line 11: fine
    )
    assert [r.product_id for r in records(items)] == ["p1", "p10"]
    found = {p.item: p.reason for p in problems(items)}
    assert set(found) == {f"products.csv line {n}" for n in range(3, 11)}
    assert "has 2 fields, the header has 3" in found["products.csv line 3"]
    assert "has 4 fields, the header has 3" in found["products.csv line 4"]
    assert "'price' is not a number" in found["products.csv line 5"]
    assert "'cheap'" in found["products.csv line 5"]
    assert "non-negative" in found["products.csv line 6"]
    assert "'-1'" in found["products.csv line 6"]
    assert "finite" in found["products.csv line 7"]
    assert "'/'" in found["products.csv line 8"]
    assert "empty product_id" in found["products.csv line 9"]
    assert "spaces" in found["products.csv line 10"]


def test_csv_price_forms(tmp_path: Path):
    items = write_csv(tmp_path, "product_id,price\na,0\nb,1e2\nc, 3.25 \nd,\n")
    assert [r.price for r in records(items)] == [0.0, 100.0, 3.25, None]


def test_csv_product_id_too_long(tmp_path: Path):
    items = write_csv(tmp_path, f"product_id\n{'x' * 256}\n{'y' * 255}\n")
    assert [r.product_id for r in records(items)] == ["y" * 255]
    assert "longer than 255" in problems(items)[0].reason


def test_non_utf8_metadata_is_a_problem_not_a_crash(tmp_path: Path):
    (tmp_path / "products.csv").write_bytes(b"product_id,title\np1,ok\np2,\xff\xfe\n")
    items = list(iter_metadata(tmp_path))
    assert problems(items)[-1].item == "products.csv"
    assert "UTF-8" in problems(items)[-1].reason


def test_no_metadata_file_yields_nothing(tmp_path: Path):
    assert list(iter_metadata(tmp_path)) == []


# --- products.jsonl ------------------------------------------------------------------------


def test_jsonl_records(tmp_path: Path):
    items = write_jsonl(
        tmp_path,
        [
            json.dumps(
                {
                    "product_id": "p1",
                    "title": "Shoe",
                    "category": "shoes",
                    "price": 12,
                    "url": "https://shop/p1",
                    "tags": ["a", "b"],
                    "stock": 3,
                }
            ),
            "",
            json.dumps({"product_id": 42, "price": "7.5", "title": "  "}),
            json.dumps({"product_id": "p3", "price": None, "title": None}),
        ],
    )
    assert problems(items) == []
    first, second, third = records(items)
    assert first == ProductRecord(
        "p1", "Shoe", "shoes", 12.0, "https://shop/p1", {"tags": ["a", "b"], "stock": 3}
    )
    assert (second.product_id, second.price, second.title) == ("42", 7.5, None)
    assert (third.product_id, third.price, third.title) == ("p3", None, None)


def test_jsonl_bad_lines_are_reported_and_the_rest_come_through(tmp_path: Path):
    items = write_jsonl(
        tmp_path,
        [
            '{"product_id": "ok1"}',  # line 1
            '{"product_id": "p2", ',  # line 2: invalid JSON
            '["p3"]',  # line 3: not an object
            '{"product_id": "p/4"}',  # line 4: '/'
            '{"product_id": ""}',  # line 5: empty id
            '{"title": "no id"}',  # line 6: missing id
            '{"product_id": true}',  # line 7: a bool is not an id
            '{"product_id": "p8", "price": -3}',  # line 8: negative price
            '{"product_id": "p9", "price": "abc"}',  # line 9: bad price
            '{"product_id": "p10", "price": true}',  # line 10: bool price
            '{"product_id": "p11", "title": {"x": 1}}',  # line 11: title not text
            '{"product_id": "ok2"}',  # line 12
        ],
    )
    assert [r.product_id for r in records(items)] == ["ok1", "ok2"]
    found = {p.item: p.reason for p in problems(items)}
    assert set(found) == {f"products.jsonl line {n}" for n in range(2, 12)}
    assert "invalid JSON" in found["products.jsonl line 2"]
    assert "JSON object" in found["products.jsonl line 3"]
    assert "'/'" in found["products.jsonl line 4"]
    assert "empty product_id" in found["products.jsonl line 5"]
    assert "empty product_id" in found["products.jsonl line 6"]
    assert "empty product_id" in found["products.jsonl line 7"]
    assert "non-negative" in found["products.jsonl line 8"]
    assert "not a number" in found["products.jsonl line 9"]
    assert "must be a number" in found["products.jsonl line 10"]
    assert "'title' must be text" in found["products.jsonl line 11"]


def test_jsonl_line_numbers_count_blank_lines(tmp_path: Path):
    items = write_jsonl(tmp_path, ["", "   ", "{bad"])
    assert [p.item for p in problems(items)] == ["products.jsonl line 3"]


# --- the catalog root ---------------------------------------------------------------------


def test_both_metadata_files_is_an_error(tmp_path: Path):
    (tmp_path / "products.csv").write_text("product_id\n")
    (tmp_path / "products.jsonl").write_text("")
    with pytest.raises(CatalogError) as info:
        open_catalog(tmp_path)
    assert "products.csv" in str(info.value)
    assert "products.jsonl" in str(info.value)


def test_missing_root_names_the_path(tmp_path: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CatalogError, match="not found") as info:
        open_catalog(missing)
    assert str(missing) in str(info.value)


def test_file_as_root_names_the_path(tmp_path: Path):
    file = tmp_path / "catalog.zip"
    file.write_bytes(b"PK")
    with pytest.raises(CatalogError, match="not a directory") as info:
        open_catalog(file)
    assert str(file) in str(info.value)


def test_open_catalog_returns_a_usable_root(tmp_path: Path):
    (tmp_path / "products.jsonl").write_text("")
    assert open_catalog(tmp_path) == tmp_path


def test_iter_images_on_missing_root_is_a_catalog_error(tmp_path: Path):
    with pytest.raises(CatalogError) as info:
        list(iter_images(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(info.value)


# --- images -------------------------------------------------------------------------------


@pytest.fixture
def messy_catalog(tmp_path: Path) -> Path:
    root = tmp_path / "catalog"
    for product, names in {
        "p1": ["side.png", "Back.JPG", "front.jpg", ".DS_Store", "notes.txt", "README"],
        "p2": ["a.webp", "b.gif", "c.bmp", "d.jpeg"],
        "empty": [],
    }.items():
        (root / product).mkdir(parents=True)
        for name in names:
            (root / product / name).write_bytes(b"x")
    (root / "p1" / "more").mkdir()
    (root / "p1" / "more" / "inner.jpg").write_bytes(b"x")
    (root / "p1" / "folder.jpg").mkdir()  # a sub-folder with an image suffix
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.jpg").write_bytes(b"x")
    (root / "products.csv").write_text("product_id\np1\n")
    (root / "stray.jpg").write_bytes(b"x")
    (root / ".gitignore").write_text("")
    (root / "bad id ").mkdir()  # trailing space: not a usable product id
    (root / "bad id " / "x.jpg").write_bytes(b"x")
    return root


def test_iter_images_lists_product_images_sorted(messy_catalog: Path):
    items = list(iter_images(messy_catalog))
    images = [item for item in items if isinstance(item, CatalogImage)]
    by_product: dict[str, list[str]] = {}
    for image in images:
        by_product.setdefault(image.product_id, []).append(image.filename)
        assert image.path == messy_catalog / image.product_id / image.filename
    assert by_product == {
        "p1": ["Back.JPG", "front.jpg", "side.png"],  # sorted, suffix case-insensitive
        "p2": ["a.webp", "b.gif", "c.bmp", "d.jpeg"],
    }


def test_iter_images_reports_what_it_skips(messy_catalog: Path):
    found = {p.item: p.reason for p in problems(list(iter_images(messy_catalog)))}
    assert set(found) == {
        "p1/notes.txt",
        "p1/README",
        "p1/more",
        "p1/folder.jpg",
        "stray.jpg",
        "bad id ",
    }
    assert "not an image file" in found["p1/notes.txt"] and "'.txt'" in found["p1/notes.txt"]
    assert "not an image file" in found["p1/README"] and "none" in found["p1/README"]
    assert "sub-folders" in found["p1/more"]
    assert "sub-folders" in found["p1/folder.jpg"]
    assert "catalog root" in found["stray.jpg"]
    assert "spaces" in found["bad id "]
    # Hidden files and folders, and the metadata file, are neither images nor problems.
    assert not any("hidden" in item or "DS_Store" in item for item in found)
    assert "products.csv" not in found


def test_count_image_files_matches_iter_images(messy_catalog: Path):
    listed = [i for i in iter_images(messy_catalog) if isinstance(i, CatalogImage)]
    assert count_image_files(messy_catalog) == len(listed) == 7


def test_count_image_files_on_a_generated_catalog(tmp_path: Path):
    from catalog_factory import make_catalog

    generated = make_catalog(tmp_path / "c", products=4, views=2)
    listed = [i for i in iter_images(generated.root) if isinstance(i, CatalogImage)]
    assert count_image_files(generated.root) == len(listed) == generated.image_count
    assert {i.product_id for i in listed} == set(generated.product_ids)
