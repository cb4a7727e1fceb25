"""`vlmq caption`'s inputs, prompts and outputs on real files the tests write: no Redis, no workers."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.support.datasets import read_shard, write_manifest, write_parquet, write_shard
from vlmq.caption.inputs import InputError, InputOptions, Item, count_items, open_units
from vlmq.caption.outputs import JsonlOutput, TxtOutput, caption_files
from vlmq.caption.parquet_output import ParquetOutput, read_parquet
from vlmq.caption.webdataset_output import WebDatasetOutput
from vlmq.caption.prompts import PromptError, parse_prompts
from vlmq.caption.options import FailureLimit


def items(spec: str, **options) -> list[Item]:
    return [item for unit in open_units(spec, InputOptions(**options)) for item in unit.items()]


# -- inputs -------------------------------------------------------------------------------------------


def test_shards_by_brace_pattern_yield_each_sample_with_its_key_and_image(tmp_path):
    for index in range(3):
        write_shard(tmp_path / f"data-{index:03d}.tar", {
            f"s{index}a": {"jpg": b"A%d" % index, "json": b"{}", "txt": b"old caption"},
            f"sub/s{index}b": {"json": b"{}", "png": b"B%d" % index},
            f"s{index}c": {"json": b"{}"},  # no image: not a sample to caption
        })
    found = items(str(tmp_path / "data-{000..002}.tar"))
    assert [(Path(i.fields["shard"]).name, i.fields["key"], i.read()) for i in found] == [
        (f"data-{n:03d}.tar", key, data) for n in range(3) for key, data in ((f"s{n}a", b"A%d" % n), (f"sub/s{n}b", b"B%d" % n))]
    assert [unit.kind for unit in open_units(str(tmp_path))] == ["shard"] * 3  # a folder of shards is a dataset too


def test_a_brace_pattern_naming_missing_shards_says_how_many(tmp_path):
    write_shard(tmp_path / "data-000.tar", {"a": {"png": b"x"}})
    with pytest.raises(InputError, match=r"2 of the 3 files .* do not exist, the first: .*data-001.tar"):
        list(open_units(str(tmp_path / "data-{000..002}.tar")))


def test_parquet_bytes_paths_and_datasets_images(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "p.png").write_bytes(b"from a path")
    source = write_parquet(tmp_path / "d.parquet", {
        "jpg": [b"one", b"two", None],
        "file": ["imgs/p.png", "imgs/p.png", "imgs/p.png"],
        "image": [{"bytes": b"struct bytes", "path": None}, {"bytes": None, "path": "imgs/p.png"}, None],
        "uid": [10, 11, 12],
    }, row_group_size=2)
    by_bytes = items(str(source), image_column="jpg", id_column="uid")
    assert [(i.fields["row"], i.fields["id"]) for i in by_bytes] == [(0, 10), (1, 11), (2, 12)]
    assert [i.read() for i in by_bytes[:2]] == [b"one", b"two"]
    with pytest.raises(InputError, match="row 2: the image is null"):
        by_bytes[2].read()
    by_path = items(str(source), image_column="file")
    assert by_path[0].path == str(tmp_path / "imgs" / "p.png") and by_path[0].read() == b"from a path"
    structs = items(str(source))  # `image` is found without --image-column
    assert structs[0].read() == b"struct bytes" and structs[1].fields["path"] == str(tmp_path / "imgs" / "p.png")
    # Counting reads no bytes column, and gives the same identities.
    assert count_items(str(source), InputOptions("jpg"), lambda item: item.fields["row"] == 1) == (3, 1)


def test_parquet_errors_name_the_column(tmp_path):
    source = write_parquet(tmp_path / "d.parquet", {"caption": ["a"], "n": [1]})
    with pytest.raises(InputError, match="no image column found .* one of: caption, n"):
        items(str(source))
    with pytest.raises(InputError, match="no id column 'uid'"):
        items(str(source), image_column="caption", id_column="uid")
    with pytest.raises(InputError, match="column 'n' is int64"):
        items(str(source), image_column="n")


def test_a_manifest_carries_its_fields_and_names_a_bad_line(tmp_path):
    (tmp_path / "a.png").write_bytes(b"image a")
    manifest = write_manifest(tmp_path / "m.jsonl", [{"file": "a.png", "url": "http://x/a", "width": 3}])
    [item] = items(str(manifest), image_column="file")
    assert item.fields == {"path": str(tmp_path / "a.png"), "source": str(manifest), "row": 1,
                           "meta": {"url": "http://x/a", "width": 3}}
    assert item.read() == b"image a"
    with pytest.raises(InputError, match=r"m.jsonl, line 1: no string field 'path'"):
        items(str(manifest))


# -- prompts and limits -------------------------------------------------------------------------------


def test_prompts_by_name_from_flags_and_yaml(tmp_path):
    assert parse_prompts(["Describe this image."]) == {"caption": "Describe this image."}
    assert parse_prompts(["short=Say it briefly.", "long=Say everything."]) == {"short": "Say it briefly.", "long": "Say everything."}
    (tmp_path / "p.yaml").write_text("short: Say it briefly.\ntags: List the objects.\n")
    assert parse_prompts(["long=More."], str(tmp_path / "p.yaml")) == {"short": "Say it briefly.", "tags": "List the objects.", "long": "More."}
    with pytest.raises(PromptError, match="name each prompt"):
        parse_prompts(["Describe.", "short=Briefly."])
    with pytest.raises(PromptError, match="'sha256' is a field every record has"):
        parse_prompts(["sha256=What?"])
    with pytest.raises(PromptError, match="given twice"):
        parse_prompts(["a=x", "a=y"])
    (tmp_path / "bad.yaml").write_text("- just\n- a list\n")
    with pytest.raises(PromptError, match="must be a mapping"):
        parse_prompts([], str(tmp_path / "bad.yaml"))


def test_failure_limits_by_count_and_share():
    assert FailureLimit.parse("3").exceeded(4, 4) and not FailureLimit.parse("3").exceeded(3, 100)
    share = FailureLimit.parse("10%")
    assert not share.exceeded(5, 19)  # too few finished to judge
    assert share.exceeded(3, 20) and not share.exceeded(2, 20)
    with pytest.raises(ValueError, match="a count .* or a percentage"):
        FailureLimit.parse("lots")


# -- outputs ------------------------------------------------------------------------------------------


def record(item: Item, caption: str) -> dict:
    return item.fields | {"sha256": "0" * 64, "caption": caption, "seconds": 0.1}


def image_item(path: str) -> Item:
    return Item(path, {"path": path}, lambda: b"", path)


def test_jsonl_cuts_a_torn_line_and_knows_what_is_done(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"path": "/a.png", "caption": "x"}) + "\n" + '{"path": "/b.png", "capt')
    output = JsonlOutput(out)
    assert output.is_done(image_item("/a.png")) and not output.is_done(image_item("/b.png"))
    output.write(image_item("/b.png"), record(image_item("/b.png"), "y"))
    output.close()
    assert [json.loads(line)["path"] for line in out.read_text().splitlines()] == ["/a.png", "/b.png"]


def test_parquet_folds_its_journal_in_and_a_killed_runs_journal_counts_as_done(tmp_path):
    out = tmp_path / "out.parquet"
    first = ParquetOutput(out, ["short", "long"])
    first.write(image_item("/a.png"), image_item("/a.png").fields | {"short": "s", "long": "l"})
    first.close()
    killed = ParquetOutput(out, ["short", "long"])
    killed.write(image_item("/b.png"), image_item("/b.png").fields | {"error": {"code": "invalid_input", "message": "bad"}})
    killed.journal.close()  # as a SIGKILL leaves it: the journal, never folded in
    resumed = ParquetOutput(out, ["short", "long"])
    assert resumed.is_done(image_item("/a.png")) and resumed.is_done(image_item("/b.png"))
    resumed.close()
    assert not resumed.journal.path.exists()
    table = pq.read_table(out)
    assert table.column_names[9:11] == ["short", "long"]
    assert table.to_pylist()[0]["short"] == "s" and table.to_pylist()[1]["error"] == {"code": "invalid_input", "message": "bad"}
    assert [r["path"] for r in read_parquet(out)] == ["/a.png", "/b.png"]
    with pytest.raises(ValueError, match="other columns than this run writes"):
        ParquetOutput(out, ["caption"])


def test_txt_files_beside_images_one_per_prompt(tmp_path):
    image = str(tmp_path / "cat.photo.png")
    assert caption_files(image, ["caption"]) == {"caption": tmp_path / "cat.photo.txt"}  # kohya's naming: the stem
    output = TxtOutput(["short", "long"])
    item = image_item(image)
    output.write(item, item.fields | {"short": "a cat", "error": {"code": "x", "message": "long failed"}})
    assert (tmp_path / "cat.photo.short.txt").read_text() == "a cat" and not (tmp_path / "cat.photo.long.txt").exists()
    assert not output.is_done(item)  # a rerun asks for the missing caption
    shard_item = Item("/s.tar", {"shard": "/s.tar", "key": "k"}, lambda: b"")
    with pytest.raises(ValueError, match="writes beside image files"):
        output.is_done(shard_item)


def test_webdataset_output_carries_a_torn_partial_over_and_renames_when_done(tmp_path):
    shard = "/data/train-0001.tar"
    sample = lambda key: Item(shard, {"shard": shard, "key": key}, lambda: b"")  # noqa: E731
    first = WebDatasetOutput(tmp_path, ["caption"])
    for key in ("a", "b"):
        first.write(sample(key), sample(key).fields | {"caption": f"caption {key}"})
    partial = tmp_path / ".train-0001.tar.partial"  # killed here: never closed, and b's record torn off
    partial.write_bytes(partial.read_bytes()[:-700])
    resumed = WebDatasetOutput(tmp_path, ["caption"])
    assert resumed.is_done(sample("a")) and not resumed.is_done(sample("b"))
    resumed.write(sample("b"), sample("b").fields | {"caption": "caption b"})
    assert not resumed.unit_done(shard)
    resumed.end_unit(shard)
    assert resumed.unit_done(shard) and not partial.exists()
    members = read_shard(tmp_path / "train-0001.tar")
    assert sorted(members) == ["a.json", "a.txt", "b.json", "b.txt"]
    assert members["a.txt"] == b"caption a" and json.loads(members["b.json"])["key"] == "b"
