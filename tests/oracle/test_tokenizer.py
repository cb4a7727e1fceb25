"""Tokenizer: parity with transformers' AutoTokenizer, alias substitution, forged IDs, streaming decode."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from generator_service.tokenizer import Tokenizer, check_token_ids, default_alias_ids
from shared.config.errors import InvalidInput
from shared.store.container import EmbeddingContainer, Layout
from shared.store.token_ids import EMBEDDING_INDEX_BASE as BASE
from tests.support.tiny_models import build_tiny_llava

TEXTS = [
    "A photo of a cat sitting on a red sofa.",
    "  leading spaces, trailing spaces  ",
    "line one\nline two\n\n\ttabbed",
    "Émile a vu un château — très beau! 猫と犬 😀🐱👍🏽",
    "specials inline: <s> and </s> and <image> stay special",
    "numbers 3.14159 and symbols #@$%^&*()[]{}",
    "",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tok") / "llava")


@pytest.fixture(scope="module")
def tok(checkpoint):
    return Tokenizer.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


def container(first: int, count: int, cid: str | None = None, **kw) -> EmbeddingContainer:
    return EmbeddingContainer(
        id=cid or f"c{first}", model="m", tenant="t", first_token_id=first, num_tokens=count,
        embeddings=torch.zeros(count, 4), **kw,
    )


def hf_expected(hf, text_with_image_tokens: str, containers: list[EmbeddingContainer]) -> list[int]:
    """transformers' encoding of the prompt with `<image>` where each alias was, each replaced by its IDs."""
    image_id = hf.convert_tokens_to_ids("<image>")
    out, queue = [], iter(containers)
    for token in hf(text_with_image_tokens)["input_ids"]:
        out.extend(next(queue).token_ids() if token == image_id else [token])
    return out


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok, hf, text):
    assert tok.encode(text) == hf(text)["input_ids"]
    assert tok.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers(tok, hf, text):
    ids = hf(text)["input_ids"]
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)


def test_special_tokens_and_eos(tok, hf):
    assert tok.bos_token_id == hf.bos_token_id == 1
    assert tok.id_to_token(4) == hf.convert_ids_to_tokens(4) == "<image>"
    assert tok.token_to_id("<image>") == 4
    assert tok.eos_token_ids == (hf.eos_token_id,)
    assert tok.special_tokens["pad_token"] == hf.pad_token


def test_eos_list_from_generation_config_and_bos_from_the_post_processor(checkpoint, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [2, 7]}))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    ours = Tokenizer.from_checkpoint(folder)
    assert ours.eos_token_ids == (2, 7)
    # tokenizer.json's post-processor adds BOS; transformers 5 follows it over add_bos_token, and so do we.
    assert ours.encode("a cat") == AutoTokenizer.from_pretrained(folder)("a cat")["input_ids"]
    assert ours.encode("a cat")[0] == 1


def test_without_a_post_processor_add_bos_and_eos_token_decide(checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    (folder / "tokenizer.json").write_text(json.dumps({**spec, "post_processor": None}))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    plain = Tokenizer.from_checkpoint(folder).encode("a cat")
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True, "add_eos_token": True}))
    assert Tokenizer.from_checkpoint(folder).encode("a cat") == [1, *plain, 2]


def test_decode_skips_container_ids(tok):
    ids = tok.encode("a cat") + [BASE, BASE + 1] + tok.encode("a dog", add_special_tokens=False)
    assert tok.decode(ids) == "a cata dog"


# -- aliases -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, aliases",
    [
        ("Describe <a> please.", ["<a>"]),
        ("<a> at the start", ["<a>"]),
        ("at the end <a>", ["<a>"]),
        ("first <a> then <b> and <a> again", ["<a>", "<b>", "<a>"]),
        ("adjacent <a><b> aliases", ["<a>", "<b>"]),
        ("<a>", ["<a>"]),
        ("regex [img](1)*+? and $^|\\d here", ["[img](1)*+?", "$^|\\d"]),
        ("unicode 猫<a>😀<b>", ["<a>", "<b>"]),
    ],
)
def test_aliases_are_replaced_where_transformers_puts_the_image_token(tok, hf, prompt, aliases):
    names = list(dict.fromkeys(aliases))
    bound = {name: container(BASE + 100 * i, 3 + i) for i, name in enumerate(names)}
    text = prompt
    for name in sorted(names, key=len, reverse=True):
        text = text.replace(name, "<image>")
    encoded = tok.encode_prompt(prompt, bound)
    assert encoded.ids == hf_expected(hf, text, [bound[a] for a in aliases])
    assert encoded.containers == [bound[n] for n in names]
    assert encoded.image_tokens == sum(bound[a].num_tokens for a in aliases)


