"""Qwen2-VL end to end: HTTP → Redis → embed and generate worker subprocesses, checked against transformers;
and `vlmq caption` on the qwen2_vl demo checkpoint with a private stack."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import httpx
import torch
from PIL import Image

from embedder_service.api.app import create_app as create_embed_app
from generator_service.api.app import create_app as create_generate_app
from shared.config.settings import Settings
from tests.support.images import png_bytes
from tests.support.services import REPO, api_server, worker_processes
from tests.support.tiny_models import (
    build_tiny_qwen2_vl,
    load_qwen2_vl_reference,
    reference_inputs,
)
from vlmq.demo_model import write_demo_model

QUESTION = "Describe this image."


def test_chat_with_an_image_through_the_services_equals_transformers(redis_server, tmp_path):
    path = build_tiny_qwen2_vl(tmp_path / "qwen2_vl")
    settings = Settings(broker_url=redis_server.url, key_prefix="qwen-e2e:", max_new_tokens=64)
    data = png_bytes(11, size=(120, 70))
    with worker_processes(["embed", "generate"], path, settings), api_server(create_embed_app(settings)) as embed_url, \
            api_server(create_generate_app(settings)) as generate_url:
        job = httpx.post(f"{embed_url}/v1/embeddings?wait=60", files={"file": ("a.png", data, "image/png")}, timeout=90).json()
        assert job["status"] == "succeeded", job
        container = job["images"][0]
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"vlmq://container/{container['id']}"}},
                                                 {"type": "text", "text": QUESTION}]}]
        response = httpx.post(f"{generate_url}/v1/chat/completions",
                              json={"model": "tiny", "messages": messages, "max_tokens": 24, "temperature": 0}, timeout=90)
    assert response.status_code == 200, response.text
    completion = response.json()

    # The reference: the chat template's text, the processor's expansion, greedy generate.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    image = Image.open(io.BytesIO(data))
    text = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                                         tokenize=False, add_generation_prompt=True)
    inputs = reference_inputs(path, text, [image])
    with torch.inference_mode():
        out = load_qwen2_vl_reference(path).generate(**inputs, max_new_tokens=24, do_sample=False)
    expected = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    grid = inputs["image_grid_thw"][0].tolist()
    assert container["grid"] == [grid[0], grid[1] // 2, grid[2] // 2]  # the merged grid the LM's M-RoPE reads
    assert container["num_tokens"] == grid[0] * grid[1] * grid[2] // 4
    assert container["layout"]["before"] == [tokenizer.convert_tokens_to_ids("<|vision_start|>")]
    assert completion["usage"]["prompt_tokens"] == inputs["input_ids"].shape[1]
    assert completion["usage"]["image_tokens"] == container["num_tokens"]
    assert completion["choices"][0]["message"]["content"] == expected and expected


def test_caption_on_the_qwen2_vl_demo_model_with_a_private_stack(tmp_path):
    model = write_demo_model(tmp_path / "demo", "qwen2_vl")
    folder = tmp_path / "images"
    folder.mkdir()
    for seed, size in enumerate([(120, 70), (40, 200), (300, 300)]):
        Image.open(io.BytesIO(png_bytes(seed, size))).save(folder / f"img{seed}.png")
    out = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMQ_")} | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "vlmq", "caption", str(folder), "--model", str(model), "--prompt", QUESTION,
         "--out", str(out), "--max-tokens", "8", "--no-progress"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert "done 3, failed 0" in result.stdout
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(os.path.basename(line["path"]) for line in lines) == ["img0.png", "img1.png", "img2.png"]
    assert all("caption" in line and line["completion_tokens"] >= 1 for line in lines)
    # Different sizes, different token counts: each prompt holds its own image's rows.
    assert len({line["prompt_tokens"] for line in lines}) == 3
