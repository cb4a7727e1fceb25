"""8-bit containers end to end: an embed worker with VLMQ_CONTAINER_DTYPE=int8 stores rows quantized per
row, the tensor download carries the scales, and a generate worker dequantizes them and generates."""

from __future__ import annotations

import io

import httpx
import pytest
import torch
from PIL import Image
from safetensors.torch import load

from embedder_service.api.app import create_app as create_embed_app
from embedder_service.models import load_vision_model
from generator_service.api.app import create_app as create_generate_app
from shared.config.settings import Settings
from tests.support.images import png_bytes
from tests.support.services import api_server, worker_process


@pytest.fixture(scope="module")
def stack(demo_model, redis_server):
    settings = Settings(broker_url=redis_server.url, key_prefix="int8-e2e:", max_new_tokens=16)
    with worker_process("embed", demo_model, settings, VLMQ_CONTAINER_DTYPE="int8"), worker_process("generate", demo_model, settings), \
            api_server(create_embed_app(settings)) as embed_url, api_server(create_generate_app(settings)) as generate_url:
        yield embed_url, generate_url


def test_an_int8_container_is_stored_quantized_and_generated_from(stack, demo_model):
    embed_url, generate_url = stack
    image = png_bytes(7)
    job = httpx.post(f"{embed_url}/v1/embeddings?wait=60", files={"file": ("a.png", image, "image/png")}).json()
    assert job["status"] == "succeeded", job
    container = job["images"][0]
    assert container["dtype"] == "int8"

    tensors = load(httpx.get(f"{embed_url}/v1/containers/{container['id']}/tensor").content)
    assert tensors["embeddings"].dtype == torch.int8 and tensors["scales"].shape == (container["num_tokens"],)
    stored = tensors["embeddings"].float() * tensors["scales"][:, None]  # [N, D]
    [exact] = load_vision_model(str(demo_model), "cpu", "auto").embed([Image.open(io.BytesIO(image)).convert("RGB")])
    step = exact.abs().amax(dim=1, keepdim=True) / 127  # one quantization step per row
    assert ((stored - exact).abs() <= step / 2 + 1e-5).all()

    done = httpx.post(f"{generate_url}/v1/generate?wait=60", timeout=70,
                      json={"prompt": f"USER: {container['alias']} what is it? ASSISTANT:", "max_tokens": 8, "temperature": 0})
    assert done.status_code == 200 and done.json()["usage"]["image_tokens"] == container["num_tokens"], done.text
