"""The embedder end to end: HTTP on a real socket → real Redis → a worker subprocess → container → tensor."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load as load_safetensors

from embedder_service.api.app import create_app
from tests.support.images import png_bytes
from tests.support.services import api_server, wait_job, worker_process
from tests.support.tiny_models import build_tiny_llava, load_reference


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture
def stack(checkpoint, settings):
    settings = settings.model_copy(update={"max_upload_bytes": 200_000})
    with worker_process("embed", checkpoint, settings), api_server(create_app(settings)) as url:
        yield url


def reference_embeddings(checkpoint, data: bytes) -> torch.Tensor:
    from transformers import CLIPImageProcessorPil

    model = load_reference(checkpoint)
    pixels = CLIPImageProcessorPil.from_pretrained(checkpoint)(Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels, vision_feature_layer=-2, vision_feature_select_strategy="default")
    features = getattr(features, "pooler_output", features)
    return torch.cat(list(features)) if isinstance(features, (list, tuple)) else features.reshape(-1, features.shape[-1])


def test_upload_job_container_tensor_matches_reference(stack, checkpoint):
    data = png_bytes(1)
    response = httpx.post(f"{stack}/v1/embeddings", files={"file": ("a.png", data, "image/png")})
    assert response.status_code == 202, response.text
    job = wait_job(stack, response.json()["job_id"])
    assert job["status"] == "succeeded", job
    (info,) = job["images"]
    assert info["num_tokens"] == 16 and info["hidden_size"] == 64 and info["alias"] == f"<image:{info['id']}>"
    assert info["first_token_id"] >= 1_000_000_000

    meta = httpx.get(f"{stack}/v1/containers/{info['id']}").json()
    assert meta["first_token_id"] == info["first_token_id"]
    tensor = load_safetensors(httpx.get(f"{stack}/v1/containers/{info['id']}/tensor").content)["embeddings"]
    assert tensor.shape == (16, 64)
    assert (tensor - reference_embeddings(checkpoint, data)).abs().max() <= 1e-4


def test_same_image_twice_gives_same_container_and_ids(stack):
    data = png_bytes(2)
    first = httpx.post(f"{stack}/v1/embeddings?wait=30", files={"file": ("a.png", data, "image/png")}).json()
    body = {"images": [{"base64": base64.b64encode(data).decode()}]}
    second = httpx.post(f"{stack}/v1/embeddings?wait=30", json=body).json()
    assert first["status"] == second["status"] == "succeeded"
    assert first["images"][0]["id"] == second["images"][0]["id"]
    assert first["images"][0]["first_token_id"] == second["images"][0]["first_token_id"]


def test_the_same_bytes_twice_in_one_request_are_embedded_once(stack):
    copies, other = png_bytes(5), png_bytes(6)
    files = [("file", (f"{i}.png", copies, "image/png")) for i in range(4)] + [("file", ("b.png", other, "image/png"))]
    job = httpx.post(f"{stack}/v1/embeddings?wait=30", files=files, timeout=40).json()
    assert job["status"] == "succeeded", job
    ids = [image["id"] for image in job["images"]]
    assert len(set(ids[:4])) == 1 and ids[4] != ids[0]
    metrics = {s.name: s.value for family in text_string_to_metric_families(httpx.get(f"{stack}/metrics").text) for s in family.samples}
    assert metrics["vlmq_embed_batch_size_sum"] == 2  # images through the tower: one per distinct bytes, not five


def test_corrupt_image_fails_only_its_own_job(stack):
    good = [png_bytes(10 + i) for i in range(3)]
    corrupt = png_bytes(99)[:200]  # a truncated PNG
    job_ids = [httpx.post(f"{stack}/v1/embeddings", files={"file": ("x.png", d, "image/png")}).json()["job_id"] for d in [good[0], corrupt, *good[1:]]]
    jobs = [wait_job(stack, job_id) for job_id in job_ids]
    assert [j["status"] for j in jobs] == ["succeeded", "failed", "succeeded", "succeeded"]
    assert "truncated" in jobs[1]["error"]["message"].lower()


def test_delete_container_then_not_found(stack):
    job = httpx.post(f"{stack}/v1/embeddings?wait=30", files={"file": ("a.png", png_bytes(3), "image/png")}).json()
    container_id = job["images"][0]["id"]
    assert httpx.delete(f"{stack}/v1/containers/{container_id}").status_code == 204
    missing = httpx.get(f"{stack}/v1/containers/{container_id}")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_health_ready_metrics(stack):
    assert httpx.get(f"{stack}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{stack}/readyz")
    assert ready.status_code == 200 and ready.json()["workers"]
    httpx.post(f"{stack}/v1/embeddings?wait=30", files={"file": ("a.png", png_bytes(4), "image/png")})
    metrics = httpx.get(f"{stack}/metrics").text
    assert "vlmq_embed_batch_size_bucket" in metrics and "vlmq_embed_images_total" in metrics


def test_bad_requests_get_4xx_with_reason(stack):
    not_json = httpx.post(f"{stack}/v1/embeddings", content=b"{nope", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and "invalid request body" in not_json.json()["error"]["message"]
    bad_b64 = httpx.post(f"{stack}/v1/embeddings", json={"images": [{"base64": "!!!"}]})
    assert bad_b64.status_code == 400 and "base64" in bad_b64.json()["error"]["message"]
    by_path = httpx.post(f"{stack}/v1/embeddings", json={"images": [{"path": "/etc/passwd"}]})
    assert by_path.status_code == 403
    huge = httpx.post(f"{stack}/v1/embeddings", content=b"x" * 1_000_000, headers={"content-type": "application/json"})
    assert huge.status_code == 413


def test_a_new_worker_warms_its_tower_with_one_full_batch_and_stores_nothing(checkpoint, settings, redis_client, key_prefix):
    from embedder_service.worker import build_pipeline

    pipeline = build_pipeline(settings, str(checkpoint), "cpu")
    assert pipeline.batcher.batch_sizes == [settings.embed_max_batch]
    assert list(redis_client.scan_iter(match=f"{key_prefix}*")) == []  # no container, no token IDs taken
