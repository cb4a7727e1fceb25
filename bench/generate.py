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
The roofline's bandwidth: a 1 GiB float32 tensor summed back to back until the sums
have read as many bytes as a decode run reads weights, best-of-R like the rest (the
best single sum is printed beside it).

`--family qwen2_vl`: a Qwen2-VL-shaped bench-small instead — the same LM shape
with Qwen2's Q/K/V biases and M-RoPE (mrope_section 8, 12, 12), and a 448×448
image of 256 rows between <|vision_start|> and <|vision_end|>; transformers runs
`Qwen2VLForConditionalGeneration.generate` from the image's pixels (a one-block
vision tower, whose rows are our container's), so the tokens check the M-RoPE
positions and their decode offset too. Same metrics and targets.

`--family pixtral`: a Pixtral-shaped bench-small — the same LM shape as Mistral
(no sliding window) inside LLaVA with a Pixtral tower (not measured), and one
512×384 image: 24 rows × 32 columns = 768 container rows with `[IMG_BREAK]`
after each row but the last and `[IMG_END]` (800 prompt tokens for the image);
transformers gets the same sequence as `inputs_embeds`. Same metrics and targets.

`--family gemma3`: a Gemma3-shaped bench-small — the same LM size as Gemma 3 text
(head_dim 64, GeGLU, Gemma's norms before and after attention and MLP, QK-norm,
√hidden embedding scale) with Gemma 3's pattern of five sliding-window layers (window
64, so prefill and decode both slide) to one global layer and their two RoPE bases,
and one 224×224 image of 49 rows (14 × 14 patches pooled 2 × 2; 64 is not a Gemma 3
shape for 196 patches, see bench/embed.py) between <start_of_image> and <end_of_image>.
transformers runs `Gemma3ForConditionalGeneration.generate` from the image's pixels (a
one-layer SigLIP, whose rows are our container's) with `token_type_ids`, so the tokens
check the bidirectional image attention too. Same metrics and targets.

GPU mode (`--device cuda`, the default when a GPU is visible): both sides in bfloat16
on the GPU, every timed call ending in a synchronisation; the same metrics under
bench `…/cuda`, the decode roofline against the best memory throughput measured in
the run (a 1 GiB sum's reads, or a 1 GiB copy's reads + writes), plus prefill tokens/s
as a fraction of a bfloat16 matmul's TFLOP/s, also measured in the run. The CPU run
is as above.

Usage: python bench/generate.py [--threads 2] [--new-tokens 64] [--repeats 5] [--family llava|qwen2_vl|pixtral|gemma3] [--device auto|cpu|cuda]
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

from cuda_ext.decode import set_decode_kernel  # noqa: E402
from generator_service.engine import Engine, GenerationRequest  # noqa: E402
from generator_service.models.gemma3 import Gemma3ForCausalLM  # noqa: E402
from generator_service.models.llama import LlamaForCausalLM  # noqa: E402
from generator_service.models.qwen2 import Qwen2VLForCausalLM  # noqa: E402
from generator_service.sampling import SamplingParams  # noqa: E402
from shared.modeling.checkpoint import Checkpoint  # noqa: E402
from shared.store.container import EmbeddingContainer, Layout  # noqa: E402
from shared.store.token_ids import EMBEDDING_INDEX_BASE  # noqa: E402

IMAGE_TOKENS = 196
TEXT_BEFORE, TEXT_AFTER = 8, 16  # prompt: BOS + text, the image, text
QWEN_GRID = (1, 32, 32)  # a 448×448 image in 14-pixel patches: 16×16 = 256 rows after the 2×2 merge
QWEN_IMAGE, QWEN_START, QWEN_END = 49151, 49149, 49150  # <|image_pad|>, <|vision_start|>, <|vision_end|>
PIXTRAL_ROWS, PIXTRAL_COLS = 24, 32  # a 512×384 image in 16-pixel patches
PIXTRAL_IMAGE, PIXTRAL_BREAK, PIXTRAL_END = 10, 12, 13  # [IMG], [IMG_BREAK], [IMG_END] (Pixtral-12B's ids)
GEMMA_IMAGE, GEMMA_BOI, GEMMA_EOI = 49151, 49149, 49150  # <image_soft_token>, <start_of_image>, <end_of_image>
GEMMA_TOKENS, GEMMA_WINDOW = 49, 64


