"""The engine: greedy parity with transformers' generate, batched = alone, seeds, finish reasons, validation."""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext

import pytest
import torch

from generator_service.engine import Engine, GenerationRequest
from generator_service.worker import start_engine
from generator_service.models.llama import LlamaForCausalLM
from generator_service.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
)
from generator_service.stops import StopMatcher
from generator_service.tokenizer import Tokenizer
from shared.config.errors import InvalidInput, ModelMismatch
from shared.modeling.turns import Turns
from shared.store.container import EmbeddingContainer
from shared.store.token_ids import EMBEDDING_INDEX_BASE as BASE
from tests.support.tiny_models import build_tiny_llava, load_reference

GREEDY = SamplingParams(temperature=0, max_tokens=32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = build_tiny_llava(tmp_path_factory.mktemp("engine") / "llava")
    ref = load_reference(path)
    model = LlamaForCausalLM.from_checkpoint(path)
    tok = Tokenizer.from_checkpoint(path)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = list(ref.get_image_features(pixel_values=pixels).pooler_output)
    images = [
        EmbeddingContainer(id=f"img{i}", model="tiny", tenant="t", first_token_id=BASE + 100 * i,
                           num_tokens=f.shape[0], embeddings=f)
        for i, f in enumerate(features)
    ]
    return ref, model, tok, pixels, images


def engine_for(model, tok, max_batch=4, max_seq_len=128) -> Engine:
    return Engine(model, max_batch=max_batch, max_seq_len=max_seq_len, eos_token_ids=tok.eos_token_ids)


def generate_alone(model, tok, prompt, params, containers=()) -> list[int]:
    engine = engine_for(model, tok, max_batch=1)
    handle = engine.submit(GenerationRequest(prompt, params, containers))
    engine.run_until_idle()
    return handle.result().token_ids


def test_greedy_with_an_image_matches_transformers_generate(setup):
    ref, model, tok, pixels, images = setup
    encoded = tok.encode_prompt(f"USER: {images[0].alias}\nDescribe the picture. ASSISTANT:", {images[0].alias: images[0]})
    ref_ids = [ref.config.image_token_index if i >= BASE else i for i in encoded.ids]
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor([ref_ids]), pixel_values=pixels[:1], max_new_tokens=32, do_sample=False)
    expected = out[0, len(ref_ids):].tolist()
    engine = engine_for(model, tok)
    handle = engine.submit(GenerationRequest(encoded.ids, GREEDY, encoded.containers))
    engine.run_until_idle()
    result = handle.result()
    assert result.token_ids == expected
    assert len(expected) >= 8  # a real sequence, not an immediate EOS
    assert result.usage.prompt_tokens == len(encoded.ids)
    assert result.usage.image_tokens == images[0].num_tokens
    assert result.usage.completion_tokens == len(expected)


def test_greedy_with_repetition_penalty_matches_transformers(setup):
    ref, model, tok, _, _ = setup
    prompt = tok.encode("A photo of a cat sitting on a red sofa.")
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor([prompt]), max_new_tokens=24, do_sample=False, repetition_penalty=1.5)
    params = SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.5)
    assert generate_alone(model, tok, prompt, params) == out[0, len(prompt):].tolist()


