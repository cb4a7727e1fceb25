"""Chat templates render exactly as transformers' apply_chat_template(tokenize=False); a chat's images become
container IDs exactly where transformers puts the image token."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from generator_service.chat_template import ChatTemplate
from generator_service.tokenizer import Tokenizer
from shared.config.errors import InvalidInput
from shared.modeling.checkpoint import Checkpoint
from shared.modeling.families.llava import LlavaImagePrompt
from shared.store.container import EmbeddingContainer
from shared.store.token_ids import EMBEDDING_INDEX_BASE as BASE
from tests.support.tiny_models import build_tiny_llava

CONVERSATIONS = {
    "string content": [{"role": "user", "content": "What is in the picture?"}],
    "list content": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
    ],
    "system and turns": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image"}, {"type": "image"}]},
        {"role": "assistant", "content": "Two cats."},
        {"role": "user", "content": "And the colours? 猫 😀"},
    ],
    "none values dropped": [{"role": "user", "content": "x", "tool_calls": None}],
}

# Exercises what transformers adds to Jinja: tojson without escaping, namespace, loop controls,
# raise_exception, the generation tag, special-token variables, trim/lstrip blocks.
RICH_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(count=0) %}
{% for message in messages %}
    {% if message['role'] == 'tool' %}{% continue %}{% endif %}
    {% set ns.count = ns.count + 1 %}
    <{{ message['role'] }}>{{ message['content'] | tojson }}
    {% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}{{ eos_token }}{% endif %}
{% endfor %}
{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}
{{ ns.count }}{% if add_generation_prompt %}<assistant>{% endif %}"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("chat") / "llava")


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_model_template_matches_transformers(checkpoint, hf, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    ours = Tokenizer.from_checkpoint(checkpoint).apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_transformers_extensions_match(hf, add_generation_prompt):
    messages = [
        {"role": "system", "content": "Être <b>&</b> \"quoted\""},
        {"role": "tool", "content": "skipped"},
        {"role": "user", "content": [{"type": "text", "text": "猫 😀"}]},
        {"role": "assistant", "content": "Sure."},
    ]
    tools = [{"name": "lookup", "parameters": {"q": "ü"}}]
    expected = hf.apply_chat_template(
        messages, tools=tools, chat_template=RICH_TEMPLATE, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    ours = ChatTemplate(RICH_TEMPLATE, {"bos_token": hf.bos_token, "eos_token": hf.eos_token})
    assert ours.render(messages, tools=tools, add_generation_prompt=add_generation_prompt) == expected


def test_raise_exception_and_strftime_now():
    template = ChatTemplate("{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
                            "{{ strftime_now('%Y') | length }}")
    assert template.render([{"role": "user", "content": "x"}]) == "4"
    with pytest.raises(InvalidInput, match="one message only"):
        template.render([{"role": "user", "content": "x"}] * 2)


def test_the_sandbox_blocks_python_internals():
    template = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidInput):
        template.render([{"role": "user", "content": "x"}])


def test_template_inside_tokenizer_config_of_older_checkpoints(checkpoint, hf, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(checkpoint, folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    messages = CONVERSATIONS["system and turns"]
    ours = Tokenizer.from_checkpoint(folder).apply_chat_template(messages, add_generation_prompt=True)
    assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# -- images -------------------------------------------------------------------------------


def container(cid: str, first: int, count: int) -> EmbeddingContainer:
    return EmbeddingContainer(id=cid, model="m", tenant="t", first_token_id=first, num_tokens=count, embeddings=torch.zeros(count, 4))


@pytest.fixture(scope="module")
def tok(checkpoint):
    return Tokenizer.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def placeholder(checkpoint, tok):
    return LlavaImagePrompt(Checkpoint(checkpoint)).placeholder(tok)


@pytest.mark.parametrize("name", ["list content", "system and turns"])
def test_chat_images_become_ids_where_transformers_puts_the_image_token(tok, hf, placeholder, name):
    """The generator's chat path: the rendered template cut at each image part's `<image>`, a container's IDs in each place."""
    messages = CONVERSATIONS[name]
    images = [container(f"c{i}", BASE + 100 * i, 3 + i) for i in range(sum(
        part.get("type") == "image" for m in messages if isinstance(m["content"], list) for part in m["content"]))]
    encoded = tok.encode_with_images(tok.render_chat(messages, placeholder), images, add_special_tokens=False)

    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image_id, queue = hf.convert_tokens_to_ids(placeholder), iter(images)
    expected = [i for token in hf(text, add_special_tokens=False)["input_ids"]
                for i in (next(queue).token_ids() if token == image_id else [token])]
    assert placeholder == "<image>" and encoded.ids == expected
    assert encoded.containers == images and encoded.image_tokens == sum(c.num_tokens for c in images)


def test_placeholders_that_are_not_the_image_parts_are_refused_by_count(tok, placeholder):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and <image> typed by hand"}]}]
    with pytest.raises(InvalidInput, match=r"1 images but its rendered prompt has 2 image placeholders '<image>'"):
        tok.render_chat(messages, placeholder)
    with pytest.raises(InvalidInput, match="names no image placeholder"):
        tok.render_chat(messages, None)


def test_without_image_parts_the_placeholder_is_text(tok, hf, placeholder):
    messages = [{"role": "user", "content": "what does <image> mean?"}]
    (text,) = tok.render_chat(messages, placeholder)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.encode_with_images([text], [], add_special_tokens=False).ids == hf(text, add_special_tokens=False)["input_ids"]
    assert hf.convert_tokens_to_ids(placeholder) in hf(text, add_special_tokens=False)["input_ids"]  # the image token, as text
