"""`vlmq caption` for real: a subprocess of the CLI against real Redis and real worker subprocesses.

The running-stack tests share one stack (two embed workers, one generate
worker) under their own key prefix; the private-stack test lets the command
start and stop its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest

from shared.config.settings import Settings
from tests.support import captioning
from tests.support.captioning import caption_stack, ctrl_c_raises, read_lines, write_images
from tests.support.images import png_bytes
from tests.support.services import REPO, free_port, service_env
from vlmq.caption.inputs import open_units
from vlmq.demo_model import write_demo_model

PROMPT = "Describe this image."
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def stack_settings(model, redis_server) -> Settings:
    with caption_stack(model, redis_server.url, embed_workers=2) as settings:
        yield settings


def caption_command(inputs: Path, out: Path, *extra: str) -> list[str]:
    return captioning.caption_command(inputs, "--prompt", PROMPT, "--out", str(out), "--max-tokens", str(MAX_TOKENS), *extra)


def run_caption(env: dict, inputs: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(caption_command(inputs, out, *extra), env=env, cwd=REPO, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def first_run(stack_settings, tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    images = write_images(folder, range(40))
    out = folder.parent / f"{folder.name}.jsonl"
    result = run_caption(service_env(stack_settings), folder, out)
    return images, out, result


def test_every_image_gets_one_line_with_the_caption_the_pipelines_give_directly(first_run, stack_settings, model):
    from embedder_service.worker import build_pipeline as build_embed_pipeline
    from generator_service.worker import build_pipeline as build_generate_pipeline
    from vlmq.caption.options import CaptionOptions

    images, out, result = first_run
    assert result.returncode == 0, result.stderr
    lines = read_lines(out)
    assert len(lines) == 40
    assert sorted(line["path"] for line in lines) == sorted(str(path) for path in images)
    assert "done 40, failed 0" in result.stdout

    embedder = build_embed_pipeline(stack_settings, str(model), "cpu")
    generator = build_generate_pipeline(stack_settings, str(model), "cpu")
    payload = CaptionOptions({"caption": PROMPT}, max_tokens=MAX_TOKENS).payload(PROMPT)
    for line in lines:
        container = embedder.embed(Path(line["path"]).read_bytes(), "public")
        assert line["container_id"] == container.id
        payload["messages"][0]["content"][0]["container_id"] = container.id
        direct = generator.generate("public", payload)
        assert line["caption"] == direct["text"], line["path"]
        assert (line["prompt_tokens"], line["completion_tokens"]) == (direct["usage"]["prompt_tokens"], direct["usage"]["completion_tokens"])
        assert line["seconds"] > 0 and len(line["sha256"]) == 64


def test_a_second_run_adds_nothing(first_run, stack_settings):
    _, out, _ = first_run
    before = out.read_text()
    folder = out.with_suffix("")
    result = run_caption(service_env(stack_settings), folder, out)
    assert result.returncode == 0, result.stderr
    assert "done 0, failed 0, skipped 40" in result.stdout
    assert out.read_text() == before


def test_an_interrupted_run_resumes_with_no_duplicate_lines(stack_settings, tmp_path):
    images = write_images(tmp_path / "images", range(100, 140))
    out = tmp_path / "out.jsonl"
    env = service_env(stack_settings)
    # One image at a time and longer captions: slow enough to interrupt part way.
    slow = ("--max-in-flight", "1", "--max-tokens", "32")
    process = subprocess.Popen(caption_command(tmp_path / "images", out, *slow), env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_raises)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().count("\n") >= 3):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    partial = read_lines(out)
    assert 3 <= len(partial) < 40

    resumed = run_caption(env, tmp_path / "images", out)
    assert resumed.returncode == 0, resumed.stderr
    lines = read_lines(out)
    assert len(lines) == 40 and lines[: len(partial)] == partial
    assert sorted(line["path"] for line in lines) == sorted(str(path) for path in images)
    assert all("caption" in line for line in lines)


def test_a_bad_file_gets_its_own_error_line_and_the_others_finish(stack_settings, tmp_path):
    write_images(tmp_path, range(200, 204))
    (tmp_path / "not-an-image.png").write_bytes(b"this is text, not a PNG")
    (tmp_path / "truncated.png").write_bytes(png_bytes(204, (64, 48))[:300])
    out = tmp_path.parent / f"{tmp_path.name}.jsonl"
    result = run_caption(service_env(stack_settings), tmp_path, out)
    assert result.returncode == 1
    by_name = {Path(line["path"]).name: line for line in read_lines(out)}
    assert len(by_name) == 6
    for name in ("not-an-image.png", "truncated.png"):
        assert by_name[name]["error"]["code"] == "invalid_input" and by_name[name]["error"]["message"]
        assert "caption" not in by_name[name]
    assert all("caption" in line for name, line in by_name.items() if name.startswith("img"))
    assert "done 4, failed 2" in result.stdout


def test_no_workers_on_the_configured_redis_is_a_clear_error(redis_server, tmp_path):
    write_images(tmp_path, range(1))
    lonely = Settings(broker_url=redis_server.url, key_prefix=f"nobody-{uuid.uuid4().hex[:8]}:")
    result = run_caption(service_env(lonely), tmp_path, tmp_path / "out.jsonl", "--worker-timeout", "1")
    assert result.returncode == 2
    assert "no embed and no generate worker reported in" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_redis_is_a_one_line_error(tmp_path):
    write_images(tmp_path, range(1))
    nowhere = Settings(broker_url=f"redis://127.0.0.1:{free_port()}/0")
    result = run_caption(service_env(nowhere), tmp_path, tmp_path / "out.jsonl")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "unreachable" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("worker_args, workers", [
    ([], ["worker all"]),  # the default: one process serving both queues
    (["--generate-workers", "1"], ["worker embed", "worker generate"]),
])
def test_a_private_stack_captions_and_leaves_no_process_behind(model, tmp_path, worker_args, workers):
    images = write_images(tmp_path / "images", range(300, 303))
    out = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMQ_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    process = subprocess.Popen(caption_command(tmp_path / "images", out, "--model", str(model), *worker_args), env=env,
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(process.pid)
    seen: dict[int, psutil.Process] = {}
    commands: dict[int, set[str]] = {}  # every command line seen: before exec it is its parent's, while exiting empty
    while process.poll() is None:  # remember every descendant: Redis and the workers
        try:
            children = parent.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for child in children:
            seen[child.pid] = child
            try:
                commands.setdefault(child.pid, set()).add(" ".join(child.cmdline()))
            except psutil.Error:  # gone, or a zombie: keep what was seen
                pass
        time.sleep(0.1)
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr
    assert "done 3, failed 0" in stdout
    assert sorted(line["path"] for line in read_lines(out)) == sorted(str(path) for path in images)
    seen_commands = [command for pid_commands in commands.values() for command in pid_commands]
    assert sorted(kind for kind in ("worker all", "worker embed", "worker generate")
                  if any(f"vlmq {kind} " in command for command in seen_commands)) == workers
    assert any("redis-server" in command for command in seen_commands)
    left = [commands.get(pid, pid) for pid, child in seen.items() if child.is_running()]
    assert not left, left


def discovered(spec: str) -> list[str]:
    return sorted(item.path for unit in open_units(spec) for item in unit.items())


def test_inputs_are_found_in_folders_globs_and_path_lists(tmp_path, monkeypatch):
    paths = write_images(tmp_path / "images", range(4))
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    expected = sorted(str(path) for path in paths)
    assert discovered(str(tmp_path / "images")) == expected
    assert discovered(str(tmp_path / "images" / "**" / "*.png")) == expected
    listing = tmp_path / "list.txt"
    monkeypatch.chdir(tmp_path)
    listing.write_text("# my images\n" + "\n".join(os.path.relpath(p, tmp_path) for p in paths) + "\n\n")
    assert discovered(str(listing)) == expected