def emit(bench: str, metric: str, value: float, unit: str, **extra) -> None:
    print(json.dumps({"bench": bench, "metric": metric, "value": round(value, 4), "unit": unit, **extra}), flush=True)


def compare(bench: str, metric: str, value: float, baseline: float, unit: str, target: str) -> None:
    ratio = value / baseline
    op, bound = target.split()
    met = ratio >= float(bound) if op == ">=" else ratio <= float(bound)
    emit(bench, metric, value, unit, baseline=round(baseline, 4), ratio=round(ratio, 4), target=target, met=met)


def build_checkpoint(path: Path) -> None:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

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


def build_qwen2_vl_checkpoint(path: Path) -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0, "mrope_section": [8, 12, 12]}, bos_token_id=1, eos_token_id=2,
    )
    vision = dict(depth=1, embed_dim=32, hidden_size=576, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, image_token_id=QWEN_IMAGE,
                           video_token_id=49148, vision_start_token_id=QWEN_START, vision_end_token_id=QWEN_END)
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)


def llava_setup(tmp: str, g: torch.Generator, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Our Llama and transformers' LLaVA, the image as 196 rows (a container for us, inputs_embeds for it)."""
    from transformers import LlavaForConditionalGeneration

    build_checkpoint(Path(tmp))
    ours = LlamaForCausalLM.from_checkpoint(tmp, device, dtype)
    ref = LlavaForConditionalGeneration.from_pretrained(tmp, dtype=dtype).to(device).eval()
    before = [1] + torch.randint(3, 49000, (TEXT_BEFORE,), generator=g).tolist()
    after = torch.randint(3, 49000, (TEXT_AFTER,), generator=g).tolist()
    image_rows = torch.randn(IMAGE_TOKENS, ours.config.hidden_size, generator=g) * 0.02
    image = EmbeddingContainer(id="bench", model="bench", tenant="bench", first_token_id=EMBEDDING_INDEX_BASE,
                               num_tokens=IMAGE_TOKENS, embeddings=image_rows)
    table = ref.get_input_embeddings().weight
    embeds = torch.cat([table[before], image_rows.to(table), table[after]])[None]  # [1, P, D]: the image as inputs_embeds
    inputs = dict(inputs_embeds=embeds, attention_mask=torch.ones(1, embeds.shape[1], dtype=torch.long, device=device))
    return dict(ours=ours, ref=ref, ref_inputs=inputs, image=image, before=before, after=after)


def qwen2_vl_setup(tmp: str, g: torch.Generator, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Our Qwen2-VL LM and transformers' from the pixels of a 448×448 image; the container holds its tiny tower's rows."""
    from transformers import Qwen2VLForConditionalGeneration

    build_qwen2_vl_checkpoint(Path(tmp))
    ours = Qwen2VLForCausalLM.from_checkpoint(tmp, device, dtype)
    ref = Qwen2VLForConditionalGeneration.from_pretrained(tmp, dtype=dtype).to(device).eval()
    before = torch.randint(3, 49000, (TEXT_BEFORE,), generator=g).tolist()
    after = torch.randint(3, 49000, (TEXT_AFTER,), generator=g).tolist()
    t, h, w = QWEN_GRID
    pixels = torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=g).to(device, dtype)
    grid = torch.tensor([QWEN_GRID], device=device)
    image_rows = ref.get_image_features(pixel_values=pixels, image_grid_thw=grid).pooler_output[0].cpu()  # [256, 576], as from the store
    image = EmbeddingContainer(id="bench", model="bench", tenant="bench", first_token_id=EMBEDDING_INDEX_BASE,
                               num_tokens=image_rows.shape[0], embeddings=image_rows, grid=(t, h // 2, w // 2),
                               layout=Layout(before=(QWEN_START,), after=(QWEN_END,)))
    ids = torch.tensor([[QWEN_IMAGE if i >= EMBEDDING_INDEX_BASE else i for i in before + image.token_ids() + after]], device=device)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, image_grid_thw=grid,
                  mm_token_type_ids=(ids == QWEN_IMAGE).int())
    return dict(ours=ours, ref=ref, ref_inputs=inputs, image=image, before=before, after=after)


def build_pixtral_checkpoint(path: Path) -> None:
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
    )

    text = MistralConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, bos_token_id=1, eos_token_id=2,
    )
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=16, hidden_act="silu")
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=PIXTRAL_IMAGE, vision_feature_layer=-1,
                         vision_feature_select_strategy="full", tie_word_embeddings=True)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)


def pixtral_setup(tmp: str, g: torch.Generator, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Our Mistral and transformers' LLaVA-Pixtral; the image as 768 rows in 24 rows of 32 with break/end tokens."""
    from transformers import LlavaForConditionalGeneration

    build_pixtral_checkpoint(Path(tmp))
    ours = LlamaForCausalLM.from_checkpoint(tmp, device, dtype)
    ref = LlavaForConditionalGeneration.from_pretrained(tmp, dtype=dtype).to(device).eval()
    before = [1] + torch.randint(20, 49000, (TEXT_BEFORE,), generator=g).tolist()
    after = torch.randint(20, 49000, (TEXT_AFTER,), generator=g).tolist()
    image_rows = torch.randn(PIXTRAL_ROWS * PIXTRAL_COLS, ours.config.hidden_size, generator=g) * 0.02
    image = EmbeddingContainer(id="bench", model="bench", tenant="bench", first_token_id=EMBEDDING_INDEX_BASE,
                               num_tokens=image_rows.shape[0], embeddings=image_rows, grid=(1, PIXTRAL_ROWS, PIXTRAL_COLS),
                               layout=Layout(after=(PIXTRAL_END,), row_length=PIXTRAL_COLS, row_break_id=PIXTRAL_BREAK))
    table = ref.get_input_embeddings().weight
    ids = before + image.token_ids() + after
    embeds = torch.stack([image_rows[i - EMBEDDING_INDEX_BASE].to(table) if i >= EMBEDDING_INDEX_BASE else table[i] for i in ids])[None]  # [1, P, D]
    inputs = dict(inputs_embeds=embeds, attention_mask=torch.ones(1, embeds.shape[1], dtype=torch.long, device=device))
    return dict(ours=ours, ref=ref, ref_inputs=inputs, image=image, before=before, after=after)


def build_gemma3_checkpoint(path: Path) -> None:
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    text = Gemma3TextConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, query_pre_attn_scalar=64, max_position_embeddings=2048, sliding_window=GEMMA_WINDOW,
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )  # layer_types, RoPE bases: Gemma3TextConfig's (every 6th layer global; 10k local, 1M global)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=224,
                                patch_size=16, vision_use_head=False)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=GEMMA_TOKENS, boi_token_index=GEMMA_BOI,
                          eoi_token_index=GEMMA_EOI, image_token_index=GEMMA_IMAGE)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # transformers initialises it to zeros: the image's rows would all be 0
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.02)
    model.save_pretrained(path)


