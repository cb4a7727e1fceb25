"""Generation benchmark on *bench-small* (docs/DESIGN.md §9): vlmq's engine against `transformers` on the same weights.

A SmolLM2-135M-shaped Llama (random weights, tied embeddings) inside the LLaVA
demo checkpoint with its tiny vision tower (not measured) is written to a temp dir
(bench/common.py's bench-small); the prompt is token IDs: text around one image of
196 rows (a container for vlmq, `inputs_embeds` for transformers). Prints one JSON
line per metric (bench/common.py):

  decode_tokens_per_s_b1            batch-1 greedy decode vs transformers `generate`      target ≥ 1.1×
  decode_roofline_fraction          batch-1 decode vs memory bandwidth ÷ weight bytes      target ≥ 0.8
  aggregate_decode_tokens_per_s_b8  8 concurrent requests decoding vs batch 1              target ≥ 4×
  prefill_image_vs_text             prefill with 196 injected rows vs text only            target ≤ 1.05×
  concurrent_short_chats_in_8x2048_kv  most sequences running at once when 32 chats of ~220
                                    + 20 tokens arrive at an engine with the KV memory of
                                    an unpaged 8 × 2048 cache, batch cap 32             target ≥ 32
  second_question_ttft              time to first token of a new question about an image
                                    the engine saw (prefix cache) vs the first question    target ≤ 0.2×
  stream_itl_p99_while_prompts_arrive  4 streams' p99 inter-token latency while 8 prompts
                                    arrive vs their idle ones just before, in the same
                                    engine: 512-token chunks (the default), the
                                    same cut to 4× and to 2× a decode step while streams
                                    decode (VLMQ_MAX_DECODE_SLOWDOWN)                      target ≤ 3× with 2×
                                    (the median of three runs);
                                    whole prompts, for comparison (each row's
                                    all_first_tokens_ms is the price the prompts pay)
  side_by_side_decode_tokens_per_s  two processes' batch-1 decode loops at once, combined,
                                    vs one after the other; cores divided as a local stack
                                    divides them (vlmq.stack)                              target ≥ 0.8×; the same
                                    with both on every core, 2 threads each, for comparison
  decode_tokens_per_s_b1_16_bit_checkpoint  the same checkpoint saved in bfloat16 (computed in
                                    float32, the CPU default): batch-1 decode with its weights
                                    kept in bfloat16 (VLMQ_DECODE_WEIGHTS=auto) vs widened to
                                    float32 at load (float32); prefill_ms_16_bit_checkpoint the
                                    same for the prompt's prefill; both make the same tokens

The decode and prefill rows run the engine as before the paged cache's features: prefix cache
off, whole-prompt prefill (so a repeated prompt is recomputed each time); the last two rows
turn them on, each prompt with an image of its own IDs (a new image) unless the row says so.

Decode rates exclude the prefill: (N - 1) tokens ÷ (time for N tokens - time for 1),
both sides measured the same way (transformers with min_new_tokens so it makes N).
Times are best-of-R, run round-robin (the machine is shared; see `common.best_of`).
The roofline's bandwidth: a 1 GiB float32 tensor summed back to back until the sums
have read as many bytes as a decode run reads weights, best-of-R like the rest (the
best single sum is printed beside it).

`--family qwen2_vl`: a Qwen2-VL-shaped bench-small instead — the same LM shape
with Qwen2's Q/K/V biases and M-RoPE (mrope_section 8, 12, 12), and a 448×448
image of 256 rows between <|vision_start|> and <|vision_end|>; transformers runs
`Qwen2VLForConditionalGeneration.generate` from the image's pixels (the demo's tiny
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
transformers runs `Gemma3ForConditionalGeneration.generate` from the image's pixels (the
demo's tiny SigLIP, whose rows are our container's) with `token_type_ids`, so the tokens
check the bidirectional image attention too. Same metrics and targets.

GPU mode (`--device cuda`, the default when a GPU is visible): both sides in bfloat16
on the GPU, every timed call ending in a synchronisation; the same metrics under
bench `…/cuda`, the decode roofline against the best memory throughput measured in
the run (a 1 GiB sum's reads, or a 1 GiB copy's reads + writes), plus prefill TFLOP/s
against a bfloat16 matmul's, also measured in the run. The CPU run
is as above.

Usage: python bench/generate.py [--threads 2] [--new-tokens 64] [--repeats 5] [--family llava|qwen2_vl|pixtral|gemma3] [--device auto|cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from common import (
    BENCH_SMALL,
    best_of,
    compare,
    emit,
    ordinary_ids,
    parse_args,
    patches,
    write_bench_small,
)
from safetensors.torch import load_file, save_file

from cuda_ext.decode.ops import DECODE_WEIGHTS, set_decode_kernel
from generator_service.engine import Engine, GenerationRequest
from generator_service.models.gemma3 import Gemma3ForCausalLM
from generator_service.models.llama import LlamaForCausalLM
from generator_service.models.qwen2 import Qwen2VLForCausalLM
from generator_service.sampling import SamplingParams
from shared.modeling.checkpoint import Checkpoint
from shared.store.container import EmbeddingContainer, Layout
from shared.store.token_ids import EMBEDDING_INDEX_BASE
from vlmq.stack import available_cores, divide_cores

TEXT_BEFORE, TEXT_AFTER = 8, 16  # prompt: BOS + text, the image, text


def text_ids(spec, count: int, g: torch.Generator) -> list[int]:
    """`count` random text IDs: the tokenizer's own, no special token."""
    ordinary = ordinary_ids(spec.tokenizer)
    return [ordinary[i] for i in torch.randint(len(ordinary), (count,), generator=g).tolist()]


