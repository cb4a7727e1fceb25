"""`vlmq caption` over each input format into each output format, on files the tests write, and the resume of each.

One stack (an embed and a generate worker) serves the module. Greedy decoding makes a caption a function of
the image bytes and the prompt, so the same bytes read from a folder, a shard, a Parquet file or a manifest
must get the same caption: the folder run (the path `tests/e2e/test_caption.py` checks against the pipelines
called directly) is the reference for the others.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.support.captioning import caption_stack, read_lines, run_caption, write_images
from tests.support.datasets import read_shard, write_manifest, write_parquet, write_shard
from tests.support.images import png_bytes

PROMPT = "Describe this image."
SHORT, LONG = "Say it in a word.", "Describe every detail."
SAMPLING = ("--max-tokens", "4")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from vlmq.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def stack(model, redis_server):
    with caption_stack(model, redis_server.url) as settings:
        yield settings


@pytest.fixture(scope="module")
def reference(stack, tmp_path_factory) -> dict[str, dict]:
    """sha256 → the folder run's record, for twelve images (seeds 0–11), with both prompts."""
    folder = tmp_path_factory.mktemp("reference")
    write_images(folder / "images", range(12))
    out = folder / "out.jsonl"
    result = run_caption(stack, folder / "images", "--prompt", f"short={SHORT}", "--prompt", f"long={LONG}", "--out", str(out),
                         *SAMPLING)
    assert result.returncode == 0, result.stderr
    return {line["sha256"]: line for line in read_lines(out)}


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_two_prompts_embed_each_image_once_and_match_one_prompt_runs(stack, reference, tmp_path):
    assert len(reference) == 12 and all(set(r) >= {"short", "long", "container_id"} and "error" not in r for r in reference.values())
    write_images(tmp_path / "images", range(3))
    out = tmp_path / "short.jsonl"
    ok(run_caption(stack, tmp_path / "images", "--prompt", SHORT, "--out", str(out), *SAMPLING))
    for line in read_lines(out):
        assert line["caption"] == reference[line["sha256"]]["short"]
        assert line["container_id"] == reference[line["sha256"]]["container_id"]


def test_webdataset_shards_by_brace_pattern_into_sidecar_shards_resumed(stack, reference, tmp_path):
    samples = {}
    for shard in range(3):
        samples[shard] = {f"sample{shard}{n}": {"png": png_bytes(shard * 3 + n, (32, 24)), "json": b'{"source": "test"}'}
                          for n in range(3)}
        samples[shard][f"sample{shard}-noimage"] = {"json": b"{}"}
        write_shard(tmp_path / "shards" / f"data-{shard:05d}.tar", samples[shard])
    spec, out = str(tmp_path / "shards" / "data-{00000..00002}.tar"), tmp_path / "captions"
    args = ("--prompt", PROMPT, "--out-format", "webdataset", "--out", str(out), "--max-in-flight", "2", *SAMPLING)

    first = ok(run_caption(stack, spec, *args, "--limit", "4"))  # the first shard whole, one image of the second
    assert "done 4, failed 0" in first.stdout
    assert sorted(p.name for p in out.iterdir()) == [".data-00001.tar.partial", "data-00000.tar"]
    second = ok(run_caption(stack, spec, *args))
    assert "done 5, failed 0, skipped 1" in second.stdout  # the partial shard's sample was carried over
    assert sorted(p.name for p in out.iterdir()) == [f"data-{n:05d}.tar" for n in range(3)]

    for shard in range(3):
        members = read_shard(out / f"data-{shard:05d}.tar")
        keys = [key for key in samples[shard] if "noimage" not in key]
        assert sorted(members) == sorted(f"{key}.{ext}" for key in keys for ext in ("json", "txt"))
        for key in keys:
            record = json.loads(members[f"{key}.json"])
            assert record["key"] == key and record["shard"] == str(tmp_path / "shards" / f"data-{shard:05d}.tar")
            assert members[f"{key}.txt"].decode() == record["caption"]
    third = ok(run_caption(stack, spec, *args))
    assert "done 0, failed 0" in third.stdout


def test_parquet_bytes_with_ids_into_parquet_resumed(stack, reference, tmp_path):
    images = [png_bytes(seed, (32, 24)) for seed in range(6)] + [b"not an image"]
    source = write_parquet(tmp_path / "data.parquet", {"jpg": images, "uid": [f"id-{n}" for n in range(7)]}, row_group_size=3)
    out = tmp_path / "captions.parquet"
    args = ("--image-column", "jpg", "--id-column", "uid", "--prompt", f"short={SHORT}", "--prompt", f"long={LONG}",
            "--out", str(out), *SAMPLING)
    first = ok(run_caption(stack, source, *args, "--limit", "3"))
    assert "done 3, failed 0" in first.stdout and not out.with_name(out.name + ".journal.jsonl").exists()
    second = run_caption(stack, source, *args)
    assert second.returncode == 1 and "done 3, failed 1, skipped 3" in second.stdout  # the bad row fails alone

    rows = pq.read_table(out).to_pylist()
    assert sorted(row["row"] for row in rows) == list(range(7))
    for row in rows:
        assert row["id"] == f"id-{row['row']}" and row["source"] == str(source)
        if row["row"] < 6:
            expected = reference[row["sha256"]]
            assert (row["short"], row["long"], row["container_id"]) == (expected["short"], expected["long"], expected["container_id"])
            assert row["error"] is None and row["completion_tokens"] >= 2
        else:
            assert row["error"]["code"] == "invalid_input" and row["short"] is None