def gemma3_setup(tmp: str, g: torch.Generator, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Our Gemma 3 LM and transformers' from the pixels of a 224×224 image; the container holds its tiny tower's rows."""
    from transformers import Gemma3ForConditionalGeneration

    build_gemma3_checkpoint(Path(tmp))
    ours = Gemma3ForCausalLM.from_checkpoint(tmp, device, dtype)
    ref = Gemma3ForConditionalGeneration.from_pretrained(tmp, dtype=dtype).to(device).eval()
    # Random text IDs around <start_of_image> … <end_of_image> (the processor's "\n\n" are text IDs among them).
    before = [2] + torch.randint(3, 49000, (TEXT_BEFORE,), generator=g).tolist()
    after = torch.randint(3, 49000, (TEXT_AFTER,), generator=g).tolist()
    pixels = torch.randn(1, 3, 224, 224, generator=g).to(device, dtype)
    image_rows = ref.get_image_features(pixel_values=pixels).pooler_output[0].cpu()  # [49, 576], as from the store
    image = EmbeddingContainer(id="bench", model="bench", tenant="bench", first_token_id=EMBEDDING_INDEX_BASE,
                               num_tokens=image_rows.shape[0], embeddings=image_rows, layout=Layout(before=(GEMMA_BOI,), after=(GEMMA_EOI,)))
    ids = torch.tensor([[GEMMA_IMAGE if i >= EMBEDDING_INDEX_BASE else i for i in before + image.token_ids() + after]], device=device)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, token_type_ids=(ids == GEMMA_IMAGE).long())
    return dict(ours=ours, ref=ref, ref_inputs=inputs, image=image, before=before, after=after)


SETUPS = {"llava": llava_setup, "qwen2_vl": qwen2_vl_setup, "pixtral": pixtral_setup, "gemma3": gemma3_setup}


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_times(fns: dict, repeats: int, sync=None) -> dict[str, float]:
    """Best-of-`repeats` seconds of each function, run round-robin after one warm-up each.

    The machine is shared: interference only ever adds time, so the minimum is the
    least noisy estimate, and interleaving exposes every contender to the same load.
    sync: called after each function inside its timing (the GPU's queued work).
    """
    if sync is not None:
        fns = {name: (lambda fn=fn: (fn(), sync())) for name, fn in fns.items()}
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], _seconds(fn))
    return best


def main() -> None:
    set_decode_kernel("auto")  # the CPU decode kernels, whatever VLMQ_DECODE_KERNEL says
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--family", choices=list(SETUPS), default="llava")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when a GPU is visible")
    args = parser.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device, dtype, sync = ("cuda", torch.bfloat16, torch.cuda.synchronize) if cuda else ("cpu", torch.float32, None)
    torch.set_num_threads(args.threads)
    new = args.new_tokens
    bench = "generate/bench-small" if args.family == "llava" else f"generate/bench-small/{args.family}"
    bench += "/cuda" if cuda else ""

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        g = torch.Generator().manual_seed(1)
        setup = SETUPS[args.family](tmp, g, device, dtype)
        ours, ref, image, before, after = setup["ours"], setup["ref"], setup["image"], setup["before"], setup["after"]
        # Every weight a decode step reads: all stored LM tensors (the tied table once, as the head).
        # In the dtype the model runs in (the checkpoint is float32).
        weight_bytes = sum(t.numel() * dtype.itemsize for t in Checkpoint(tmp).load_tensors("language_model.").values())
        image_rows = image.embeddings.to(device, dtype)
        prompt = before + image.token_ids() + after

        engine = Engine(ours, max_batch=8, max_seq_len=1024)

        def run_ours(requests: int, max_tokens: int) -> list[list[int]]:
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            handles = [engine.submit(GenerationRequest(prompt, params, [image])) for _ in range(requests)]
            engine.run_until_idle()
            return [h.result().token_ids for h in handles]

        def run_ref(max_tokens: int) -> list[int]:
            out = ref.generate(**setup["ref_inputs"], max_new_tokens=max_tokens,
                               min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
            return out[0, -max_tokens:].tolist()

        same_tokens = run_ours(1, new)[0] == run_ref(new)
        assert all(len(t) == new for t in run_ours(8, new))

        # 1 GiB of random floats: summing it measures read bandwidth under the same load as the rest. Random,
        # not constant: identical pages can be merged by the host (KSM), and then a sum reads from cache.
        # Timed as back-to-back sums reading as many bytes as a decode run reads weights, so both are timed
        # over windows of one length: on a shared machine the best of a few 40 ms windows is a quieter
        # moment than the best of a few 2 s ones, which would set the roofline by luck (the single sums'
        # best is reported too).
        big = torch.rand(1 << 28, generator=g).to(device)
        sums = max(1, round(new * weight_bytes / (big.numel() * big.element_size())))
        t = best_times({
            "sum_1gib": big.sum, "sum_window": lambda: [big.sum() for _ in range(sums)],
            "ours_1": lambda: run_ours(1, 1), "ours_n": lambda: run_ours(1, new),
            "ref_1": lambda: run_ref(1), "ref_n": lambda: run_ref(new),
            "ours_b8_1": lambda: run_ours(8, 1), "ours_b8_n": lambda: run_ours(8, new),
        }, args.repeats, sync)
        ours_decode = (new - 1) / (t["ours_n"] - t["ours_1"])  # tokens/s after the first (prefill) token
        ref_decode = (new - 1) / (t["ref_n"] - t["ref_1"])
        b8_decode = 8 * (new - 1) / (t["ours_b8_n"] - t["ours_b8_1"])
        single_sum_bandwidth = big.numel() * big.element_size() / t["sum_1gib"]
        bandwidth = sums * big.numel() * big.element_size() / t["sum_window"]
        del big

        # Prefill: the injected container rows (and markers) vs a text-only prompt of the same length.
        middle = len(prompt) - len(before) - len(after)
        text_prompt = torch.tensor(before + torch.randint(3, 49000, (middle,), generator=g).tolist() + after, device=device)
        image_prompt = torch.tensor(prompt, device=device)
        ranges = torch.tensor([[image.first_token_id, image.num_tokens]], device=device)
        positions, _ = ours.prompt_positions(prompt, [image])  # M-RoPE's; the engine computes them off its thread
        cache = engine.cache
        p = best_times({
            "text": lambda: ours.prefill(text_prompt, cache, 0),
            "image": lambda: ours.prefill(image_prompt, cache, 0, ranges=ranges, rows=image_rows, positions=positions),
        }, 2 * args.repeats, sync)
        del ref
        if cuda:
            from cuda_ext.timing import copy_gb_per_s, matmul_tflops

            copy_bandwidth, peak_tflops = copy_gb_per_s() * 1e9, matmul_tflops()
            emit(bench, "copy_bandwidth", copy_bandwidth / 1e9, "GB/s", device=torch.cuda.get_device_name(),
                 note="bytes read + written")
            emit(bench, "matmul_bf16_tflop_per_s", peak_tflops, "TFLOP/s", size=8192)
            # 2 FLOPs per layer weight per prompt token; not counted: the head (last token only, tied table)
            # and attention (a few % at this length), so the fraction errs low.
            layer_params = weight_bytes / dtype.itemsize - ours.config.vocab_size * ours.config.hidden_size
            prefill_tflops = 2 * layer_params * len(prompt) / p["image"] / 1e12
            emit(bench, "prefill_matmul_peak_fraction", prefill_tflops / peak_tflops, "fraction of bf16 matmul TFLOP/s",
                 baseline=round(peak_tflops, 1), ratio=round(prefill_tflops / peak_tflops, 4), prompt_tokens=len(prompt))
            bandwidth = max(bandwidth, copy_bandwidth)  # the roofline: the best memory throughput seen

    roofline = bandwidth / weight_bytes
    emit(bench, "prompt_tokens", len(prompt), "tokens", image_tokens=image.num_tokens, new_tokens=new, threads=args.threads)
    emit(bench, "greedy_tokens_match_transformers", float(same_tokens), "bool")
    compare(bench, "decode_tokens_per_s_b1", ours_decode, ref_decode, "tokens/s", ">= 1.1")
    emit(bench, "memory_bandwidth", bandwidth / 1e9, "GB/s", weight_bytes=weight_bytes, sums_per_timing=sums,
         single_sum_gb_per_s=round(single_sum_bandwidth / 1e9, 4))
    compare(bench, "decode_roofline_fraction", ours_decode, roofline, "tokens/s", ">= 0.8")
    compare(bench, "aggregate_decode_tokens_per_s_b8", b8_decode, ours_decode, "tokens/s", ">= 4")
    emit(bench, "aggregate_end_to_end_tokens_per_s_b8", 8 * new / t["ours_b8_n"], "tokens/s",
         baseline=round(new / t["ours_n"], 4), ratio=round(8 * t["ours_n"] / t["ours_b8_n"], 4),
         note="includes 8 prefills of the prompt")
    compare(bench, "prefill_image_vs_text", p["image"] * 1e3, p["text"] * 1e3, "ms", "<= 1.05")


if __name__ == "__main__":
    main()