def test_default_aliases_resolve_and_are_listed(tok, hf):
    a, b = container(BASE, 4, "aa11"), container(BASE + 10, 2, "bb22")
    prompt = f"Compare {a.alias} with {b.alias}, then {a.alias}."
    assert default_alias_ids(prompt) == ["aa11", "bb22"]
    encoded = tok.encode_prompt(prompt, {a.alias: a, b.alias: b})
    assert encoded.ids == hf_expected(hf, "Compare <image> with <image>, then <image>.", [a, b, a])


def test_an_unbound_default_alias_is_an_error_naming_it(tok):
    a = container(BASE, 4, "aa11")
    with pytest.raises(InvalidInput, match="<image:ff00>"):
        tok.encode_prompt(f"{a.alias} and <image:ff00>", {a.alias: a})
    with pytest.raises(InvalidInput, match="<image:ff00>"):
        tok.encode_prompt("just <image:ff00>")


def test_a_default_alias_bound_to_another_container_is_refused(tok):
    with pytest.raises(InvalidInput, match="<image:aa11>"):
        tok.encode_prompt("<image:aa11>", {"<image:aa11>": container(BASE, 4, "bb22")})


def test_layout_ids_surround_the_image_ids(tok):
    c = container(BASE, 4, layout=Layout(before=(5,), after=(6,), row_length=2, row_break_id=7))
    ids = tok.encode_prompt("x <a>", {"<a>": c}).ids
    assert ids[-7:] == [5, BASE, BASE + 1, 7, BASE + 2, BASE + 3, 6]


def test_prompt_longer_than_the_context_names_both_lengths(tok):
    c = container(BASE, 30)
    prompt = "look closely at <a> and then tell me everything that you can see there"
    length = len(tok.encode_prompt(prompt, {"<a>": c}).ids)
    assert length > 40
    with pytest.raises(InvalidInput, match=rf"{length} tokens.*context of 40"):
        tok.encode_prompt(prompt, {"<a>": c}, max_length=40)
    # Images that alone exceed it are refused by their sizes, before any text is encoded.
    with pytest.raises(InvalidInput, match="images alone take 50 tokens, over the context of 40"):
        tok.encode_prompt("look <a> here", {"<a>": container(BASE, 50)}, max_length=40)


def test_forged_ids_are_refused_by_name():
    c = container(BASE + 10, 5)
    check_token_ids([1, 2, BASE + 10, BASE + 14], [c], vocab_size=400)
    for forged in (BASE + 9, BASE + 15, BASE):
        with pytest.raises(InvalidInput, match=str(forged)):
            check_token_ids([1, forged], [c], vocab_size=400)
    with pytest.raises(InvalidInput, match=str(BASE + 3)):
        check_token_ids([BASE + 3], [])
    with pytest.raises(InvalidInput, match="401"):
        check_token_ids([401], [c], vocab_size=400)


# -- streaming ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", [t for t in TEXTS if t] + ["😀😀😀 multi-byte: ñ ü ß 中文 한국어 🇫🇷"])
def test_stream_decoder_never_emits_broken_characters(tok, text):
    ids = tok.encode(text) + [BASE, BASE + 1] + tok.encode("🐱 end", add_special_tokens=False)
    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)
    # The emoji really is split over several byte tokens, so holding back was exercised.
    assert len(tok.encode("🐱", add_special_tokens=False)) > 1


def test_stream_decoder_flushes_an_unfinished_character(tok):
    ids = tok.encode("a 😀", add_special_tokens=False)[:-1]  # cut inside the emoji's bytes
    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + decoder.flush() == tok.decode(ids)