def test_parquet_paths_and_a_manifest_give_the_folders_captions(stack, reference, tmp_path):
    paths = write_images(tmp_path / "images", range(6, 12))
    relative = [str(p.relative_to(tmp_path)) for p in paths]
    source = write_parquet(tmp_path / "paths.parquet", {"file": relative})
    manifest = write_manifest(tmp_path / "list.jsonl", [{"image": rel, "license": "cc0", "n": n} for n, rel in enumerate(relative)])
    for spec, column in ((source, "file"), (manifest, "image")):
        out = tmp_path / f"{Path(spec).stem}-captions.jsonl"
        ok(run_caption(stack, spec, "--image-column", column, "--prompt", f"short={SHORT}", "--prompt", f"long={LONG}",
                       "--out", str(out), *SAMPLING))
        lines = read_lines(out)
        assert sorted(line["path"] for line in lines) == sorted(str(p) for p in paths)
        for line in lines:
            assert (line["short"], line["long"]) == (reference[line["sha256"]]["short"], reference[line["sha256"]]["long"])
            if spec == manifest:
                assert line["meta"] == {"license": "cc0", "n": relative.index(str(Path(line["path"]).relative_to(tmp_path)))}


def test_txt_beside_each_image_one_per_prompt_resumed(stack, reference, tmp_path):
    paths = write_images(tmp_path / "images", range(3))
    args = ("--out-format", "txt", "--prompt", f"short={SHORT}", "--prompt", f"long={LONG}", *SAMPLING)
    ok(run_caption(stack, tmp_path / "images", *args))
    for path in paths:
        expected = reference[_sha256(path)]
        assert path.with_suffix(".short.txt").read_text() == expected["short"]
        assert path.with_suffix(".long.txt").read_text() == expected["long"]
    paths[1].with_suffix(".long.txt").unlink()
    again = ok(run_caption(stack, tmp_path / "images", *args))
    assert "done 1, failed 0, skipped 2" in again.stdout
    assert paths[1].with_suffix(".long.txt").read_text() == reference[_sha256(paths[1])]["long"]


def test_identical_bytes_are_captioned_once_and_written_for_every_path(stack, tmp_path):
    originals = write_images(tmp_path / "images", range(300, 304))
    copies = []
    for n, original in enumerate(originals[:2] * 2):  # two copies of each of the first two
        copy = tmp_path / "images" / f"copy{n}.png"
        copy.write_bytes(original.read_bytes())
        copies.append(copy)
    out = tmp_path / "out.jsonl"
    result = ok(run_caption(stack, tmp_path / "images", "--prompt", PROMPT, "--out", str(out), *SAMPLING))
    assert "done 8, failed 0" in result.stdout and "embedded 4, deduplicated 4" in result.stdout
    by_path = {line["path"]: line for line in read_lines(out)}
    for copy, original in zip(copies, originals[:2] * 2):
        assert by_path[str(copy)]["caption"] == by_path[str(original)]["caption"]
        assert by_path[str(copy)]["container_id"] == by_path[str(original)]["container_id"]


def test_dry_run_counts_and_limit_stops_short(stack, tmp_path):
    write_images(tmp_path / "images", range(400, 405))
    out = tmp_path / "out.jsonl"
    ok(run_caption(stack, tmp_path / "images", "--prompt", PROMPT, "--out", str(out), "--limit", "2", *SAMPLING))
    assert len(read_lines(out)) == 2
    dry = ok(run_caption(stack, tmp_path / "images", "--prompt", PROMPT, "--out", str(out), "--dry-run"))
    assert dry.stdout.strip() == "dry run: 5 images, 2 already in the output, 3 to caption"
    assert len(read_lines(out)) == 2


def test_max_failures_stops_a_run_that_fails_wholesale(stack, tmp_path):
    for n in range(12):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "images" / f"bad{n:02d}.png").write_bytes(b"not a png %d" % n)
    out = tmp_path / "out.jsonl"
    result = run_caption(stack, tmp_path / "images", "--prompt", PROMPT, "--out", str(out), "--max-failures", "3",
                         "--max-in-flight", "2", *SAMPLING)
    assert result.returncode == 1
    assert result.stdout.startswith("stopped: 4 of 4 images failed (--max-failures)")
    assert len(read_lines(out)) == 4


@pytest.mark.parametrize("args, message", [
    (("--out-format", "txt"), "--out-format txt writes beside image files"),
    (("--out", "x.jsonl", "--image-column", "nope"), "no image column 'nope'"),
])
def test_bad_combinations_are_one_clear_line(stack, tmp_path, args, message):
    write_parquet(tmp_path / "d.parquet", {"image": [png_bytes(0, (8, 8))]})
    result = run_caption(stack, tmp_path / "d.parquet", "--prompt", PROMPT, *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
