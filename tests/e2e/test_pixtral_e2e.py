"""Pixtral end to end: HTTP → Redis → embed and generate worker subprocesses, against transformers; and
`vlmq caption` with a private stack on the Pixtral demo model."""

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
from generator_service.tokenizer import Tokenizer
from shared.store.container import EmbeddingContainer, Layout
from shared.store.token_ids import EMBEDDING_INDEX_BASE as BASE
from tests.support.images import png_bytes
from tests.support.services import REPO, api_server, worker_processes
from tests.support.tiny_models import build_tiny_pixtral, load_pixtral_reference
from vlmq.demo_model import write_demo_model

SIZES = [(80, 60), (30, 97)]  # (width, height): two sizes, so two row lengths


def container_over_http(embed_url: str, data: bytes) -> EmbeddingContainer:
    job = httpx.post(f"{embed_url}/v1/embeddings?wait=60", files={"file": ("a.png", data, "image/png")}).json()
    assert job["status"] == "succeeded", job
    meta = httpx.get(f"{embed_url}/v1/containers/{job['images'][0]['id']}").json()
    tensor = load_safetensors(httpx.get(f"{embed_url}/v1/containers/{meta['id']}/tensor").content)["embeddings"]
    layout = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["layout"].items()}
    return EmbeddingContainer(id=meta["id"], model=meta["model"], tenant="public", first_token_id=meta["first_token_id"],
                              num_tokens=meta["num_tokens"], embeddings=tensor, layout=Layout(**layout), grid=tuple(meta["grid"]))


def test_embed_and_generate_over_http_match_transformers(tmp_path, settings):
    from transformers import PixtralImageProcessorPil

    path = build_tiny_pixtral(tmp_path / "pixtral", sliding_window=16)
    settings = settings.model_copy(update={"max_new_tokens": 64})
    data = [png_bytes(i, size) for i, size in enumerate(SIZES)]
    with worker_processes(["embed", "generate"], path, settings), api_server(create_embed_app(settings)) as embed_url, \
            api_server(create_generate_app(settings)) as generate_url:
        containers = [container_over_http(embed_url, d) for d in data]
        prompt = f"[INST]{containers[0].alias}{containers[1].alias}What is in these pictures?[/INST]"
        response = httpx.post(f"{generate_url}/v1/generate?wait=60", json={"prompt": prompt, "max_tokens": 24, "temperature": 0}, timeout=90)
    assert response.status_code == 200, response.text
    result = response.json()

    ref = load_pixtral_reference(path)
    images = [Image.open(io.BytesIO(d)) for d in data]
    inputs = PixtralImageProcessorPil.from_pretrained(path)(images, return_tensors="pt")
    with torch.inference_mode():
        features = ref.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                          vision_feature_layer=-1, vision_feature_select_strategy="full").pooler_output
    tok = Tokenizer.from_checkpoint(path)
    for container, expected, (height, width) in zip(containers, features, inputs["image_sizes"].tolist()):
        assert (container.embeddings - expected).abs().max() <= 1e-4
        assert container.grid == (1, height // 8, width // 8)
        assert container.layout == Layout(after=(tok.token_to_id("[IMG_END]"),), row_length=width // 8, row_break_id=tok.token_to_id("[IMG_BREAK]"))
    ids = tok.encode_prompt(prompt, {c.alias: c for c in containers}).ids
    ref_ids = [ref.config.image_token_index if i >= BASE else i for i in ids]
    with torch.inference_mode():
        out = ref.generate(input_ids=torch.tensor([ref_ids]), pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                           max_new_tokens=24, do_sample=False)
    assert result["token_ids"] == out[0, len(ref_ids):].tolist()
    assert result["usage"]["image_tokens"] == sum(c.num_tokens for c in containers)


def test_caption_with_a_private_stack_on_the_pixtral_demo(tmp_path):
    model = write_demo_model(tmp_path / "demo", "pixtral")
    folder = tmp_path / "images"
    folder.mkdir()
    for i, size in enumerate([(40, 30), (17, 64), (64, 64)]):
        (folder / f"img{i}.png").write_bytes(png_bytes(i, size))
    out = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMQ_")} | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "vlmq", "caption", str(folder), "--model", str(model), "--prompt", "Describe this image.",
               "--out", str(out), "--max-tokens", "8", "--no-progress"]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "done 3, failed 0" in result.stdout
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["path"] for line in lines) == sorted(str(p) for p in folder.iterdir())
    assert all(isinstance(line["caption"], str) and line["completion_tokens"] >= 1 and "error" not in line for line in lines)
