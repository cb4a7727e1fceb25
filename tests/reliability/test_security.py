"""Security: API keys and tenant isolation, weights only from safetensors, Redis passwords and TLS in every client.

(Pickled Celery messages are refused: tests/unit/test_celery_app.py.)
"""

from __future__ import annotations

import base64
import shutil
import ssl
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis
import torch
from kombu.exceptions import OperationalError
from PIL import Image

from embedder_service.api.app import create_app as create_embed_app
from embedder_service.worker import load_vision_model
from generator_service.api.app import create_app as create_generate_app
from shared.config.errors import CheckpointError, StoreUnavailable
from shared.config.settings import Settings
from shared.modeling.checkpoint import Checkpoint
from shared.queue.celery_app import create_celery_app
from shared.queue.tasks import enqueue_generate
from shared.store.jobs import JobStore
from shared.store.redis_conn import connect, translate_connection_errors
from tests.support.images import png_bytes
from tests.support.reliability import wait_finished
from tests.support.services import (
    REPO,
    api_server,
    service_env,
    wait_job,
    worker_processes,
)
from tests.support.tls import TLSProxy, make_certificates
from vlmq.redis_server import EmbeddedRedis

KEY_A, KEY_B = "key-of-tenant-a", "key-of-tenant-b"
A, B = {"Authorization": f"Bearer {KEY_A}"}, {"X-API-Key": KEY_B}

# -- API keys and tenants ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(service_workers):
    settings = service_workers.model_copy(update={"api_keys": [KEY_A, KEY_B], "max_new_tokens": 8})
    with api_server(create_embed_app(settings)) as embed, api_server(create_generate_app(settings)) as generate:
        yield {"embed": embed, "generate": generate, "settings": settings}


