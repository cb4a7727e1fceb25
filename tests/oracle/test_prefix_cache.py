"""The paged engine's prefix cache and chunked prefill against transformers, for every family.

For LLaVA (Llama), Pixtral (Mistral with a sliding window), Qwen2-VL (M-RoPE) and Gemma 3
(sliding layers, bidirectional attention inside an image): a second question about an image
the engine has seen hits the cached blocks of the first — including a hit that ends inside
the image — and a second chat turn reuses the first turn's blocks; either way the greedy
tokens equal those of `transformers`' `generate` on the same prompt and those of an engine
with the prefix cache off and whole-prompt prefill. The expected hit lengths are block
arithmetic on the prompts (`expected_hit`): the longest common prefix rounded down to whole
blocks, then the rest of it, copied from the cached block that holds it (with Gemma 3, up to
an image it would end in or at).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from embedder_service.models import load_vision_model
from generator_service.engine import Engine, GenerationRequest
from generator_service.models.decoder import Chunk
from generator_service.sampling import SamplingParams
from generator_service.tokenizer import Tokenizer
from shared.config.errors import InvalidInput
from shared.modeling.checkpoint import Checkpoint
from shared.modeling.registry import family_for
from shared.store.container import EmbeddingContainer
from shared.store.token_ids import EMBEDDING_INDEX_BASE as BASE
from tests.support.tiny_models import (
    build_tiny_gemma3,
    build_tiny_llava,
    build_tiny_pixtral,
    build_tiny_qwen2_vl,
    load_gemma3_reference,
    load_pixtral_reference,
    load_qwen2_vl_reference,
    load_reference,
)

FAMILIES = {
    "llava": (build_tiny_llava, load_reference),
    "pixtral": (lambda path: build_tiny_pixtral(path, sliding_window=16), load_pixtral_reference),
    "qwen2_vl": (build_tiny_qwen2_vl, load_qwen2_vl_reference),
    "gemma3": (build_tiny_gemma3, load_gemma3_reference),
}
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=list(FAMILIES))
def s(request, tmp_path_factory):
    build, load = FAMILIES[request.param]
    path = build(tmp_path_factory.mktemp(request.param))
    lm = family_for(Checkpoint(path).config).load_language_class().from_checkpoint(path)
    vision = load_vision_model(path, dtype="float32")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    pixels = vision.preprocessor(image)
    (rows,) = vision.embed_batch([pixels])
    container = EmbeddingContainer(id="img", model="tiny", tenant="t", first_token_id=BASE + 7, num_tokens=rows.shape[0],
                                   embeddings=rows, layout=vision.layout_for(pixels), grid=vision.grid_for(pixels))
    return SimpleNamespace(family=request.param, lm=lm, ref=load(path), tok=Tokenizer.from_checkpoint(path), pixels=pixels,
                           container=container, placeholder=vision.image_prompt.placeholder(Tokenizer.from_checkpoint(path)))


def chat_ids(s, messages: list[dict]) -> list[int]:
    """Our IDs for a chat with the image in its user turns (the generator's chat path)."""
    parts = s.tok.render_chat(messages, s.placeholder)
    return s.tok.encode_with_images(parts, [s.container] * (len(parts) - 1), add_special_tokens=False).ids


def user(text: str, image: bool = True) -> dict:
    return {"role": "user", "content": [*([{"type": "image"}] if image else []), {"type": "text", "text": text}]}


def reference_inputs(s, ids: list[int]) -> dict:
    """The reference's inputs for our prompt: the image as its image token, pixels as our preprocessor's
    (equal to the reference processor's: tests/oracle/test_*_preprocess.py)."""
    config = s.ref.config
    image_token = getattr(config, "image_token_id", None) or config.image_token_index
    input_ids = torch.tensor([[image_token if i >= BASE else i for i in ids]])
    count = sum(i >= BASE for i in ids) // s.container.num_tokens  # the image's appearances
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if s.family == "qwen2_vl":
        inputs |= {"pixel_values": torch.cat([s.pixels.patches] * count), "image_grid_thw": torch.tensor([s.pixels.grid] * count),
                   "mm_token_type_ids": (input_ids == image_token).int()}
    else:
        inputs["pixel_values"] = torch.stack([s.pixels] * count)
    if s.family == "pixtral":
        inputs["image_sizes"] = torch.tensor([list(s.pixels.shape[-2:])] * count)
    if s.family == "gemma3":
        inputs["token_type_ids"] = (input_ids == image_token).long()
    return inputs


def transformers_greedy(s, ids: list[int]) -> list[int]:
    with torch.inference_mode():
        out = s.ref.generate(**reference_inputs(s, ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(ids):].tolist()


def engine(s, prefix_cache: bool, chunk: int, block_tokens: int = 16) -> Engine:
    return Engine(s.lm, max_batch=4, max_seq_len=512, eos_token_ids=s.tok.eos_token_ids, kv_cache_tokens=2048,
                  block_tokens=block_tokens, prefix_cache=prefix_cache, prefill_chunk_tokens=chunk)


def run(s, engine: Engine, ids: list[int], max_tokens: int = NEW_TOKENS):
    handle = engine.submit(GenerationRequest(ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), [s.container]))
    engine.run_until_idle()
    return handle.result()


def block_ending_inside_the_image(s, first: list[int], second: list[int]) -> tuple[int, int]:
    """A block size at which `second`'s hit on the blocks of `first` (a prompt alone, no token fed back) ends inside the
    image, and that hit: the shared prefix, rounded down to whole blocks, short of `second`'s last token."""
    image_at = second.index(s.container.first_token_id)
    shared = common_prefix(first, second)
    assert shared >= image_at + s.container.num_tokens  # the questions differ after the image
    hits = {b: min(shared, len(first), len(second) - 1) // b * b for b in range(2, 33)}
    sizes = [b for b, hit in hits.items() if image_at < hit < image_at + s.container.num_tokens]
    assert sizes, "no block size puts a block boundary inside the image"
    return sizes[-1], hits[sizes[-1]]


def expected_hit(s, written: list[int], second: list[int], block: int) -> int:
    """Positions of `second` the cache holds after a request wrote `written` (its prompt and the tokens it fed back):
    whole blocks of the common prefix (short of `second`'s last token), then the rest of it from the block after
    those when `written` filled that block — with Gemma 3's bidirectional images, up to an image that rest would end
    in or at (its keys depend on its tokens past the shared ones)."""
    shared = min(common_prefix(written, second), len(second) - 1)
    whole = shared // block * block
    if len(written) < whole + block:
        return whole
    if s.family == "gemma3":
        while shared > whole and second[shared - 1] >= BASE:
            shared -= 1
    return shared


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("chunk", [0, 7], ids=["whole-prompts", "chunks-of-7"])
def test_a_hit_ending_inside_the_image_gives_transformers_tokens(s, chunk):
    first = chat_ids(s, [user("Describe the picture.")])
    second = chat_ids(s, [user("What colour dominates it?")])
    block, hit = block_ending_inside_the_image(s, first, second)

    cached = engine(s, prefix_cache=True, chunk=chunk, block_tokens=block)
    answer = run(s, cached, first, max_tokens=block)  # its tokens fill the block the hit ends in: a copy's source
    result = run(s, cached, second)
    # Past the whole blocks, the positions up to where the questions differ come from that block (Gemma 3's too:
    # the shared part ends in the text after the image).
    assert result.usage.cached_tokens == expected_hit(s, first + answer.token_ids[:-1], second, block) > hit
    plain = run(s, engine(s, prefix_cache=False, chunk=0, block_tokens=block), second)
    assert plain.usage.cached_tokens == 0
    expected = transformers_greedy(s, second)
    assert plain.token_ids == expected
    assert result.token_ids == expected


def test_a_second_chat_turn_reuses_the_first(s):
    turn_one = [user("Describe the picture.")]
    first_ids = chat_ids(s, turn_one)
    cached = engine(s, prefix_cache=True, chunk=16)
    first = run(s, cached, first_ids)
    answer = s.tok.decode(first.token_ids)
    second_ids = chat_ids(s, [*turn_one, {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                              user("And the corners?", image=False)])
    # The first request's blocks: its prompt and the tokens it fed back (all but the last), whole blocks only.
    written = first_ids + first.token_ids[:-1]
    hit = expected_hit(s, written, second_ids, 16)
    assert hit >= len(first_ids) // 16 * 16 > 0
    result = run(s, cached, second_ids)
    assert result.usage.cached_tokens == hit
    expected = transformers_greedy(s, second_ids)
    assert run(s, engine(s, prefix_cache=False, chunk=0), second_ids).token_ids == expected
    assert result.token_ids == expected


def test_concurrent_requests_with_a_shared_image_prefix_and_chunks_mixed_with_decode(s):
    """Three questions about one image: one runs, then two arrive while it decodes, prefilled 5 tokens a step."""
    prompts = [chat_ids(s, [user(q)]) for q in ("Describe the picture.", "What is in the corner?", "Name a colour.")]
    cached = engine(s, prefix_cache=True, chunk=5, block_tokens=4)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    first_tokens: list[int] = []
    handles = [cached.submit(GenerationRequest(prompts[0], params, [s.container], on_token=first_tokens.append))]
    while not first_tokens:
        cached.step()  # until the first has its first token: its prompt blocks are cached
    handles += [cached.submit(GenerationRequest(p, params, [s.container])) for p in prompts[1:]]
    cached.run_until_idle()
    results = [h.result() for h in handles]
    assert all(r.usage.cached_tokens >= s.container.num_tokens // 4 * 4 for r in results[1:])
    plain = engine(s, prefix_cache=False, chunk=0)
    assert [r.token_ids for r in results] == [run(s, plain, p).token_ids for p in prompts]


@pytest.mark.parametrize("chunk", [0, 5], ids=["whole-prompts", "chunks-of-5"])
def test_questions_about_one_image_arriving_together_compute_it_once(s, chunk):
    """Three questions submitted at once: the first computes the shared blocks, the others wait for them."""
    prompts = [chat_ids(s, [user(q)]) for q in ("Describe the picture.", "What is in the corner?", "Name a colour.")]
    cached = engine(s, prefix_cache=True, chunk=chunk, block_tokens=4)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    handles = [cached.submit(GenerationRequest(p, params, [s.container])) for p in prompts]
    cached.run_until_idle()
    results = [h.result() for h in handles]
    hits = [min(common_prefix(prompts[0], p), len(p) - 1) // 4 * 4 for p in prompts[1:]]
    assert [r.usage.cached_tokens for r in results] == [0, *hits]
    assert min(hits) >= s.container.num_tokens
    plain = engine(s, prefix_cache=False, chunk=0)
    assert [r.token_ids for r in results] == [run(s, plain, p).token_ids for p in prompts]
    assert results[1].token_ids == transformers_greedy(s, prompts[1])


@pytest.mark.parametrize("chunk", [0, 5], ids=["whole-prompts", "chunks-of-5"])
def test_questions_arriving_together_after_a_chat_that_shares_their_first_tokens_compute_the_image_once(s, chunk):
    """A text chat left the chat template's first tokens cached, so two questions about the image, submitted together,
    each start with a copy of a block's first positions (`Engine._copy_partial_block`). The first computes the
    image's blocks; the second must still wait for them and take them, not compute them again."""
    chat = chat_ids(s, [user("Hello there.", image=False)])
    prompts = [chat_ids(s, [user(q)]) for q in ("Describe the picture.", "What is in the corner?")]
    shared = common_prefix(chat, prompts[0])
    block = next(b for b in (4, 3, 5, 6, 7) if shared % b)  # the text's cached positions end inside a block
    cached = engine(s, prefix_cache=True, chunk=chunk, block_tokens=block)
    run(s, cached, chat)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    handles = [cached.submit(GenerationRequest(p, params, [s.container])) for p in prompts]
    cached.run_until_idle()
    results = [h.result() for h in handles]
    hit = min(common_prefix(*prompts), len(prompts[1]) - 1) // block * block
    assert hit >= s.container.num_tokens
    assert results[1].usage.cached_tokens == hit
    plain = engine(s, prefix_cache=False, chunk=0)
    assert [r.token_ids for r in results] == [run(s, plain, p).token_ids for p in prompts]


def test_prefill_after_a_cached_prefix_ending_inside_the_image_matches_transformers_logits(s):
    """The model half of a mid-image hit: blocks of one prompt, computed whole, reused by another whose prefill starts
    inside the image (Gemma 3: its remaining image tokens still see the whole image, the cached ones saw it all)."""
    first = chat_ids(s, [user("Describe the picture.")])
    second = chat_ids(s, [user("What colour dominates it?")])
    image_at = second.index(s.container.first_token_id)
    block = 4
    hit = (image_at + s.container.num_tokens // 2) // block * block
    assert image_at < hit < image_at + s.container.num_tokens and common_prefix(first, second) >= hit
    c = s.container
    ranges, rows = torch.tensor([[c.first_token_id, c.num_tokens]]), c.embeddings
    cache = s.lm.new_cache(64, block)
    first_table = list(range(-(-len(first) // block)))
    positions, _ = s.lm.prompt_positions(first, [c])
    s.lm.prefill(torch.tensor(first), cache, first_table, ranges=ranges, rows=rows, positions=positions)
    table = first_table[: hit // block] + list(range(32, 32 + -(-(len(second) - hit) // block)))
    positions, _ = s.lm.prompt_positions(second, [c])
    got = s.lm.prefill(torch.tensor(second[hit:]), cache, table, start=hit, ranges=ranges, rows=rows, all_logits=True,
                       positions=None if positions is None else positions[..., hit:])
    with torch.inference_mode():
        expected = s.ref(**reference_inputs(s, second)).logits[0, hit:]
    assert (got - expected).abs().max() <= 1e-4


def test_an_image_run_through_the_layers_in_spans_gives_transformers_logits(s):
    """The model half of an image too long for a step's budget: its tokens through layer 0, then through the rest
    in a step beside another prompt's whole chunk (which runs layer 0 alone), from the hidden states the first span
    returned; both prompts' last logits are transformers'."""
    c = s.container
    prompt = chat_ids(s, [user("Describe the picture.")])
    other = chat_ids(s, [user("Name a colour.", image=False)])
    image_at = prompt.index(c.first_token_id)
    image_end, num_layers, block = image_at + c.num_tokens, s.lm.config.num_layers, 4
    ranges, rows = torch.tensor([[c.first_token_id, c.num_tokens]]), c.embeddings
    cache = s.lm.new_cache(64, block)
    table, other_table = list(range(-(-len(prompt) // block))), list(range(32, 32 + -(-len(other) // block)))
    positions, _ = s.lm.prompt_positions(prompt, [c])
    other_positions, _ = s.lm.prompt_positions(other, [])

    def chunk(start: int, end: int, **kwargs) -> Chunk:
        return Chunk(torch.tensor(prompt[start:end]), table, start, ranges, rows, None if positions is None else positions[..., start:end],
                     final=end == len(prompt), **kwargs)

    none = torch.tensor([], dtype=torch.long)
    s.lm.step(none, [], cache, None, [], [chunk(0, image_at)])
    _, _, (hidden,) = s.lm.step(none, [], cache, None, [], [chunk(image_at, image_end, layers=(0, 1))])
    _, other_logits, _ = s.lm.step(none, [], cache, None, [], [chunk(image_at, image_end, layers=(1, num_layers), hidden=hidden),
                                                               Chunk(torch.tensor(other), other_table, positions=other_positions)])
    _, logits, _ = s.lm.step(none, [], cache, None, [], [chunk(image_end, len(prompt))])
    with torch.inference_mode():
        expected = s.ref(**reference_inputs(s, prompt)).logits[0, -1]
        other_expected = s.ref(input_ids=torch.tensor([other])).logits[0, -1]
    assert (logits[0] - expected).abs().max() <= 1e-4
    assert (other_logits[0] - other_expected).abs().max() <= 1e-4


def test_prefill_chunks_never_end_inside_an_image(s, monkeypatch):
    """Chunks of 5 tokens over prompts with a cached prefix ending inside the image: with bidirectional images
    (Gemma 3) every chunk ends at an image's edge or the prompt's end; elsewhere chunks are the budget. The first
    prompt stops a token after the image, so the block the hit ends in is not cached whole and no copy of its first
    positions takes the second past the image."""
    second = chat_ids(s, [user("What colour dominates it?")])
    image_at = second.index(s.container.first_token_id)
    image_end = image_at + s.container.num_tokens
    first = second[: image_end + 1]
    spans, step = [], s.lm.step

    def recording(*args):
        spans.extend((chunk.start, chunk.start + chunk.ids.shape[0]) for chunk in args[-1])
        return step(*args)

    monkeypatch.setattr(s.lm, "step", recording)
    cached = engine(s, prefix_cache=True, chunk=5, block_tokens=block_ending_inside_the_image(s, first, second)[0])
    run(s, cached, first, max_tokens=1)
    run(s, cached, second, max_tokens=1)
    inside = [(a, b) for a, b in spans if image_at < b < image_end]
    assert spans[-1][1] == len(second)
    if s.lm.config.bidirectional_images:
        assert inside == []
        assert any(image_at < a < image_end for a, _ in spans)  # a hit ended inside the image
    else:
        assert inside and all(b - a == 5 for a, b in spans[:-1] if b != len(first))


def test_an_image_longer_than_the_budget_goes_through_the_layers_over_steps_beside_a_stream(s, monkeypatch):
    """Gemma 3's images attend both ways, so a chunk holds a whole one: a question arriving while another streams,
    chunks of 5, runs its image through a few layers a step, whole at each, every layer once and in order, within
    the budget beside the stream's token; both answers are transformers'. Other families chunk images like text."""
    first = chat_ids(s, [user("Describe the picture.")])
    second = chat_ids(s, [user("What colour dominates it?")])
    num_layers, steps, step = s.lm.config.num_layers, [], s.lm.step

    def recording(*args):
        steps.append([(c.start, c.start + c.ids.shape[0], c.layers) for c in args[-1]])
        return step(*args)

    monkeypatch.setattr(s.lm, "step", recording)
    plain = engine(s, prefix_cache=False, chunk=5)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    streamed: list[int] = []
    handles = [plain.submit(GenerationRequest(first, params, [s.container], on_token=streamed.append))]
    while not streamed:
        plain.step()
    steps.clear()  # the second question's steps from here
    handles.append(plain.submit(GenerationRequest(second, params, [s.container])))
    plain.run_until_idle()
    assert [h.result().token_ids for h in handles] == [transformers_greedy(s, first), transformers_greedy(s, second)]

    image_at = second.index(s.container.first_token_id)
    layered = [(chunk, len(chunks)) for chunks in steps for chunk in chunks if chunk[2] is not None]
    if not s.lm.config.bidirectional_images:
        assert layered == []
        return
    assert {(a, b) for (a, b, _), _ in layered} == {(image_at, image_at + s.container.num_tokens)}
    ranges = [layers for (_, _, layers), _ in layered]
    assert ranges[0][0] == 0 and ranges[-1][1] == num_layers and len(ranges) > 1
    assert all(earlier[1] == later[0] for earlier, later in zip(ranges, ranges[1:]))
    costs = [sum(-(-(b - a) * (layers[1] - layers[0]) // num_layers) if layers else b - a for a, b, layers in chunks) for chunks in steps]
    assert all(cost <= 5 for cost, chunks in zip(costs, steps) if any(layers for _, _, layers in chunks))


def test_prompts_arriving_together_keep_every_step_within_the_budget(s, monkeypatch):
    """Two prompts arriving together, chunks of 5, the second starting with its image: every step's chunks cost at
    most the budget — an image going through some of the layers (Gemma 3's go whole) costs its share of them — but
    a step of one chunk, an image whose single layer overruns it."""
    first = chat_ids(s, [user("Describe the picture.")])
    first = first[:-1] if len(first) % 5 == 0 else first
    second = list(range(s.container.first_token_id, s.container.first_token_id + s.container.num_tokens)) + first[-3:]
    num_layers, steps, layered, step = s.lm.config.num_layers, [], [], s.lm.step

    def recording(*args):
        steps.append([-(-c.ids.shape[0] * (c.layers[1] - c.layers[0]) // num_layers) if c.layers else c.ids.shape[0]
                      for c in args[-1]])
        layered.extend(c.layers for c in args[-1] if c.layers)
        return step(*args)

    monkeypatch.setattr(s.lm, "step", recording)
    plain = engine(s, prefix_cache=False, chunk=5)
    handles = [plain.submit(GenerationRequest(ids, SamplingParams(temperature=0, max_tokens=2), [s.container]))
               for ids in (first, second)]
    plain.run_until_idle()
    assert all(len(h.result().token_ids) == 2 for h in handles)
    assert all(sum(costs) <= 5 or len(costs) == 1 for costs in steps)
    assert bool(layered) == s.lm.config.bidirectional_images  # only an image that goes whole goes a few layers a step


def test_a_copy_stops_before_an_image_it_would_end_in_where_image_tokens_attend_both_ways(s):
    """A prompt of IDs may hold part of a container's rows. One that shares a cached prompt's start up to inside
    the image: where the image's tokens attend both ways (Gemma 3) the cached keys of that image's rows saw the rest
    of it, so neither a block ending inside it hits (its hash covers the rest of the image) nor does the copy after
    the whole blocks take its rows: the hit stops where the image starts. Elsewhere it runs to where the prompts
    differ. Either way the tokens are those of an engine without the prefix cache."""
    first = chat_ids(s, [user("Describe the picture.")])
    image_at = first.index(s.container.first_token_id)
    image_end = image_at + s.container.num_tokens
    cut = image_at + s.container.num_tokens // 2
    second = first[:cut] + first[image_end:]  # the image's first half, then the same text
    cached = engine(s, prefix_cache=True, chunk=0, block_tokens=4)
    run(s, cached, first, max_tokens=2)
    if s.family == "qwen2_vl":  # M-RoPE places an image's rows on its grid: part of one is refused
        with pytest.raises(InvalidInput, match="must appear whole"):
            run(s, cached, second)
        return
    result = run(s, cached, second)
    assert result.usage.cached_tokens == (image_at if s.lm.config.bidirectional_images else cut)
    assert result.token_ids == run(s, engine(s, prefix_cache=False, chunk=0, block_tokens=4), second).token_ids
