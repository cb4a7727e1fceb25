"""Chat templates render exactly as transformers' apply_chat_template(tokenize=False)."""

from __future__ import annotations

import json
import shutil

import pytest

from generator_service.chat_template import ChatTemplate
from generator_service.tokenizer import Tokenizer
from shared.config.errors import InvalidInput
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