def test_without_a_key_or_with_a_wrong_one_every_route_is_401(keyed):
    embed, generate = keyed["embed"], keyed["generate"]
    routes = [
        ("POST", f"{embed}/v1/embeddings", {"files": {"file": ("a.png", png_bytes(1), "image/png")}}),
        ("GET", f"{embed}/v1/jobs/x", {}), ("GET", f"{embed}/v1/containers/x", {}),
        ("GET", f"{embed}/v1/containers/x/tensor", {}), ("DELETE", f"{embed}/v1/containers/x", {}),
        ("POST", f"{generate}/v1/generate", {"json": {"prompt": "hi", "max_tokens": 2}}),
        ("GET", f"{generate}/v1/jobs/x", {}), ("GET", f"{generate}/v1/jobs/x/stream", {}),
        ("POST", f"{generate}/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "hi"}]}}),
        ("GET", f"{generate}/v1/models", {}),
    ]
    for headers in ({}, {"Authorization": "Bearer not-a-key"}, {"X-API-Key": KEY_A + "x"}, {"Authorization": KEY_A}):
        for method, url, kwargs in routes:
            response = httpx.request(method, url, headers=headers, **kwargs)
            assert response.status_code == 401, (method, url, headers, response.text)
            assert response.json()["error"]["code"] == "unauthorized"
            assert "API key" in response.json()["error"]["message"]
    # Health and metrics stay open: probes and scrapers carry no tenant key.
    assert httpx.get(f"{embed}/healthz").status_code == 200 and httpx.get(f"{generate}/metrics").status_code == 200
    # Readiness says ready and how many workers, but what they serve (model paths, PIDs) only to a key holder.
    for url in (embed, generate):
        anonymous = httpx.get(f"{url}/readyz")
        assert anonymous.status_code == 200 and anonymous.json() == {"status": "ready", "workers": 1}, anonymous.text
        keyed_ready = httpx.get(f"{url}/readyz", headers=A).json()
        assert keyed_ready["workers"] == 1 and len(keyed_ready["worker_details"]) == 1


def test_tenant_b_can_neither_read_nor_delete_nor_generate_with_tenant_a_objects(keyed):
    embed, generate = keyed["embed"], keyed["generate"]
    data = png_bytes(4000)
    job = httpx.post(f"{embed}/v1/embeddings?wait=30", headers=A, files={"file": ("a.png", data, "image/png")}, timeout=40).json()
    assert job["status"] == "succeeded", job
    container = job["images"][0]
    cid, alias = container["id"], container["alias"]
    generated = httpx.post(f"{generate}/v1/generate?wait=30", headers=A, timeout=40,
                           json={"prompt": f"{alias} hi", "max_tokens": 2, "temperature": 0})
    assert generated.status_code == 200, generated.text
    gen_job = generated.json()["id"]

    chat = {"max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"vlmq://container/{cid}"}}, {"type": "text", "text": "hi"}]}]}
    attempts = [
        ("GET", f"{embed}/v1/jobs/{job['id']}", {}),
        ("GET", f"{embed}/v1/containers/{cid}", {}),
        ("GET", f"{embed}/v1/containers/{cid}/tensor", {}),
        ("DELETE", f"{embed}/v1/containers/{cid}", {}),
        ("POST", f"{generate}/v1/generate", {"json": {"prompt": f"{alias} hi", "max_tokens": 2}}),
        ("POST", f"{generate}/v1/generate", {"json": {"prompt": "<x> hi", "images": {"<x>": cid}, "max_tokens": 2}}),
        ("POST", f"{generate}/v1/chat/completions", {"json": chat}),
        ("GET", f"{generate}/v1/jobs/{gen_job}", {}),
        ("GET", f"{generate}/v1/jobs/{gen_job}/stream", {}),
    ]
    for method, url, kwargs in attempts:
        response = httpx.request(method, url, headers=B, timeout=30, **kwargs)
        assert response.status_code == 403, (method, url, response.text)
        error = response.json()["error"]
        assert error["code"] == "forbidden" and "another tenant" in error["message"], error

    # Nothing of A's was touched; A still reads and uses it all.
    assert httpx.get(f"{embed}/v1/containers/{cid}", headers=A).status_code == 200
    assert httpx.get(f"{generate}/v1/jobs/{gen_job}", headers=A).json()["status"] == "succeeded"
    # The same image from B is B's own container: content addresses include the tenant.
    own = httpx.post(f"{embed}/v1/embeddings?wait=30", headers=B, files={"file": ("a.png", data, "image/png")}, timeout=40).json()
    assert own["status"] == "succeeded" and own["images"][0]["id"] != cid
    assert own["images"][0]["first_token_id"] != container["first_token_id"]
    assert httpx.delete(f"{embed}/v1/containers/{cid}", headers=A).status_code == 204


def test_a_job_forged_past_the_api_is_refused_by_the_worker(keyed):
    """Defense in depth: the worker checks the tenant of every container again."""
    settings, embed = keyed["settings"], keyed["embed"]
    job = httpx.post(f"{embed}/v1/embeddings?wait=30", headers=A, files={"file": ("a.png", png_bytes(4001), "image/png")}, timeout=40).json()
    client = connect(settings.effective_store_url)
    jobs = JobStore(client, settings.key_prefix, settings.job_ttl_s)
    forged = enqueue_generate(create_celery_app(settings), jobs, "t_of_tenant_b",
                              {"prompt": f"{job['images'][0]['alias']} hi", "sampling": {"max_tokens": 2}})
    failed = wait_finished(jobs, [forged], timeout_s=30)[forged]
    assert failed["status"] == "failed" and failed["error"]["code"] == "forbidden", failed


# -- weights only from safetensors ---------------------------------------------------------------------


def _pickle_that_touches(marker) -> bytes:
    # Loading this with pickle (as torch.load of an untrusted .bin can) would create `marker`.
    return b"cbuiltins\nopen\n(S'" + str(marker).encode() + b"'\nS'w'\ntR."


def test_a_checkpoint_with_only_pytorch_model_bin_is_refused(demo_model, tmp_path, settings):
    folder = tmp_path / "bin-only"
    shutil.copytree(demo_model, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(_pickle_that_touches(marker))
    message = "no model.safetensors or model.safetensors.index.json (only safetensors weights are read)"
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Checkpoint(folder)
    worker = subprocess.run([sys.executable, "-m", "vlmq", "worker", "embed", "--model", str(folder)],
                            env=service_env(settings), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert worker.returncode != 0 and message in worker.stderr, worker.stderr[-2000:]
    assert not marker.exists()


def test_a_pickle_beside_the_safetensors_is_never_opened(demo_model, tmp_path):
    folder = tmp_path / "both"
    shutil.copytree(demo_model, folder)
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(_pickle_that_touches(marker))
    image = Image.new("RGB", (40, 30), (200, 30, 90))
    [beside_pickle] = load_vision_model(str(folder), "cpu", "float32").embed([image])
    [safetensors_only] = load_vision_model(str(demo_model), "cpu", "float32").embed([image])
    assert torch.equal(beside_pickle, safetensors_only)  # the weights came from model.safetensors
    assert not marker.exists()


# -- Redis passwords -------------------------------------------------------------------------------------

PASSWORD = "p@ss:w/rd %s"  # characters a URL must quote


def test_a_password_url_reaches_every_client(key_prefix):
    with EmbeddedRedis(password=PASSWORD) as server:
        settings = Settings(broker_url=server.url, key_prefix=key_prefix)
        assert "p%40ss%3Aw%2Frd%20%25s" in server.url
        assert connect(settings.effective_store_url).ping()
        app = create_celery_app(settings)
        with app.connection_for_write() as connection:  # the broker, as the APIs publish and workers consume
            connection.ensure_connection(max_retries=1)
            assert connection.default_channel.client.ping()
        app.backend.set("probe", "ok")  # the result backend
        assert app.backend.get("probe") == b"ok"


def test_a_wrong_password_is_a_clear_error_everywhere(key_prefix, demo_model):
    with EmbeddedRedis(password=PASSWORD) as server:
        url = f"redis://:wrong@127.0.0.1:{server.port}/0"
        settings = Settings(broker_url=url, key_prefix=key_prefix)
        with pytest.raises(StoreUnavailable, match="refused vlmq's credentials") as caught:
            with translate_connection_errors(connect(url, retries=0)):
                connect(url, retries=0).ping()
        assert "wrong" not in caught.value.message
        with api_server(create_embed_app(settings)) as embed, ThreadPoolExecutor(2) as pool:
            # Together: each waits out the client's retries (a refused login is a ConnectionError to redis-py).
            responses = [pool.submit(httpx.post, f"{embed}/v1/embeddings", files={"file": ("a.png", png_bytes(1), "image/png")}),
                         pool.submit(httpx.get, f"{embed}/readyz")]
            for response in (r.result() for r in responses):
                assert response.status_code == 503, response.text
                assert "refused vlmq's credentials" in response.json()["error"]["message"]
        # A worker does not retry a refused login forever: it exits and says why.
        worker = subprocess.run([sys.executable, "-m", "vlmq", "worker", "embed", "--model", str(demo_model)],
                                env=service_env(settings), cwd=REPO, capture_output=True, text=True, timeout=60)
        assert worker.returncode == 1, worker.stderr[-2000:]
        assert worker.stderr.strip().endswith(
            f"vlmq worker: Redis at 127.0.0.1:{server.port} refused vlmq's credentials (invalid username-password pair "
            "or user is disabled.): check the user and password in VLMQ_BROKER_URL / VLMQ_STORE_URL "
            "(redis://[user]:password@host:port/db)"), worker.stderr[-2000:]


# -- TLS (rediss://) -----------------------------------------------------------------------------------


def test_rediss_urls_give_verified_tls_in_every_client_and_a_whole_stack_runs_on_them(demo_model, tmp_path):
    certificates = make_certificates(tmp_path / "tls")
    impostor = make_certificates(tmp_path / "impostor", "another CA")
    with EmbeddedRedis(password=PASSWORD) as server, TLSProxy(server.port, certificates) as proxy:
        auth = server.url.split("//", 1)[1].split("@", 1)[0]
        url = f"rediss://{auth}@127.0.0.1:{proxy.port}/0?ssl_ca_certs={certificates.ca}"
        settings = Settings(broker_url=url, key_prefix="tls:", max_new_tokens=4)

        # Each client vlmq constructs speaks TLS and verifies the server's certificate.
        assert issubclass(connect(url).connection_pool.connection_class, redis.SSLConnection)
        app = create_celery_app(settings)
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
            pool = connection.default_channel.client.connection_pool
            broker_connection = pool.get_connection()
            assert isinstance(broker_connection, redis.SSLConnection)
            assert broker_connection.cert_reqs == ssl.CERT_REQUIRED
            pool.release(broker_connection)
        assert app.backend.connparams["connection_class"] is redis.SSLConnection
        assert app.backend.connparams["ssl_cert_reqs"] == ssl.CERT_REQUIRED

        # The whole stack through the TLS port only (the plain port is never named).
        with worker_processes(["embed", "generate"], demo_model, settings), \
                api_server(create_embed_app(settings)) as embed, api_server(create_generate_app(settings)) as generate:
            body = {"images": [{"base64": base64.b64encode(png_bytes(4100)).decode()}]}
            job = wait_job(embed, httpx.post(f"{embed}/v1/embeddings", json=body).json()["job_id"], timeout_s=30)
            assert job["status"] == "succeeded", job
            result = httpx.post(f"{generate}/v1/generate?wait=30", timeout=40,
                                json={"prompt": f"{job['images'][0]['alias']} hi", "max_tokens": 2})
            assert result.status_code == 200 and result.json()["status"] == "succeeded", result.text
        assert proxy.handshakes >= 6  # APIs, workers, broker and store clients: every one came through TLS

        # A server certificate from a CA the URL does not trust is refused by every client.
        wrong = f"rediss://{auth}@127.0.0.1:{proxy.port}/0?ssl_ca_certs={impostor.ca}"
        with pytest.raises(StoreUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            with translate_connection_errors(client := connect(wrong, retries=0)):
                client.ping()
        untrusting = create_celery_app(Settings(broker_url=wrong, key_prefix="tls:"))
        with pytest.raises(OperationalError, match="CERTIFICATE_VERIFY_FAILED"):
            with untrusting.connection_for_write() as connection:
                connection.ensure_connection(max_retries=0)
        with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            untrusting.backend.client.ping()
