"""Fuzzing: the prompt encoder with random text and aliases, and both REST APIs from their OpenAPI schemas.

The container decoder is fuzzed in test_container.py (random bytes, random msgpack
maps, one field of a valid blob replaced, byte mutations, truncations): nothing is
missing there, so it is not repeated here.
"""

from __future__ import annotations

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from embedder_service.api.app import create_app as create_embed_app
from generator_service.api.app import create_app as create_generate_app
from generator_service.tokenizer import Tokenizer
from shared.config.errors import InvalidInput
from shared.store.container import EmbeddingContainer, Layout
from shared.store.token_ids import EMBEDDING_INDEX_BASE as BASE
from tests.support.services import api_server

# -- the prompt encoder ---------------------------------------------------------------------------

# Text that stresses the encoder: the model's specials, alias look-alikes, the private
# placeholder, regex metacharacters, digits that spell container IDs, odd Unicode.
TRICKY = ["<s>", "</s>", "<image>", "<image:", "<image:abc>", "<|vlmq:alias|>", "<", ">", ":", "\\", "$1", "(?", "|",
          str(BASE), str(BASE + 7), "\x00", "\u200b", "é", "猫", "😀", "\n", " "]
text_pieces = st.text(max_size=12) | st.sampled_from(TRICKY)
alias_names = st.text(min_size=0, max_size=8) | st.sampled_from(["<a>", "<image>", "<s>", "<image:c1>", "<|vlmq:alias|>", "a", " "])


@st.composite
def containers(draw, index: int) -> EmbeddingContainer:
    text_ids = st.integers(0, 399)
    row_length = draw(st.none() | st.integers(1, 4))
    layout = Layout(
        before=tuple(draw(st.lists(text_ids, max_size=2))),
        after=tuple(draw(st.lists(text_ids, max_size=2))),
        row_length=row_length,
        row_break_id=None if row_length is None else draw(text_ids),
    )
    count = draw(st.integers(1, 3)) * (row_length or 1)  # whole rows
    first = draw(st.integers(BASE, BASE + 10_000))
    return EmbeddingContainer(id=f"c{index}", model="m", tenant="t", first_token_id=first, num_tokens=count,
                              embeddings=torch.zeros(count, 4), layout=layout)


@st.composite
def prompts_with_bindings(draw) -> tuple[str, dict[str, EmbeddingContainer]]:
    names = draw(st.lists(alias_names, max_size=3, unique=True))
    bindings = {name: draw(containers(i)) for i, name in enumerate(names)}
    parts = draw(st.lists(text_pieces | (st.sampled_from(names) if names else text_pieces), max_size=8))
    return "".join(parts), bindings


@pytest.fixture(scope="module")
def tokenizer(demo_model) -> Tokenizer:
    return Tokenizer.from_checkpoint(demo_model)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=prompts_with_bindings(), add_special_tokens=st.booleans())
def test_encode_prompt_fails_only_with_invalid_input_and_never_forges_ids(tokenizer, case, add_special_tokens):
    prompt, bindings = case
    try:
        encoded = tokenizer.encode_prompt(prompt, bindings, add_special_tokens=add_special_tokens, max_length=4096)
    except InvalidInput:
        return
    used_ids = {i for c in encoded.containers for i in c.token_ids()}
    for token in encoded.ids:
        if token >= BASE:
            # Every ID at or above the base is a row of a container that was bound and used.
            assert token in used_ids, (prompt, token)
        else:
            assert 0 <= token < tokenizer.vocab_size
    assert all(any(c is b for b in bindings.values()) for c in encoded.containers)
    assert encoded.image_tokens == sum(1 for i in encoded.ids if i >= BASE)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.lists(text_pieces, max_size=10).map("".join))
def test_text_alone_never_becomes_a_container_id(tokenizer, prompt):
    try:
        encoded = tokenizer.encode_prompt(prompt, {})
    except InvalidInput:
        return  # e.g. an unbound `<image:…>` alias, or the reserved placeholder
    assert all(0 <= i < tokenizer.vocab_size for i in encoded.ids)
    assert encoded.containers == [] and encoded.image_tokens == 0


# -- both APIs from their OpenAPI schemas -------------------------------------------------------------

EXAMPLES_PER_OPERATION = 30  # 8 operations per API, fewer distinct requests for the simple ones


@pytest.fixture(scope="module")
def services(service_workers):
    # Real workers behind the APIs, so generated requests that are valid run to the end (and `?wait=`
    # returns) instead of waiting on a queue nobody serves.
    settings_ = service_workers.model_copy(update={"max_new_tokens": 4, "max_upload_bytes": 100_000})
    with api_server(create_embed_app(settings_)) as embed, api_server(create_generate_app(settings_)) as generate:
        yield {"embed": embed, "generate": generate}


@pytest.mark.parametrize("api", ["embed", "generate"])
def test_no_generated_request_gets_a_5xx(services, api):
    schema = schemathesis.openapi.from_url(f"{services[api]}/openapi.json")
    server_errors: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        # Valid requests (positive) and requests that break the schema on purpose (negative).
        strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def call(case):
            nonlocal calls
            if case.query and isinstance(case.query.get("wait"), (int, float)) and not isinstance(case.query["wait"], bool):
                case.query["wait"] = min(max(case.query["wait"], 0), 5)  # keep valid waits short
            response = case.call(timeout=60)
            calls += 1
            if response.status_code >= 500:
                server_errors.append(f"{case.method} {case.formatted_path} {case.query} {case.body!r:.200} → "
                                     f"{response.status_code} {response.text[:200]}")

        call()
    print(f"\n[fuzz {api} API] {calls} requests, {len(server_errors)} answered 5xx", flush=True)
    assert calls >= 100
    assert server_errors == []
