"""Generation benchmark on *bench-small* (DESIGN §8): vlmq's engine against `transformers` on the same weights.

A SmolLM2-135M-shaped Llama (random weights, tied embeddings) inside a LLaVA
checkpoint with a tiny vision tower (not measured) is written to a temp dir; the
prompt is token IDs: text around one image of 196 rows (a container for vlmq,
`inputs_embeds` for transformers). Prints one JSON line per metric:

  decode_tokens_per_s_b1      batch-1 greedy decode vs transformers `generate`   target ≥ 1.1×
  decode_roofline_fraction    batch-1 decode vs memory bandwidth ÷ weight bytes   target ≥ 0.8
  aggregate_tokens_per_s_b8   8 concurrent requests vs batch 1                    target ≥ 4×
  prefill_image_vs_text       prefill with 196 injected rows vs text only         target ≤ 1.05×

Usage: python bench/generate.py [--threads 2] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator_service.engine import Engine, GenerationRequest  # noqa: E402
from generator_service.models.llama import LlamaForCausalLM  # noqa: E402
from generator_service.sampling import SamplingParams  # noqa: E402
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


def memory_bandwidth(repeats: int) -> float:
    """Bytes per second to sum a 1 GiB float32 tensor (median of `repeats`)."""
    x = torch.ones(1 << 28)
    x.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / statistics.median(times)


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    new = args.new_tokens
    bench = "generate/bench-small"

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        build_checkpoint(Path(tmp))
        ours = LlamaForCausalLM.from_checkpoint(tmp, "cpu", torch.float32)
        config = ours.config
        weight_bytes = 4 * sum(  # every weight a decode step reads; the tied table once (as the head)
            p.numel() for name, p in _reference_lm_params(tmp)
        )

        g = torch.Generator().manual_seed(1)
        before = [1] + torch.randint(3, 49000, (TEXT_BEFORE,), generator=g).tolist()
        after = torch.randint(3, 49000, (TEXT_AFTER,), generator=g).tolist()
        image_rows = torch.randn(IMAGE_TOKENS, config.hidden_size, generator=g) * 0.02

        def container(first: int) -> EmbeddingContainer:
            return EmbeddingContainer(id=f"bench{first}", model="bench", tenant="bench", first_token_id=first,
                                      num_tokens=IMAGE_TOKENS, embeddings=image_rows)

        image = container(EMBEDDING_INDEX_BASE)
        prompt = before + image.token_ids() + after
        prompt_len = len(prompt)

        # -- vlmq -------------------------------------------------------------------------
        engine = Engine(ours, max_batch=8, max_seq_len=1024)

        def run_ours(requests: int, max_tokens: int) -> list[list[int]]:
            handles = [
                engine.submit(GenerationRequest(prompt, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                       ignore_eos=True), containers=[image]))
                for _ in range(requests)
            ]
            engine.run_until_idle()
            return [h.result().token_ids for h in handles]

        ours_first = timed(lambda: run_ours(1, 1), args.repeats)
        ours_full = timed(lambda: run_ours(1, new), args.repeats)
        ours_decode = (new - 1) / (ours_full - ours_first)
        ours_b8 = timed(lambda: run_ours(8, new), args.repeats)
        assert all(len(t) == new for t in run_ours(8, new))

        # -- transformers -------------------------------------------------------------------
        from transformers import LlavaForConditionalGeneration

        ref = LlavaForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32).eval()
        table = ref.get_input_embeddings().weight
        embeds = torch.cat([table[before], image_rows, table[after]])[None]  # [1, P, D]
        mask = torch.ones(1, prompt_len, dtype=torch.long)

        def run_ref(max_tokens: int):
            return ref.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_tokens,
                                min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)

        ref_first = timed(lambda: run_ref(1), args.repeats)
        ref_full = timed(lambda: run_ref(new), args.repeats)
        ref_decode = (new - 1) / (ref_full - ref_first)
        ref_tokens = run_ref(new)[0].tolist()
        ours_tokens = run_ours(1, new)[0]
        del ref

        # -- prefill: 196 injected rows vs text only ------------------------------------------
        text_prompt = torch.tensor(before + torch.randint(3, 49000, (IMAGE_TOKENS,), generator=g).tolist() + after)
        image_prompt = torch.tensor(prompt)
        ranges = torch.tensor([[image.first_token_id, IMAGE_TOKENS]])
        cache = engine.cache
        prefill_text = timed(lambda: ours.prefill(text_prompt, cache, 0), args.repeats + 2)
        prefill_image = timed(lambda: ours.prefill(image_prompt, cache, 0, ranges=ranges, rows=image_rows), args.repeats + 2)

        bandwidth = memory_bandwidth(5)

    roofline = bandwidth / weight_bytes
    emit(bench, "prompt_tokens", prompt_len, "tokens", image_tokens=IMAGE_TOKENS)
    emit(bench, "greedy_tokens_match_transformers", float(ours_tokens == ref_tokens[-new:]), "bool")
    compare(bench, "decode_tokens_per_s_b1", ours_decode, ref_decode, "tokens/s", ">= 1.1")
    emit(bench, "memory_bandwidth", bandwidth / 1e9, "GB/s", weight_bytes=weight_bytes)
    compare(bench, "decode_roofline_fraction", ours_decode, roofline, "tokens/s", ">= 0.8")
    compare(bench, "aggregate_tokens_per_s_b8", 8 * new / ours_b8, new / ours_full, "tokens/s", ">= 4")
    compare(bench, "prefill_image_vs_text", prefill_image * 1e3, prefill_text * 1e3, "ms", "<= 1.05")


def _reference_lm_params(path: str):
    """(name, tensor) of the language model's stored weights (the tied head is not stored separately)."""
    from shared.checkpoint import Checkpoint

    return Checkpoint(path).load_tensors("language_model.").items()


if __name__ == "__main__":
    main()
