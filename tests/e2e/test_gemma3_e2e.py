"""Gemma 3 end to end: HTTP → Redis → embed and generate worker subprocesses, against transformers (a prompt with
newlines next to its aliases, and a chat with an image); and `vlmq caption` with a private stack on the Gemma 3 demo."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import httpx
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from embedder_service.api.app import create_app as create_embed_app
from generator_service.api.app import create_app as create_generate_app
from tests.support.images import png_bytes
from tests.support.services import REPO, api_server, worker_processes
from tests.support.tiny_models import (
    build_tiny_gemma3,
    gemma3_processor,
    load_gemma3_reference,
)
from vlmq.demo_model import write_demo_model

SIZES = [(80, 60), (30, 97)]  # (width, height)
PROMPT = "Look:\n{0}\n{1}\n\nWhat is in these pictures?"
QUESTION = "Describe this image."


def reference_generate(ref, inputs, max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = ref.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_embed_generate_and_chat_over_http_match_transformers(tmp_path, settings):
    path = build_tiny_gemma3(tmp_path / "gemma3")
    settings = settings.model_copy(update={"max_new_tokens": 64})
    data = [png_bytes(i, size) for i, size in enumerate(SIZES)]
    with worker_processes(["embed", "generate"], path, settings), api_server(create_embed_app(settings)) as embed_url, \
            api_server(create_generate_app(settings)) as generate_url:
        metas, tensors = [], []
        for d in data:
            job = httpx.post(f"{embed_url}/v1/embeddings?wait=60", files={"file": ("a.png", d, "image/png")}, timeout=90).json()
            assert job["status"] == "succeeded", job
            metas.append(httpx.get(f"{embed_url}/v1/containers/{job['images'][0]['id']}").json())
            tensors.append(load_safetensors(httpx.get(f"{embed_url}/v1/containers/{metas[-1]['id']}/tensor").content)["embeddings"])
        prompt = PROMPT.format(*(m["alias"] for m in metas))
        generated = httpx.post(f"{generate_url}/v1/generate?wait=60", json={"prompt": prompt, "max_tokens": 24, "temperature": 0},
                               timeout=90)
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"vlmq://container/{metas[0]['id']}"}},
                                                 {"type": "text", "text": QUESTION}]}]
        chat = httpx.post(f"{generate_url}/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 24,
                                                                       "temperature": 0}, timeout=90)
    assert generated.status_code == 200, generated.text
    assert chat.status_code == 200, chat.text

    ref, processor = load_gemma3_reference(path), gemma3_processor(path)
    images = [Image.open(io.BytesIO(d)) for d in data]
    inputs = processor(text=PROMPT.format("<start_of_image>", "<start_of_image>"), images=images, return_tensors="pt")
    with torch.inference_mode():
        features = ref.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    tok = processor.tokenizer
    for meta, tensor, expected in zip(metas, tensors, features):
        assert (tensor - expected).abs().max() <= 1e-4
        assert meta["num_tokens"] == 16 and meta["grid"] is None
        assert meta["layout"] == {"before": [tok.convert_tokens_to_ids("<start_of_image>")], "after": [tok.convert_tokens_to_ids("<end_of_image>")],
                                  "row_length": None, "row_break_id": None, "text_before": "\n\n", "text_after": "\n\n"}
    result = generated.json()
    assert result["token_ids"] == reference_generate(ref, inputs, 24)
    assert result["usage"]["prompt_tokens"] == inputs["input_ids"].shape[1]
    assert result["usage"]["image_tokens"] == 32

    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                                         add_generation_prompt=True, tokenize=False)
    chat_inputs = processor(text=text, images=images[:1], return_tensors="pt", add_special_tokens=False)
    expected = reference_generate(ref, chat_inputs, 24)
    completion = chat.json()
    assert completion["usage"]["prompt_tokens"] == chat_inputs["input_ids"].shape[1]
    assert completion["choices"][0]["message"]["content"] == tok.decode(expected, skip_special_tokens=True)


def test_caption_with_a_private_stack_on_the_gemma3_demo(tmp_path):
    model = write_demo_model(tmp_path / "demo", "gemma3")
    folder = tmp_path / "images"
    folder.mkdir()
    for i, size in enumerate([(40, 30), (17, 64), (64, 64)]):
        (folder / f"img{i}.png").write_bytes(png_bytes(i, size))
    out = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMQ_")} | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "vlmq", "caption", str(folder), "--model", str(model), "--prompt", QUESTION,
               "--out", str(out), "--max-tokens", "8", "--no-progress"]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "done 3, failed 0" in result.stdout
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["path"] for line in lines) == sorted(str(p) for p in folder.iterdir())
    assert all(isinstance(line["caption"], str) and line["completion_tokens"] >= 1 and "error" not in line for line in lines)
    assert {line["prompt_tokens"] for line in lines} == {lines[0]["prompt_tokens"]}  # fixed size: 16 rows each
