"""`ignore_eos` through the generate API: the same seeded request that ends at EOS runs on to max_tokens.
Real Redis, the demo model's generate worker, HTTP on a real socket."""

from __future__ import annotations

import httpx
import pytest

from generator_service.api.app import create_app
from tests.support.services import api_server

REQUEST = {"prompt": "USER: tell me a long story ASSISTANT:", "max_tokens": 400, "temperature": 1.0}


@pytest.fixture
def url(service_workers):
    with api_server(create_app(service_workers)) as base:
        yield base


def _generate(url: str, **body) -> dict:
    done = httpx.post(f"{url}/v1/generate", params={"wait": 120}, json={**REQUEST, **body}, timeout=130).json()
    assert done["status"] == "succeeded", done
    return done


def test_ignore_eos_generates_past_the_end_of_sequence(url):
    # A seed whose sampled text ends at EOS before max_tokens (random weights: found, not assumed).
    seed, ended = next((seed, done) for seed in range(20) if (done := _generate(url, seed=seed))["finish_reason"] == "stop")
    assert ended["usage"]["completion_tokens"] < REQUEST["max_tokens"]
    past = _generate(url, seed=seed, ignore_eos=True)
    assert past["finish_reason"] == "length" and past["usage"]["completion_tokens"] == REQUEST["max_tokens"]
    assert past["token_ids"][: len(ended["token_ids"])] == ended["token_ids"]  # the same draws up to the EOS, then on


def test_ignore_eos_must_be_a_boolean(url):
    refused = httpx.post(f"{url}/v1/generate", json={**REQUEST, "ignore_eos": "sometimes"})
    assert refused.status_code == 400 and "ignore_eos" in refused.text