def load(family: str, tmp: str, ours_class, reference: str, device: str, dtype: torch.dtype):
    """The family's bench-small in `tmp`: its spec, our language model and transformers' `reference` model."""
    import transformers

    spec = write_bench_small(Path(tmp), family, tower=False)
    ours = ours_class.from_checkpoint(tmp, device, dtype)
    return spec, ours, getattr(transformers, reference).from_pretrained(tmp, dtype=dtype).to(device).eval()


def embeds_setup(family: str, tmp: str, g: torch.Generator, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """LLaVA or Pixtral: our Llama or Mistral and transformers' LLaVA, the image as random rows (a container for us,
    inputs_embeds for it): LLaVA's 196, or Pixtral's 768 in 24 rows of 32 with a break after each and an end."""
    spec, ours, ref = load(family, tmp, LlamaForCausalLM, "LlavaForConditionalGeneration", device, dtype)
    before = [spec.config["text_config"]["bos_token_id"]] + text_ids(spec, TEXT_BEFORE, g)
    after = text_ids(spec, TEXT_AFTER, g)
    rows, cols = patches(family)
    image_rows = torch.randn(rows * cols, ours.config.hidden_size, generator=g) * 0.02
    layout, grid = Layout(), None
    if family == "pixtral":
        token = spec.tokenizer.token_to_id
        layout, grid = Layout(after=(token("[IMG_END]"),), row_length=cols, row_break_id=token("[IMG_BREAK]")), (1, rows, cols)
    image = EmbeddingContainer(id="bench", model="bench", tenant="bench", first_token_id=EMBEDDING_INDEX_BASE,
                               num_tokens=rows * cols, embeddings=image_rows, grid=grid, layout=layout)
    table = ref.get_input_embeddings().weight
    ids = before + image.token_ids() + after
    embeds = torch.stack([image_rows[i - EMBEDDING_INDEX_BASE].to(table) if i >= EMBEDDING_INDEX_BASE else table[i] for i in ids])[None]  # [1, P, D]
    inputs = dict(inputs_embeds=embeds, attention_mask=torch.ones(1, embeds.shape[1], dtype=torch.long, device=device))
    return dict(spec=spec, ours=ours, ref=ref, ref_inputs=inputs, image=image, before=before, after=after)


def reference_ids(image_id: int, ids: list[int], device: str) -> torch.Tensor:
    """Our prompt IDs as transformers' [1, P]: the container's rows as its image token."""
    return torch.tensor([[image_id if i >= EMBEDDING_INDEX_BASE else i for i in ids]], device=device)


def qwen2_vl_setup(tmp: str, g: torch.Generator, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Our Qwen2-VL LM and transformers' from the pixels of a 448×448 image; the container holds its tiny tower's rows."""
    spec, ours, ref = load("qwen2_vl", tmp, Qwen2VLForCausalLM, "Qwen2VLForConditionalGeneration", device, dtype)
    config, vision = spec.config, spec.config["vision_config"]
    before, after = text_ids(spec, TEXT_BEFORE, g), text_ids(spec, TEXT_AFTER, g)
    t, h, w = grid = (1, *patches("qwen2_vl"))
    merge = vision["spatial_merge_size"]
    pixels = torch.randn(t * h * w, vision["in_channels"] * vision["temporal_patch_size"] * vision["patch_size"] ** 2,
                         generator=g).to(device, dtype)
    grid_thw = torch.tensor([grid], device=device)
    image_rows = ref.get_image_features(pixel_values=pixels, image_grid_thw=grid_thw).pooler_output[0].cpu()  # [256, 576], as from the store
    image = EmbeddingContainer(id="bench", model="bench", tenant="bench", first_token_id=EMBEDDING_INDEX_BASE,
                               num_tokens=image_rows.shape[0], embeddings=image_rows, grid=(t, h // merge, w // merge),
                               layout=Layout(before=(config["vision_start_token_id"],), after=(config["vision_end_token_id"],)))
    ids = reference_ids(config["image_token_id"], before + image.token_ids() + after, device)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, image_grid_thw=grid_thw,
                  mm_token_type_ids=(ids == config["image_token_id"]).int())
    return dict(spec=spec, ours=ours, ref=ref, ref_inputs=inputs, image=image, before=before, after=after)


def gemma3_setup(tmp: str, g: torch.Generator, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Our Gemma 3 LM and transformers' from the pixels of a 224×224 image; the container holds its tiny tower's rows."""
    spec, ours, ref = load("gemma3", tmp, Gemma3ForCausalLM, "Gemma3ForConditionalGeneration", device, dtype)
    config = spec.config
    # Random text IDs around <start_of_image> … <end_of_image> (the processor's "\n\n" are text IDs among them).
    before = [config["text_config"]["bos_token_id"]] + text_ids(spec, TEXT_BEFORE, g)
    after = text_ids(spec, TEXT_AFTER, g)
    width, height = BENCH_SMALL["gemma3"].image
    pixels = torch.randn(1, 3, height, width, generator=g).to(device, dtype)
    image_rows = ref.get_image_features(pixel_values=pixels).pooler_output[0].cpu()  # [49, 576], as from the store
    image = EmbeddingContainer(id="bench", model="bench", tenant="bench", first_token_id=EMBEDDING_INDEX_BASE,
                               num_tokens=image_rows.shape[0], embeddings=image_rows,
                               layout=Layout(before=(config["boi_token_index"],), after=(config["eoi_token_index"],)))
    ids = reference_ids(config["image_token_index"], before + image.token_ids() + after, device)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                  token_type_ids=(ids == config["image_token_index"]).long())
    return dict(spec=spec, ours=ours, ref=ref, ref_inputs=inputs, image=image, before=before, after=after)


SETUPS = {"llava": partial(embeds_setup, "llava"), "qwen2_vl": qwen2_vl_setup, "pixtral": partial(embeds_setup, "pixtral"),
          "gemma3": gemma3_setup}


def main() -> None:
    set_decode_kernel("auto")  # the CPU decode kernels, whatever VLMQ_DECODE_KERNEL says
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--family", choices=list(SETUPS), default="llava")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when a GPU is visible")
    parser.add_argument("--decode-loop", metavar="CHECKPOINT", help=argparse.SUPPRESS)  # a side-by-side child (below)
    parser.add_argument("--cores", default="", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=8.0, help=argparse.SUPPRESS)
    args = parse_args(parser, quick={"repeats": 1, "new_tokens": 8, "seconds": 2.0})
    if args.decode_loop:
        return decode_loop(args.decode_loop, [int(c) for c in args.cores.split(",") if c], args.threads, args.seconds)
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

        engine = Engine(ours, max_batch=8, max_seq_len=1024, prefix_cache=False, prefill_chunk_tokens=0)

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
        t = best_of({
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
        big = None  # frees the 1 GiB before the prefill timings

        # Prefill: the injected container rows (and markers) vs a text-only prompt of the same length.
        middle = len(prompt) - len(before) - len(after)
        text_prompt = torch.tensor(before + text_ids(setup["spec"], middle, g) + after, device=device)
        image_prompt = torch.tensor(prompt, device=device)
        ranges = torch.tensor([[image.first_token_id, image.num_tokens]], device=device)
        positions, _ = ours.prompt_positions(prompt, [image])  # M-RoPE's; the engine computes them off its thread
        cache = ours.new_cache(1, len(prompt))  # one unpaged row
        p = best_of({
            "text": lambda: ours.prefill(text_prompt, cache, 0),
            "image": lambda: ours.prefill(image_prompt, cache, 0, ranges=ranges, rows=image_rows, positions=positions),
        }, 2 * args.repeats, sync)
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
            compare(bench, "prefill_matmul_peak_fraction", prefill_tflops, peak_tflops, "TFLOP/s", prompt_tokens=len(prompt))
            bandwidth = max(bandwidth, copy_bandwidth)  # the roofline: the best memory throughput seen

    roofline = bandwidth / weight_bytes
    emit(bench, "prompt_tokens", len(prompt), "tokens", image_tokens=image.num_tokens, new_tokens=new, threads=args.threads)
    emit(bench, "greedy_tokens_match_transformers", float(same_tokens), "bool")
    compare(bench, "decode_tokens_per_s_b1", ours_decode, ref_decode, "tokens/s", ">= 1.1")
    emit(bench, "memory_bandwidth", bandwidth / 1e9, "GB/s", weight_bytes=weight_bytes, sums_per_timing=sums,
         single_sum_gb_per_s=single_sum_bandwidth / 1e9)
    compare(bench, "decode_roofline_fraction", ours_decode, roofline, "tokens/s", ">= 0.8")
    compare(bench, "aggregate_decode_tokens_per_s_b8", b8_decode, ours_decode, "tokens/s", ">= 4")
    compare(bench, "aggregate_end_to_end_tokens_per_s_b8", 8 * new / t["ours_b8_n"], new / t["ours_n"], "tokens/s",
            note="includes 8 prefills of the prompt")
    compare(bench, "prefill_image_vs_text", p["image"] * 1e3, p["text"] * 1e3, "ms", "<= 1.05")
    if not cuda:
        serving_rows(bench, ours, image, setup["before"], setup["after"], setup["spec"], args.repeats)
        if args.family == "llava":
            side_by_side_rows(bench, args.threads, args.seconds)
            sixteen_bit_rows(bench, args.new_tokens, args.repeats)


def side_by_side_rows(bench: str, threads: int, seconds: float) -> None:
    """Two generate workers on one machine: their decode loops at once, cores divided as `vlmq.stack` divides them
    (and, for comparison, both on every core), against each alone in turn."""
    with tempfile.TemporaryDirectory() as tmp:
        write_bench_small(Path(tmp), "llava", tower=False)
        alone = [rate for _ in range(2) for rate in decode_processes(tmp, [None], threads, seconds)]  # one after the other
        divided = decode_processes(tmp, divide_cores(available_cores(), 2), threads, seconds)
        shared = decode_processes(tmp, [None, None], threads, seconds)
    reference = statistics.mean(alone)  # the combined rate of two loops run one after the other
    compare(bench, "side_by_side_decode_tokens_per_s", sum(divided), reference, "tokens/s", ">= 0.8",
            cores="divided (vlmq.stack)", each=[round(r, 2) for r in divided])
    compare(bench, "side_by_side_decode_tokens_per_s", sum(shared), reference, "tokens/s",
            cores=f"shared, {threads} threads each", each=[round(r, 2) for r in shared])


def sixteen_bit_rows(bench: str, new: int, repeats: int) -> None:
    """bench-small LLaVA saved in bfloat16 (a real checkpoint's type), computed in float32: decode and prefill with its
    weights kept in bfloat16 by the decode kernels (`pack_panels`) against the same weights widened to float32."""
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        spec = write_bench_small(Path(tmp), "llava", tower=False)
        weights = Path(tmp) / "model.safetensors"
        save_file({name: t.bfloat16() for name, t in load_file(weights).items()}, weights, metadata={"format": "pt"})
        prompt = list(range(3, 3 + 221))  # bench-small's image prompt length, as text
        engines, times = {}, {}
        for kept in ("auto", "float32"):
            previous = DECODE_WEIGHTS.set(kept)
            model = LlamaForCausalLM.from_checkpoint(tmp)
            DECODE_WEIGHTS.set(previous)
            assert model.head.data.dtype == (torch.bfloat16 if kept == "auto" else torch.float32)
            engines[kept] = Engine(model, max_batch=1, max_seq_len=1024, prefix_cache=False, prefill_chunk_tokens=0)

        def run(kept: str, tokens: int) -> list[int]:
            handle = engines[kept].submit(GenerationRequest(prompt, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)))
            engines[kept].run_until_idle()
            return handle.result().token_ids

        same = run("auto", new) == run("float32", new)
        for kept in engines:
            times |= {f"{kept}_1": partial(run, kept, 1), f"{kept}_n": partial(run, kept, new)}
        t = best_of(times, repeats)
    rate = {kept: (new - 1) / (t[f"{kept}_n"] - t[f"{kept}_1"]) for kept in engines}
    compare(bench, "decode_tokens_per_s_b1_16_bit_checkpoint", rate["auto"], rate["float32"], "tokens/s",
            weights="bfloat16 vs float32", same_tokens=same, vocab=spec.config["text_config"]["vocab_size"])
    compare(bench, "prefill_ms_16_bit_checkpoint", t["auto_1"] * 1e3, t["float32_1"] * 1e3, "ms", prompt_tokens=len(prompt))


def decode_processes(checkpoint: str, shares: list[list[int] | None], threads: int, seconds: float) -> list[float]:
    """One decode loop per share of cores (None: every core), in child processes started together once all are loaded;
    each one's tokens/s."""
    children = [subprocess.Popen([sys.executable, __file__, "--decode-loop", checkpoint, "--threads", str(threads),
                                  "--seconds", str(seconds), "--cores", ",".join(map(str, cores or []))],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for cores in shares]
    for child in children:
        assert child.stdout.readline().strip() == "ready"
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    return [json.loads(child.communicate()[0])["tokens_per_s"] for child in children]


def decode_loop(checkpoint: str, cores: list[int], threads: int, seconds: float) -> None:
    """A side-by-side child: batch-1 greedy decoding for `seconds` once told to go; prints its tokens/s. On `cores`
    (one thread each) as a local stack pins a worker, else on every core with `threads` threads."""
    if cores:
        os.sched_setaffinity(0, cores)
        threads = len(cores)
    torch.set_num_threads(threads)
    engine = Engine(LlamaForCausalLM.from_checkpoint(checkpoint), max_batch=1, max_seq_len=2048, prefix_cache=False,
                    prefill_chunk_tokens=0)
    engine.submit(GenerationRequest(list(range(100, 120)), SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)))
    engine.step()  # the prefill and the first tokens, before the timed window
    print("ready", flush=True)
    sys.stdin.readline()
    made, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        made += engine.step()
    print(json.dumps({"tokens_per_s": made / (time.perf_counter() - began)}), flush=True)


def new_image(image: EmbeddingContainer, n: int) -> EmbeddingContainer:
    """The same rows under IDs of their own: to the engine, an image it has never seen."""
    return replace(image, id=f"bench-{n}", first_token_id=EMBEDDING_INDEX_BASE + (n + 1) * 100_000)


def serving_rows(bench: str, ours, image: EmbeddingContainer, before: list[int], after: list[int], spec, repeats: int) -> None:
    """The paged engine's rows: a second question's time to first token, running streams' latency under arrivals."""
    g = torch.Generator().manual_seed(2)
    other = text_ids(spec, len(after), g)  # the second question
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    engine = Engine(ours, max_batch=8, max_seq_len=1024, prefix_cache=True, prefill_chunk_tokens=512)
    first, second = [], []
    for n in range(max(repeats, 2)):  # a new image each round: the first question misses, the second hits
        fresh = new_image(image, n)
        for times, question in ((first, after), (second, other)):
            started = time.perf_counter()
            engine.submit(GenerationRequest(before + fresh.token_ids() + question, one, [fresh]))
            engine.run_until_idle()
            times.append(time.perf_counter() - started)
    prompt_tokens = len(before) + len(image.token_ids()) + len(after)
    compare(bench, "second_question_ttft", min(second[1:]) * 1e3, min(first[1:]) * 1e3, "ms", "<= 0.2",
            image_tokens=image.num_tokens, prompt_tokens=prompt_tokens)

    # 32 short chats (≤ 300 tokens) in the KV memory of an unpaged 8 × 2048 cache, the batch cap at 32.
    engine = Engine(ours, max_batch=32, max_seq_len=2048, kv_cache_tokens=8 * 2048)
    chats = [engine.submit(GenerationRequest(before + text_ids(spec, 200 + n, g), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)))
             for n in range(32)]
    most = 0
    while engine.has_work():
        engine.step()
        most = max(most, engine.num_running)
    assert all(len(chat.result().token_ids) == 20 for chat in chats)
    emit(bench, "concurrent_short_chats_in_8x2048_kv", most, "sequences", target=">= 32", met=most >= 32,
         chats=32, prompt_tokens="201-232", new_tokens=20, kv_cache_tokens=8 * 2048)

    # The default (512-token chunks), the same cut to 4× and to 2× a decode step while streams decode (the setting
    # the target is for: a 4× cut cannot keep gaps within 3×), whole prompts.
    for chunk, slowdown, target in ((512, 0.0, None), (512, 4.0, None), (512, 2.0, "<= 3"), (0, 0.0, None)):
        # The target's row is the median of three runs (every run's ratio printed): its p99 is the 5th-worst of
        # ~400-2000 gaps, 4 to a step, and this host's vCPUs lose 6-20 ms to the hypervisor in ~0.7% of decode
        # steps (steal time, 2026-12-07), so one run's p99 lands on such a step or not by chance.
        runs = [itl_run(ours, image, before, after, chunk, slowdown) for _ in range(3 if target else 1)]
        p99, idle, prompts_s = sorted(runs, key=lambda run: run[0] / run[1])[len(runs) // 2]
        extra = {"run_ratios": [round(run[0] / run[1], 2) for run in runs]} if target else {}
        compare(bench, "stream_itl_p99_while_prompts_arrive", p99 * 1e3, idle * 1e3, "ms", target,
                prefill_chunk_tokens=chunk, max_decode_slowdown=slowdown, streams=4, arriving_prompts=8,
                prompt_tokens=prompt_tokens, all_first_tokens_ms=round(prompts_s * 1e3, 1), **extra)


def itl_run(ours, image, before, after, chunk: int, slowdown: float) -> tuple[float, float, float]:
    """One run of `streams_under_arrivals` → (the streams' p99 gap under arrivals, their median idle gap, seconds to
    the last prompt's first token). Each run against its own idle steps, seconds before: one run's idle for all four
    rows moved with the host's load between runs (gemma3, 2026-12-07: 11.7 ms in the first run, 14-15 in later ones)."""
    gaps, idle_gaps, prompts_s = streams_under_arrivals(ours, image, before, after, chunk, slowdown)
    return sorted(gaps)[int(0.99 * (len(gaps) - 1))], statistics.median(idle_gaps), prompts_s


def streams_under_arrivals(ours, image, before, after, chunk: int, slowdown: float) -> tuple[list[float], list[float], float]:
    """4 streams decode; after 16 idle steps 8 prompts arrive. The streams' gaps between tokens that overlap the
    prompts' prefill (from their arrival until the last has its first token), the idle ones before, and the
    seconds from the arrival to the last prompt's first token."""
    engine = Engine(ours, max_batch=12, max_seq_len=2048, kv_cache_tokens=16384, prefix_cache=False, prefill_chunk_tokens=chunk,
                    max_decode_slowdown=slowdown)
    stamps: list[list[float]] = [[] for _ in range(4)]
    long = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)  # more than the window takes (Pixtral: ~20 s)
    streams = [engine.submit(GenerationRequest(before + [5], long, on_token=lambda _, s=s: s.append(time.perf_counter())))
               for s in stamps]
    while min(len(s) for s in stamps) < 17:
        engine.step()
    arrived = time.perf_counter()
    firsts: list[float] = []
    for n in range(8):
        fresh = new_image(image, 1000 + n)
        engine.submit(GenerationRequest(before + fresh.token_ids() + after, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
                                        [fresh], on_token=lambda _: firsts.append(time.perf_counter())))
    while len(firsts) < 8:
        engine.step()
    done = time.perf_counter()
    while min(s[-1] for s in stamps) < done:  # the gap the last prefill step opened closes at each stream's next token
        if any(stream.done() for stream in streams):
            raise RuntimeError("a stream ran out of tokens before the prompts' first tokens: its gaps miss the end")
        engine.step()
    for stream in streams:
        stream.cancel()
    engine.run_until_idle()
    gaps = [b - a for s in stamps for a, b in itertools.pairwise(s) if b > arrived and a < done]  # every gap the arrivals overlap
    idle = [b - a for s in stamps for a, b in itertools.pairwise(s[:17])]
    return gaps, idle, done - arrived


if __name__ == "__main__":
    main()
