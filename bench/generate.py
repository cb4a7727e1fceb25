"""Generation benchmark on *bench-small* (DESIGN §8): vlmq's engine against `transformers` on the same weights.

A SmolLM2-135M-shaped Llama (random weights, tied embeddings) inside a LLaVA
checkpoint with a tiny vision tower (not measured) is written to a temp dir; the
prompt is token IDs: text around one image of 196 rows (a container for vlmq,
`inputs_embeds` for transformers). Prints one JSON line per metric:

  decode_tokens_per_s_b1            batch-1 greedy decode vs transformers `generate`      target ≥ 1.1×
  decode_roofline_fraction          batch-1 decode vs memory bandwidth ÷ weight bytes      target ≥ 0.8
  aggregate_decode_tokens_per_s_b8  8 concurrent requests decoding vs batch 1              target ≥ 4×
  prefill_image_vs_text             prefill with 196 injected rows vs text only            target ≤ 1.05×

Decode rates exclude the prefill: (N - 1) tokens ÷ (time for N tokens - time for 1),
both sides measured the same way (transformers with min_new_tokens so it makes N).
Times are best-of-R, run round-robin (the machine is shared; see `best_times`).

Usage: python bench/generate.py [--threads 2] [--new-tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator_service.engine import Engine, GenerationRequest  # noqa: E402
from generator_service.models.llama import LlamaForCausalLM  # noqa: E402
from generator_service.sampling import SamplingParams  # noqa: E402
from shared.checkpoint import Checkpoint  # noqa: E402
from shared.container import EmbeddingContainer  # noqa: E402
from shared.token_ids import EMBEDDING_INDEX_BASE  # noqa: E402

IMAGE_TOKENS = 196
TEXT_BEFORE, TEXT_AFTER = 8, 16  # prompt: BOS + text, the image, text


def emit(bench: str, metric: str, value: float, unit: str, **extra) -> None:
    print(json.dumps({"bench": bench, "metric": metric, "value": round(value, 4), "unit": unit, **extra}), flush=True)


def compare(bench: str, metric: str, value: float, baseline: float, unit: str, target: str) -> None:
    ratio = value / baseline
    op, bound = target.split()
    met = ratio >= float(bound) if op == ">=" else ratio <= float(bound)
    emit(bench, metric, value, unit, baseline=round(baseline, 4), ratio=round(ratio, 4), target=target, met=met)


def build_checkpoint(path: Path) -> None:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, bos_token_id=1, eos_token_id=2,
    )
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=224, patch_size=16)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=49151,
                         image_seq_length=IMAGE_TOKENS, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_times(fns: dict, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` seconds of each function, run round-robin after one warm-up each.

    The machine is shared: interference only ever adds time, so the minimum is the
    least noisy estimate, and interleaving exposes every contender to the same load.
    """
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], _seconds(fn))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    new = args.new_tokens
    bench = "generate/bench-small"

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        build_checkpoint(Path(tmp))
        from transformers import LlavaForConditionalGeneration

        ours = LlamaForCausalLM.from_checkpoint(tmp, "cpu", torch.float32)
        ref = LlavaForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32).eval()
        hidden = ours.config.hidden_size
        # Every weight a decode step reads: all stored LM tensors (the tied table once, as the head).
        weight_bytes = sum(t.numel() * t.element_size() for t in Checkpoint(tmp).load_tensors("language_model.").values())

        g = torch.Generator().manual_seed(1)
        before = [1] + torch.randint(3, 49000, (TEXT_BEFORE,), generator=g).tolist()
        after = torch.randint(3, 49000, (TEXT_AFTER,), generator=g).tolist()
        image_rows = torch.randn(IMAGE_TOKENS, hidden, generator=g) * 0.02
        image = EmbeddingContainer(id="bench", model="bench", tenant="bench", first_token_id=EMBEDDING_INDEX_BASE,
                                   num_tokens=IMAGE_TOKENS, embeddings=image_rows)
        prompt = before + image.token_ids() + after

        engine = Engine(ours, max_batch=8, max_seq_len=1024)

        def run_ours(requests: int, max_tokens: int) -> list[list[int]]:
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            handles = [engine.submit(GenerationRequest(prompt, params, [image])) for _ in range(requests)]
            engine.run_until_idle()
            return [h.result().token_ids for h in handles]

        table = ref.get_input_embeddings().weight
        embeds = torch.cat([table[before], image_rows, table[after]])[None]  # [1, P, D]: the image as inputs_embeds
        mask = torch.ones(1, len(prompt), dtype=torch.long)

        def run_ref(max_tokens: int) -> list[int]:
            out = ref.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_tokens,
                               min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
            return out[0, -max_tokens:].tolist()

        same_tokens = run_ours(1, new)[0] == run_ref(new)
        assert all(len(t) == new for t in run_ours(8, new))

        # 1 GiB of random floats: summing it measures read bandwidth under the same load as the rest. Random,
        # not constant: identical pages can be merged by the host (KSM), and then a sum reads from cache.
        big = torch.rand(1 << 28, generator=g)
        t = best_times({
            "sum_1gib": big.sum,
            "ours_1": lambda: run_ours(1, 1), "ours_n": lambda: run_ours(1, new),
            "ref_1": lambda: run_ref(1), "ref_n": lambda: run_ref(new),
            "ours_b8_1": lambda: run_ours(8, 1), "ours_b8_n": lambda: run_ours(8, new),
        }, args.repeats)
        ours_decode = (new - 1) / (t["ours_n"] - t["ours_1"])  # tokens/s after the first (prefill) token
        ref_decode = (new - 1) / (t["ref_n"] - t["ref_1"])
        b8_decode = 8 * (new - 1) / (t["ours_b8_n"] - t["ours_b8_1"])
        bandwidth = big.numel() * big.element_size() / t["sum_1gib"]
        del big

        # Prefill: 196 injected container rows vs a text-only prompt of the same length.
        text_prompt = torch.tensor(before + torch.randint(3, 49000, (IMAGE_TOKENS,), generator=g).tolist() + after)
        image_prompt = torch.tensor(prompt)
        ranges = torch.tensor([[image.first_token_id, IMAGE_TOKENS]])
        cache = engine.cache
        p = best_times({
            "text": lambda: ours.prefill(text_prompt, cache, 0),
            "image": lambda: ours.prefill(image_prompt, cache, 0, ranges=ranges, rows=image_rows),
        }, 2 * args.repeats)
        del ref

    roofline = bandwidth / weight_bytes
    emit(bench, "prompt_tokens", len(prompt), "tokens", image_tokens=IMAGE_TOKENS, new_tokens=new, threads=args.threads)
    emit(bench, "greedy_tokens_match_transformers", float(same_tokens), "bool")
    compare(bench, "decode_tokens_per_s_b1", ours_decode, ref_decode, "tokens/s", ">= 1.1")
    emit(bench, "memory_bandwidth", bandwidth / 1e9, "GB/s", weight_bytes=weight_bytes)
    compare(bench, "decode_roofline_fraction", ours_decode, roofline, "tokens/s", ">= 0.8")
    compare(bench, "aggregate_decode_tokens_per_s_b8", b8_decode, ours_decode, "tokens/s", ">= 4")
    emit(bench, "aggregate_end_to_end_tokens_per_s_b8", 8 * new / t["ours_b8_n"], "tokens/s",
         baseline=round(new / t["ours_n"], 4), ratio=round(8 * t["ours_n"] / t["ours_b8_n"], 4),
         note="includes 8 prefills of the prompt")
    compare(bench, "prefill_image_vs_text", p["image"] * 1e3, p["text"] * 1e3, "ms", "<= 1.05")


if __name__ == "__main__":
    main()
