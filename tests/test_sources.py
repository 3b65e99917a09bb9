"""Bring your own data: readers, column mapping, the Amazon Reviews 2023 preset, bad input, the CLI."""

from __future__ import annotations

import gzip
import http.server
import io
import json
import logging
import socket
import threading

import numpy as np
import pandas as pd
import pytest
from datasets import Dataset, DatasetDict
from PIL import Image

from mim_hf.cli import main as cli_main
from mim_hf.data import PreparedData, load_tables
from mim_hf.data.sources import PRESETS, parse_column_options


def _png(colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def image_server():
    """http://127.0.0.1:<port>/ok.png serves a PNG, /not-an-image.png text, anything else 404."""
    files = {"/ok.png": _png(), "/not-an-image.png": b"<html>no</html>"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"not found")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/gone.png"  # nothing listens there: connection refused


# ---------------------------------------------------------------- Amazon Reviews 2023 layout

def _amazon_files(tmp_path, server):
    """Tiny files in the layout of amazon-reviews-2023.github.io (every field of a real record)."""
    def images(url):
        return [{"thumb": url, "large": url, "hi_res": None, "variant": "MAIN"}] if url else []

    meta = [
        {"main_category": "All Beauty", "title": "Rose Shampoo", "average_rating": 4.5, "rating_number": 10,
         "features": ["smells of roses"], "description": ["A shampoo.", "With roses."], "price": 9.99,
         "images": images(f"{server}/ok.png"), "videos": [], "store": "Flora",
         "categories": ["Beauty", "Hair Care"], "details": {"Size": "250 ml"}, "parent_asin": "B01",
         "bought_together": None},
        {"main_category": "All Beauty", "title": "Mint Soap", "average_rating": 3.0, "rating_number": 2,
         "features": [], "description": [], "price": None, "images": images(f"{server}/missing.png"),
         "videos": [], "store": "Herba", "categories": ["Beauty", "Soap"], "details": {"Scent": "mint"},
         "parent_asin": "B02", "bought_together": None},
        {"main_category": "All Beauty", "title": "Plain Comb", "average_rating": 5.0, "rating_number": 1,
         "features": [], "description": [], "price": 1.5, "images": [], "videos": [], "store": None,
         "categories": [], "details": {}, "parent_asin": "B03", "bought_together": None},
        {"main_category": "All Beauty", "title": "Odd Brush", "average_rating": 4.0, "rating_number": 1,
         "features": [], "description": [], "price": 2.0, "images": images(_closed_port_url()), "videos": [],
         "store": "Herba", "categories": ["Beauty"], "details": {}, "parent_asin": "B04",
         "bought_together": None},
    ]
    reviews = [
        {"rating": float(rating), "title": "review title", "text": "review text", "images": [],
         "asin": f"{item}X", "parent_asin": item, "user_id": user, "timestamp": stamp, "helpful_vote": 0,
         "verified_purchase": True}
        for user, item, rating, stamp in [
            ("AG1", "B01", 5, 1588687728923), ("AG1", "B02", 2, 1588687800000), ("AG2", "B01", 4, 1588690000001),
            ("AG2", "B03", 3, 1588700000999), ("AG3", "B02", 5, 1588710000000), ("AG3", "B04", 4, 1588720000000),
            ("AG1", "B03", 4, 1588730000000), ("AG2", "B04", 1, 1588740000000), ("AG3", "B01", 5, 1588750000000),
            ("AG1", "B04", 5, 1588760000000),
        ]
    ]
    return _jsonl(tmp_path / "meta_All_Beauty.jsonl", meta), _jsonl(tmp_path / "All_Beauty.jsonl", reviews), reviews


def test_amazon_preset_reads_the_layout_and_fetches_images(tmp_path, image_server, caplog):
    meta, reviews_file, reviews = _amazon_files(tmp_path, image_server)
    with caplog.at_level(logging.WARNING, logger="mim_hf.data.sources"):
        data = load_tables(items=meta, interactions=reviews_file, preset="amazon-reviews-2023")

    assert data.name == "All_Beauty"
    assert data.items.column_names == ["item_id", "title", "main_category", "store", "categories", "description",
                                       "image"]
    assert data.items["item_id"] == ["B01", "B02", "B03", "B04"]
    assert data.items["categories"][0] == ["Beauty", "Hair Care"]
    image = data.items[0]["image"]
    assert image.size == (8, 8) and image.convert("RGB").getpixel((0, 0)) == (200, 30, 30)
    assert [data.items[i]["image"] for i in (1, 2, 3)] == [None, None, None]
    # 404, no image at all, connection refused: three counted missing images, no crash.
    assert data.report.missing_images == 3 and data.report.unreadable_images == 0
    assert "2 of 3 image URL(s) could not be fetched" in caplog.text and str(meta) in caplog.text

    # A mapping of yours replaces the preset's for the same column.
    rows = [{**{k: v for k, v in json.loads(line).items() if k != "images"}, "photo": f"{image_server}/ok.png"}
            for line in meta.read_text().splitlines()]
    photos = load_tables(items=_jsonl(tmp_path / "meta_photo.jsonl", rows), interactions=reviews_file,
                         preset="amazon-reviews-2023", columns={"image": "photo"})
    assert photos.report.missing_images == 0 and all(image.size == (8, 8) for image in photos.items["image"])

    frame = data.interactions.to_pandas()
    assert list(frame.columns) == ["user_id", "item_id", "timestamp", "rating", "label"]
    assert frame["item_id"].tolist() == [r["parent_asin"] for r in reviews]
    np.testing.assert_array_equal(frame["timestamp"], [r["timestamp"] // 1000 for r in reviews])  # ms -> s
    np.testing.assert_array_equal(frame["label"], [int(r["rating"] >= 4) for r in reviews])


def test_image_urls_are_not_fetched_offline(tmp_path, image_server, monkeypatch, caplog):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    meta, reviews_file, _ = _amazon_files(tmp_path, image_server)
    with caplog.at_level(logging.WARNING, logger="mim_hf.data.sources"):
        data = load_tables(items=meta, interactions=reviews_file, preset="amazon-reviews-2023")
    assert data.report.missing_images == 4
    assert "3 of 3 image URL(s) could not be fetched" in caplog.text and "HF_HUB_OFFLINE" in caplog.text


def test_amazon_preset_through_the_cli(tmp_path, image_server):
    meta, reviews_file, reviews = _amazon_files(tmp_path, image_server)
    out = tmp_path / "prepared"
    assert cli_main(["data", "prepare", "--items", str(meta), "--interactions", str(reviews_file),
                     "--preset", "amazon-reviews-2023", "--protocol", "temporal", "--out", str(out), "--json"]) == 0
    prepared = PreparedData.load(out / "temporal")
    assert prepared.name == "All_Beauty"
    assert sum(len(prepared.samples[s]) for s in ("train", "valid", "test")) == len(reviews)
    assert prepared.items["item_id"] == ["B01", "B02", "B03", "B04"]
    assert prepared.stats["fallbacks"]["missing_images"] == 3
    assert "item_categories" in prepared.vocabs and "item_store" in prepared.vocabs


# ---------------------------------------------------------------- every kind of source, one result

ITEMS = pd.DataFrame({"movie": ["007", "12", "30"], "name": ["Spy", "Twelve", "Thirty"], "genre": ["a", "b", "a"]})
LOG = pd.DataFrame({"who": ["u1", "u1", "u2", "u2", "u3"], "movie": ["007", "12", "12", "30", "007"],
                    "when": [100, 200, 150, 250, 300], "stars": [5.0, 3.0, 4.0, 1.0, 4.5]})
MAPPING = {"item_id": "movie", "user_id": "who", "timestamp": "when", "rating": "stars", "title": "name"}


def _write(frame: pd.DataFrame, path, kind: str):
    if kind == "csv":
        frame.to_csv(path, index=False)
    elif kind == "tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif kind == "parquet":
        frame.astype({c: str for c in frame.columns if c in ("movie", "who")}).to_parquet(path, index=False)
    elif kind == "jsonl.gz":
        with gzip.open(path, "wt") as handle:
            handle.write(frame.to_json(orient="records", lines=True))
    elif kind == "folder":
        Dataset.from_pandas(frame, preserve_index=False).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["csv", "tsv", "parquet", "jsonl.gz", "folder", "dataframe"])
def test_every_source_kind_gives_the_same_tables(tmp_path, kind):
    if kind == "dataframe":
        items, interactions = ITEMS, LOG
    else:
        suffix = "" if kind == "folder" else f".{kind}"
        items = _write(ITEMS, tmp_path / f"items{suffix}", kind)
        interactions = _write(LOG, tmp_path / f"log{suffix}", kind)
    data = load_tables(items=items, interactions=interactions, columns=MAPPING)
    assert data.items.to_pandas().to_dict("list") == {"item_id": ["007", "12", "30"], "title": ["Spy", "Twelve", "Thirty"],
                                                      "genre": ["a", "b", "a"]}
    frame = data.interactions.to_pandas()
    assert frame["item_id"].tolist() == ["007", "12", "12", "30", "007"]  # CSV ids keep their leading zeros
    assert frame["timestamp"].tolist() == [100, 200, 150, 250, 300]
    assert frame["rating"].tolist() == [5.0, 3.0, 4.0, 1.0, 4.5]
    assert frame["label"].tolist() == [1, 0, 1, 0, 1]


def test_a_hub_dataset_id(tmp_path, hub_server):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    ids = {}
    for role, frame in (("items", ITEMS), ("log", LOG)):
        ids[role] = api.create_repo(f"{hub_server.user}/tiny-{role}", repo_type="dataset").repo_id
        api.upload_file(path_or_fileobj=frame.to_json(orient="records", lines=True).encode(),
                        path_in_repo="data.jsonl", repo_id=ids[role], repo_type="dataset")
    data = load_tables(items=ids["items"], interactions=ids["log"], columns=MAPPING)
    assert data.items["item_id"] == ["007", "12", "30"] and len(data.interactions) == len(LOG)
    with pytest.raises(ValueError, match=rf"items Hub dataset '{hub_server.user}/absent' cannot be loaded"):
        load_tables(items=f"{hub_server.user}/absent", interactions=ids["log"], columns=MAPPING)


def test_scoped_mapping_users_table_and_iso_dates(tmp_path):
    items = _write(pd.DataFrame({"id": ["a", "b"], "title": ["A", "B"]}), tmp_path / "items.csv", "csv")
    log = _write(pd.DataFrame({"user_id": ["u1", "u2"], "item": ["a", "b"], "label": [1, 0],
                               "timestamp": ["2021-03-04T12:00:00Z", "2021-03-04 13:00:00+01:00"]}),
                 tmp_path / "log.csv", "csv")
    users = _write(pd.DataFrame({"user_id": ["u1", "u2"], "age": ["20s", "30s"]}), tmp_path / "users.csv", "csv")
    data = load_tables(items=items, interactions=log, users=users,
                       columns={"items.item_id": "id", "interactions.item_id": "item"})
    frame = data.interactions.to_pandas()
    assert frame["timestamp"].tolist() == [1614859200, 1614859200]  # 13:00+01:00 is 12:00Z
    assert frame["label"].tolist() == [1, 0] and "rating" not in frame.columns
    assert data.users.to_pandas().to_dict("list") == {"user_id": ["u1", "u2"], "age": ["20s", "30s"]}


def test_image_paths_are_relative_to_the_items_file(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(_png((1, 2, 3)))
    (tmp_path / "pics" / "broken.png").write_bytes(b"not a png")
    items = _write(pd.DataFrame({"item_id": ["a", "b", "c", "d"], "title": ["A", "B", "C", "D"],
                                 "image": ["pics/a.png", "pics/broken.png", "pics/absent.png", None]}),
                   tmp_path / "items.csv", "csv")
    log = _write(pd.DataFrame({"user_id": ["u"], "item_id": ["a"], "timestamp": [1], "rating": [5]}),
                 tmp_path / "log.csv", "csv")
    data = load_tables(items=items, interactions=log)
    assert data.items[0]["image"].getpixel((0, 0)) == (1, 2, 3)
    assert data.report.unreadable_images == 2 and data.report.missing_images == 1


def test_cli_prepares_own_csv_files(tmp_path):
    items = _write(ITEMS, tmp_path / "items.csv", "csv")
    log = _write(LOG, tmp_path / "log.csv", "csv")
    columns = [arg for target, source in MAPPING.items() for arg in ("--column", f"{target}={source}")]
    out = tmp_path / "out"
    assert cli_main(["data", "prepare", "--items", str(items), "--interactions", str(log), *columns,
                     "--out", str(out)]) == 0
    for protocol in ("temporal", "item-cold"):
        prepared = PreparedData.load(out / protocol)
        assert prepared.name == "log" and prepared.items["item_id"] == ["007", "12", "30"]
        assert sum(prepared.stats["splits"][s]["rows"] for s in ("train", "valid", "test")) == len(LOG)
        assert "item_genre" in prepared.vocabs


# ---------------------------------------------------------------- bad input

@pytest.fixture
def good_files(tmp_path):
    return _write(ITEMS, tmp_path / "items.csv", "csv"), _write(LOG, tmp_path / "log.csv", "csv")


def test_a_mapped_column_absent_from_every_file(good_files):
    items, log = good_files
    with pytest.raises(ValueError, match=r"column 'asin' \(mapped to 'item_id'\) is in none of the tables: "
                                         r"items file '.*items.csv' has \['movie', 'name', 'genre'\]"):
        load_tables(items=items, interactions=log, columns={**MAPPING, "item_id": "asin"})
    with pytest.raises(ValueError, match=r"items file '.*items.csv'.*column 'title_text' \(mapped to 'title'\) is absent"):
        load_tables(items=items, interactions=log, columns={**MAPPING, "items.title": "title_text"})
    with pytest.raises(ValueError, match=r"interactions file '.*log.csv'.*no column for \['timestamp'\]; it has "
                                         r"\['user_id', 'item_id', 'when', 'rating'\]"):
        load_tables(items=items, interactions=log, columns={k: v for k, v in MAPPING.items() if k != "timestamp"})


@pytest.mark.parametrize("name, content, message", [
    ("items.jsonl", '{"item_id": "a", "title": "A"}\n{"item_id": "b", "tit', r"cannot be read as JSON .*ArrowInvalid"),
    ("items.csv", "item_id,title\na,A\nb,B,extra\n", r"cannot be read as CSV .*Expected 2 fields in line 3, saw 3"),
    ("items.parquet", "PAR1 truncated", r"cannot be read as PARQUET .*Parquet magic bytes not found"),
    ("items.csv", "", r"cannot be read as CSV .*No columns to parse"),
    ("items.xlsx", "binary", r"unknown file type '.xlsx'; expected one of"),
])
def test_unreadable_or_truncated_files_name_the_file(tmp_path, good_files, name, content, message):
    bad = tmp_path / name
    bad.write_text(content)
    with pytest.raises(ValueError, match=rf"items file '{bad}'.*{message}"):
        load_tables(items=bad, interactions=good_files[1], columns=MAPPING)


def test_missing_file_and_unknown_preset(tmp_path, good_files):
    with pytest.raises(ValueError, match=r"items file '.*absent.csv' does not exist"):
        load_tables(items=tmp_path / "absent.csv", interactions=good_files[1])
    with pytest.raises(ValueError, match=r"preset 'amazon' is not one of \['amazon-reviews-2023'\]"):
        load_tables(items=good_files[0], interactions=good_files[1], preset="amazon")
    with pytest.raises(ValueError, match=r"has splits \['train', 'test'\]; expected one table"):
        load_tables(items=DatasetDict(train=Dataset.from_pandas(ITEMS), test=Dataset.from_pandas(ITEMS)),
                    interactions=LOG, columns=MAPPING)


def test_duplicate_ids_and_unknown_items_name_file_column_row_value(tmp_path, image_server):
    meta, reviews_file, reviews = _amazon_files(tmp_path, image_server)
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    _jsonl(meta, rows + [{**rows[0], "title": "again"}])
    with pytest.raises(ValueError, match=r"items file '.*meta_All_Beauty.jsonl' \(columns 'parent_asin' read as "
                                         r"'item_id', 'images' read as 'image'\): items table has 1 duplicate item_id "
                                         r"value\(s\), e.g. \['B01'\] \(rows \[0, 4\]\)"):
        load_tables(items=meta, interactions=reviews_file, preset="amazon-reviews-2023")
    _jsonl(meta, rows[:3])  # B04 gone, two reviews name it
    with pytest.raises(ValueError, match=r"interactions file '.*All_Beauty.jsonl' \(columns 'parent_asin' read as "
                                         r"'item_id'\): interactions table references item_id 'B04' \(row 5\) absent "
                                         r"from items table \(3 rows\); 3 interaction\(s\)"):
        load_tables(items=meta, interactions=reviews_file, preset="amazon-reviews-2023")


@pytest.mark.parametrize("column, values, message", [
    ("when", [100, 200, "yesterday", 250, 300], r"timestamp at row 2 is 'yesterday'; expected a number \(s\) or an ISO"),
    ("when", [100, 200, None, 250, 300], r"timestamp at row 2 is (None|nan); expected"),
    ("stars", [5, "five", 4, 1, 4], r"rating at row 1 is 'five'; expected a finite number"),
    ("stars", [5, 3, 4, None, 4], r"rating at row 3 is (None|nan); expected a finite number"),
])
def test_unparseable_timestamps_and_ratings(tmp_path, good_files, column, values, message):
    for kind in ("csv", "jsonl.gz"):
        log = _write(LOG.assign(**{column: values}), tmp_path / f"bad.{kind}", kind)
        with pytest.raises(ValueError, match=rf"interactions file '{log}' \(columns .*'{column}' read as .*\): (interactions table: )?{message}"):
            load_tables(items=good_files[0], interactions=log, columns=MAPPING)


def test_no_rating_or_label_and_ambiguous_mapping(tmp_path, good_files):
    with pytest.raises(ValueError, match=r"log.csv.*no rating or label column; it has \['user_id', 'item_id', "
                                         r"'timestamp', 'stars'\]"):
        load_tables(items=good_files[0], interactions=good_files[1],
                    columns={k: v for k, v in MAPPING.items() if k != "rating"})
    both = _write(ITEMS.assign(item_id=["x", "y", "z"]), tmp_path / "both.csv", "csv")
    with pytest.raises(ValueError, match=r"both.csv.*has both 'movie' \(mapped to 'item_id'\) and 'item_id'"):
        load_tables(items=both, interactions=good_files[1], columns=MAPPING)


def test_column_options_and_cli_errors(good_files, tmp_path):
    assert parse_column_options(["item_id=asin", " items.title = name "]) == {"item_id": "asin", "items.title": "name"}
    for bad in (["item_id"], ["=asin"], ["item_id=a", "item_id=b"]):
        with pytest.raises(ValueError, match=r"--column"):
            parse_column_options(bad)
    with pytest.raises(SystemExit, match=r"needs --items and --interactions \(missing \['--interactions'\]\)"):
        cli_main(["data", "prepare", "--items", str(good_files[0]), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"--dataset and --items/--interactions are exclusive"):
        cli_main(["data", "prepare", "--dataset", "synthetic", "--items", str(good_files[0]),
                  "--interactions", str(good_files[1]), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"error: column 'asin' \(mapped to 'item_id'\) is in none"):
        cli_main(["data", "prepare", "--items", str(good_files[0]), "--interactions", str(good_files[1]),
                  "--column", "item_id=asin", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    assert set(PRESETS) == {"amazon-reviews-2023"}


def test_the_documented_example_runs_as_written(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "own-data.md").read_text()
    example = page.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "docs/own-data.md", "exec"), {})
    assert "'item_id': 'a1', 'title': 'Red mug', 'shelf': 'kitchen'" in capsys.readouterr().out