def test_repetition_penalty_ignores_container_ids(setup):
    """Image IDs are not text: the penalty's history is the prompt's text IDs plus the output."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    _, model, tok, _, images = setup
    a = images[0]
    prompt = tok.encode_prompt(f"{a.alias} Describe", {a.alias: a})
    ranges, rows = torch.tensor([[a.first_token_id, a.num_tokens]]), a.embeddings
    penalty, expected = RepetitionPenaltyLogitsProcessor(2.0), []
    for _ in range(8):  # the oracle: full forward each step, transformers' processor on the text history
        ids = prompt.ids + expected
        logits = model.prefill(torch.tensor(ids), model.new_cache(1, 64), 0, ranges=ranges, rows=rows)
        history = torch.tensor([[i for i in ids if i < BASE]])
        expected.append(int(penalty(history, logits).argmax()))
    params = SamplingParams(temperature=0, max_tokens=8, repetition_penalty=2.0, ignore_eos=True)
    assert generate_alone(model, tok, prompt.ids, params, prompt.containers) == expected


def test_batched_requests_joining_at_different_steps_equal_running_alone(setup):
    _, model, tok, _, images = setup
    a, b = images
    prompts = [
        (tok.encode_prompt(f"{a.alias} What is this?", {a.alias: a}), SamplingParams(temperature=0, max_tokens=20)),
        (tok.encode_prompt("The quick brown fox", {}), SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)),
        (tok.encode_prompt(f"Compare {a.alias} and {b.alias} now.", {a.alias: a, b.alias: b}),
         SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)),
        (tok.encode_prompt("Describe", {}), SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)),
    ]
    alone = [generate_alone(model, tok, p.ids, params, p.containers) for p, params in prompts]

    engine = engine_for(model, tok, max_batch=3)  # 4 requests, 3 rows: one waits for a row to free up
    handles = [engine.submit(GenerationRequest(prompts[0][0].ids, prompts[0][1], prompts[0][0].containers))]
    engine.step()
    engine.step()
    handles += [engine.submit(GenerationRequest(p.ids, params, p.containers)) for p, params in prompts[1:3]]
    engine.step()
    handles.append(engine.submit(GenerationRequest(prompts[3][0].ids, prompts[3][1])))
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    assert [h.result().token_ids for h in handles] == alone
    assert steps < sum(len(t) for t in alone)  # they really ran together


def test_seed_gives_the_same_tokens_regardless_of_batch_mates(setup):
    _, model, tok, _, images = setup
    a = images[0]
    prompt = tok.encode_prompt(f"{a.alias} Tell me", {a.alias: a})
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, max_tokens=20, seed=1234, ignore_eos=True)
    alone = generate_alone(model, tok, prompt.ids, params, prompt.containers)

    engine = engine_for(model, tok)
    mates = [engine.submit(GenerationRequest(tok.encode("noise"), SamplingParams(temperature=1.3, seed=s, max_tokens=15)))
             for s in (1, 2)]
    engine.step()
    handle = engine.submit(GenerationRequest(prompt.ids, params, prompt.containers))
    engine.run_until_idle()
    assert handle.result().token_ids == alone
    assert all(m.result().finish_reason in ("stop", "length") for m in mates)

    other = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, max_tokens=20, seed=4321, ignore_eos=True)
    assert generate_alone(model, tok, prompt.ids, other, prompt.containers) != alone


def test_top_k_1_equals_greedy(setup):
    _, model, tok, _, _ = setup
    prompt = tok.encode("A photo of")
    greedy = generate_alone(model, tok, prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    top1 = generate_alone(model, tok, prompt, SamplingParams(temperature=0.8, top_k=1, max_tokens=16, seed=3, ignore_eos=True))
    assert top1 == greedy


def test_finish_reasons(setup):
    _, model, tok, _, _ = setup
    prompt = tok.encode("The quick brown fox")
    long = generate_alone(model, tok, prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))

    engine = engine_for(model, tok)
    by_length = engine.submit(GenerationRequest(prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)))
    by_stop_id = engine.submit(GenerationRequest(prompt, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(long[3],))))
    engine.run_until_idle()
    assert (by_length.result().token_ids, by_length.result().finish_reason) == (long[:5], "length")
    stop_at = long.index(long[3]) + 1
    assert (by_stop_id.result().token_ids, by_stop_id.result().finish_reason) == (long[:stop_at], "stop")

    eos_engine = Engine(model, max_batch=2, max_seq_len=128, eos_token_ids=(long[2],))
    by_eos = eos_engine.submit(GenerationRequest(prompt, SamplingParams(temperature=0, max_tokens=12)))
    eos_engine.run_until_idle()
    assert by_eos.result().finish_reason == "stop"
    assert by_eos.result().token_ids == long[: long.index(long[2]) + 1]


def test_the_context_limits_generation(setup):
    _, model, tok, _, _ = setup
    prompt = tok.encode("The quick brown fox")
    engine = Engine(model, max_batch=1, max_seq_len=len(prompt) + 4)
    handle = engine.submit(GenerationRequest(prompt, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)))
    engine.run_until_idle()
    assert (len(handle.result().token_ids), handle.result().finish_reason) == (4, "length")


def test_stop_strings_through_the_token_callback(setup):
    _, model, tok, _, _ = setup
    prompt = tok.encode("The quick brown fox")
    full = tok.decode(generate_alone(model, tok, prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)))
    stop_text = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop_text and stop_text in full

    decoder, stops, streamed = tok.stream_decoder(), StopMatcher([stop_text]), []

    def on_token(token: int) -> bool:
        text, stopped = stops.push(decoder.push(token))
        streamed.append(text)
        return stopped

    engine = engine_for(model, tok)
    handle = engine.submit(GenerationRequest(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), on_token=on_token))
    engine.run_until_idle()
    assert handle.result().finish_reason == "stop"
    assert "".join(streamed) == full[: full.index(stop_text)]


def test_stop_matcher_holds_back_what_may_start_a_stop_string():
    stops = StopMatcher(["END", "\n\n"])
    assert stops.push("hello E") == ("hello ", False)
    assert stops.push("N") == ("", False)
    assert stops.push("Dless") == ("", True)
    stops = StopMatcher(["END"])
    assert stops.push("hello EN") == ("hello ", False)
    assert stops.push("ough") == ("ENough", False)
    stops = StopMatcher(["stop"])
    assert stops.push("no st") == ("no ", False)
    assert stops.flush() == "st"
    assert StopMatcher(["ab", "b"]).push("xab") == ("x", True)  # the earliest stop wins


def test_prompt_longer_than_the_context_names_both_lengths(setup):
    _, model, tok, _, _ = setup
    engine = Engine(model, max_batch=1, max_seq_len=16)
    with pytest.raises(InvalidInput, match=r"20 tokens.*context of 16"):
        engine.submit(GenerationRequest([5] * 20, GREEDY))


def test_forged_and_mismatched_containers_are_refused_at_submit(setup):
    _, model, tok, _, images = setup
    engine = engine_for(model, tok)
    with pytest.raises(InvalidInput, match=str(BASE + 555)):
        engine.submit(GenerationRequest([1, 5, BASE + 555], GREEDY, images))
    wrong = EmbeddingContainer(id="wide", model="x", tenant="t", first_token_id=BASE + 900, num_tokens=2,
                               embeddings=torch.zeros(2, 32))
    with pytest.raises(ModelMismatch, match="hidden size 32"):
        engine.submit(GenerationRequest([1, BASE + 900], GREEDY, [wrong]))


@pytest.mark.parametrize(
    "field, value",
    [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("max_tokens", 0),
     ("repetition_penalty", 0.0), ("seed", -5), ("temperature", float("nan"))],
)
def test_sampling_params_are_validated_by_name(field, value):
    with pytest.raises(InvalidInput, match=field):
        SamplingParams(**{field: value})


def test_submission_from_other_threads_while_the_engine_runs(setup):
    _, model, tok, _, _ = setup
    engine = engine_for(model, tok)
    stop = threading.Event()
    loop = threading.Thread(target=engine.run_forever, args=(stop,), daemon=True)
    loop.start()
    try:
        results: list = [None] * 4

        def client(i: int) -> None:
            params = SamplingParams(temperature=0, max_tokens=6 + i, ignore_eos=True)
            results[i] = engine.submit(GenerationRequest(tok.encode("a dog"), params)).result(timeout=60)

        clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(timeout=60)
    finally:
        stop.set()
        loop.join(timeout=10)
    assert [len(r.token_ids) for r in results] == [6, 7, 8, 9]
    assert len({tuple(r.token_ids[:6]) for r in results}) == 1


def test_stopping_the_loop_cancels_what_is_left(setup):
    _, model, tok, _, _ = setup
    engine = engine_for(model, tok, max_batch=1)
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    handles = [engine.submit(GenerationRequest(tok.encode("a dog"), params)) for _ in range(2)]
    stop = threading.Event()
    stop.set()
    engine.run_forever(stop)
    assert [h.result(timeout=1).finish_reason for h in handles] == ["cancelled", "cancelled"]


def test_warm_up_runs_the_model_and_leaves_nothing_a_request_sees(setup, monkeypatch):
    _, model, tok, _, _ = setup
    steps = []
    monkeypatch.setattr(model, "step", lambda *args: steps.append(1) or LlamaForCausalLM.step(model, *args))
    engine = Engine(model, max_batch=4, max_seq_len=128, eos_token_ids=tok.eos_token_ids, block_tokens=16,
                    prefix_cache=True, prefill_chunk_tokens=32)
    engine.warm_up()
    assert steps  # a chunk-sized prompt went through the model
    assert engine.pool.used == 0 and engine.pool.available == engine.pool.num_blocks
    assert (engine.stats.prefix_lookup_tokens, engine.stats.ttft.counts[-1], engine.stats.itl.counts[-1]) == (0, 0, 0)
    # The warm-up's prompt was 32 × token 0: the same tokens under any tenant's salt find none of its blocks.
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    handle = engine.submit(GenerationRequest([0] * 40, params))
    engine.run_until_idle()
    assert handle.result().usage.cached_tokens == 0
    assert handle.result().token_ids == generate_alone(model, tok, [0] * 40, params)
    assert engine.stats.ttft.counts[-1] == 1


def test_a_model_that_cannot_run_fails_its_warm_up(setup, monkeypatch):
    _, model, tok, _, _ = setup

    def broken(*args):
        raise RuntimeError("the weights are on a device that is gone")

    monkeypatch.setattr(model, "step", broken)
    with pytest.raises(RuntimeError, match="device that is gone"):
        start_engine(engine_for(model, tok), nullcontext())


def test_cancel(setup):
    _, model, tok, _, _ = setup
    engine = engine_for(model, tok)
    handle = engine.submit(GenerationRequest(tok.encode("a dog"), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)))
    engine.step()
    handle.cancel()
    engine.run_until_idle()
    assert handle.result().finish_reason == "cancelled"
    assert len(handle.result().token_ids) == 2


# -- the sampling functions against transformers' logits processors ------------------------


def test_processors_match_transformers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 300, generator=g) * 3
    history = torch.randint(0, 300, (1, 20), generator=g)
    seen = torch.zeros(300, dtype=torch.bool)
    seen[history[0]] = True
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())[0]
    assert torch.equal(apply_repetition_penalty(logits[0], seen, 1.3), expected)
    for k in (1, 5, 299):
        assert torch.equal(apply_top_k(logits[0], k), TopKLogitsWarper(k)(history, logits.clone())[0])
    for p in (0.1, 0.5, 0.9, 0.999):
        assert torch.equal(apply_top_p(logits[0], p), TopPLogitsWarper(p)(history, logits.clone())[0])


def test_the_loop_steps_only_while_it_holds_its_turn(setup):
    # `vlmq worker all`: the engine and the vision batches share the cores by taking turns.
    _, model, tok, _, _ = setup
    engine = engine_for(model, tok)
    turns, stop = Turns(), threading.Event()
    loop = threading.Thread(target=engine.run_forever, args=(stop,), kwargs={"turns": turns}, daemon=True)
    loop.start()
    try:
        with turns:  # a vision batch runs
            handle = engine.submit(GenerationRequest(tok.encode("a dog"), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)))
            time.sleep(0.3)
            assert not handle.done() and engine.num_running == 0
        assert len(handle.result(timeout=60).token_ids) == 4
    finally:
        stop.set()
        loop.join(timeout=10)
