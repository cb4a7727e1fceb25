"""Embedder throughput on bench-small: our LlavaVisionModel vs transformers' get_image_features.

bench-small (DESIGN §8): CLIP ViT-B/16 at 224 px (hidden 768, 12 layers, 12
heads, MLP 3072) + projector into an LM hidden size of 576, feature layer −2,
default strategy, random weights, float32. The checkpoint is written with
`transformers` into a temporary folder; both implementations load that folder
and run on the same pixel tensors, measured alternately in one run (the
machine is shared: absolute figures move, ratios less).

`--family qwen2_vl`: a Qwen2-VL-shaped bench-small instead — the vision tower
of Qwen2-VL (embed_dim 768, depth 12, heads 12, MLP 3072, patch 14, merge 2)
with its merger into 576, on 448×448 images (1024 patches → 256 rows), against
`Qwen2VLForConditionalGeneration.get_image_features`. Same metrics and targets.

`--family pixtral`: a Pixtral-shaped bench-small — a Pixtral vision tower at
ViT-B width (hidden 768, 12 layers, 12 heads, gated MLP 3072, patch 16) with
LLaVA's projector into 576, on 512×384 images (32 × 24 = 768 rows each),
against `LlavaForConditionalGeneration.get_image_features` with image_sizes
(which packs a batch into one sequence with a block-diagonal mask). Same
metrics and targets.

`--family gemma3`: a Gemma3-shaped bench-small — SigLIP at ViT-B/16 (hidden 768,
12 layers, 12 heads, MLP 3072, tanh GELU) on 224×224 images (196 patches), average-
pooled 2×2 to 49 rows, Gemma RMSNorm and the projection into 576, against
`Gemma3ForConditionalGeneration.get_image_features`. (64 rows from 196 patches is not
a Gemma 3 shape: its pool kernel is patches per side ÷ tokens per side, 14 ÷ 8 = 1, so
the reference would give 196 rows and refuse the config's 64.) Same metrics and targets.

Prints one JSON object per line: bench, metric, value, unit, and for
comparisons baseline, ratio, target, met.

GPU mode (`--device cuda`, the default when a GPU is visible): both implementations
in bfloat16 on the GPU, timed with CUDA events; images/s against transformers and
the achieved TFLOP/s as a fraction of a bfloat16 matmul's, with the GPU's matmul
TFLOP/s and copy bandwidth measured in the same run (bench `…/cuda`; the CPU
targets do not apply). The CPU run is as above.

    python bench/embed.py [--rounds 5] [--threads 2] [--family llava|qwen2_vl|pixtral|gemma3] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

BENCH = "embed/bench-small"
LM_HIDDEN = 576
QWEN_IMAGE_SIZE = 448
PIXTRAL_IMAGE = (512, 384)  # (width, height) in pixels: 32 × 24 patches of 16
GEMMA3_TOKENS = 49  # 14 × 14 patches of a 224-pixel image, pooled 2 × 2


def build_bench_small(path: Path) -> Path:
    """ViT-B/16-224 + projector to 576, with a one-layer LM (the LM is not measured)."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vision = CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        image_size=224, patch_size=16, projection_dim=512, hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=LM_HIDDEN, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=1024, max_position_embeddings=512,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=1023,
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=196,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).eval().save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(path)
    return path


def build_qwen2_vl_bench_small(path: Path) -> Path:
    """Qwen2-VL's vision tower at ViT-B width + merger to 576, with a one-layer LM (not measured)."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    vision = dict(depth=12, embed_dim=768, hidden_size=LM_HIDDEN, num_heads=12, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu")
    text = dict(vocab_size=1024, hidden_size=LM_HIDDEN, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
                num_key_value_heads=3, max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                                       "mrope_section": [8, 12, 12]})
    config = Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=1000, video_token_id=1001,
                           vision_start_token_id=1002, vision_end_token_id=1003)
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).eval().save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=QWEN_IMAGE_SIZE**2).save_pretrained(path)
    return path


def qwen2_vl_flops_per_image(model, grid: tuple[int, int, int]) -> int:
    """Multiply-adds × 2 of our Qwen2-VL tower and merger for an image of `grid` patches (norms, RoPE, activations not counted)."""
    c = model.config
    D, I, U = c.embed_dim, c.intermediate_size, c.merge_unit
    N = grid[0] * grid[1] * grid[2]
    patch = 2 * N * c.patch_dim * D
    per_layer = vit_layer_flops(N, D, I)
    merger = 2 * (N // U) * (U * D) ** 2 + 2 * (N // U) * (U * D) * c.out_hidden_size
    return patch + c.depth * per_layer + merger


def build_pixtral_bench_small(path: Path) -> Path:
    """A Pixtral tower at ViT-B width + LLaVA projector to 576, with a one-layer Mistral (not measured)."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        MistralConfig,
        PixtralImageProcessorPil,
        PixtralVisionConfig,
    )

    from vlmq.demo_model import PIXTRAL_SPECIAL_TOKENS, build_tokenizer

    vision = PixtralVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                 patch_size=16, image_size=max(PIXTRAL_IMAGE), hidden_act="silu")
    text = MistralConfig(hidden_size=LM_HIDDEN, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=1024, max_position_embeddings=2048, sliding_window=None)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=1000, vision_feature_layer=-1,
                         vision_feature_select_strategy="full")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).eval().save_pretrained(path)
    PixtralImageProcessorPil(patch_size={"height": 16, "width": 16}, size={"longest_edge": max(PIXTRAL_IMAGE)}).save_pretrained(path)
    build_tokenizer(special_tokens=PIXTRAL_SPECIAL_TOKENS).save(str(path / "tokenizer.json"))  # [IMG_BREAK]/[IMG_END] ids
    return path


def pixtral_flops_per_image(model, rows: int, cols: int) -> int:
    """Multiply-adds × 2 of our Pixtral tower and projector for an image of rows × cols patches (norms, RoPE, activations not counted)."""
    v = model.config.vision
    D, I, P, C, H = v.hidden_size, v.intermediate_size, v.patch_size, v.num_channels, model.config.lm_hidden_size
    N = rows * cols
    patch = 2 * N * (C * P * P) * D
    per_layer = 2 * N * D * 3 * D + 2 * N * D * D + 3 * 2 * N * D * I + 2 * 2 * N * N * D  # qkv, o, gate+up+down, scores+values
    projector = 2 * N * D * H + 2 * N * H * H
    return patch + model.config.num_layers * per_layer + projector


def vit_layer_flops(N: int, D: int, I: int) -> int:
    """Multiply-adds × 2 of one CLIP/SigLIP encoder layer over N tokens: qkv, out, fc1+fc2, scores+values."""
    return 2 * N * D * 3 * D + 2 * N * D * D + 2 * 2 * N * D * I + 2 * 2 * N * N * D


def flops_per_image(model) -> int:
    """Multiply-adds × 2 that our model computes for one image, from its config (norms and activations not counted)."""
    v = model.config.vision
    D, I, P, C = v.hidden_size, v.intermediate_size, v.patch_size, v.num_channels
    N = v.num_patches + 1  # tokens through the encoder, CLS included
    patch = 2 * v.num_patches * (C * P * P) * D
    per_layer = vit_layer_flops(N, D, I)
    n_out = model.tokens_per_image
    k = len(model.config.feature_layers)
    projector = 2 * n_out * (D * k) * LM_HIDDEN + 2 * n_out * LM_HIDDEN * LM_HIDDEN
    return patch + model.config.num_layers * per_layer + projector


def build_gemma3_bench_small(path: Path) -> Path:
    """SigLIP ViT-B/16-224 + Gemma 3's pooled projector to 576, with a one-layer Gemma 3 text model (not measured)."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    vision = SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                image_size=224, patch_size=16, vision_use_head=False)
    text = Gemma3TextConfig(hidden_size=LM_HIDDEN, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
                            num_key_value_heads=3, head_dim=64, vocab_size=1024, max_position_embeddings=512)
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=GEMMA3_TOKENS,
                          boi_token_index=1000, eoi_token_index=1001, image_token_index=1002)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers initialises it to zeros: every output would be 0, and "outputs match" vacuous
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.02)
    model.save_pretrained(path)
    Gemma3ImageProcessorPil(size={"height": 224, "width": 224}).save_pretrained(path)
    return path


def gemma3_flops_per_image(model) -> int:
    """Multiply-adds × 2 of our SigLIP tower and Gemma 3 projector for one image (norms, pooling, activations not counted)."""
    v = model.config.vision
    D, I, P, C, N = v.hidden_size, v.intermediate_size, v.patch_size, v.num_channels, v.num_patches
    return 2 * N * (C * P * P) * D + v.num_hidden_layers * vit_layer_flops(N, D, I) + 2 * model.tokens_per_image * D * model.hidden_size


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_gflops(seconds: float, size: int = 2048) -> dict[str, float]:
    """float32 GFLOP/s of size³ matmuls through aten (MKL sgemm), oneDNN and MKL's packed GEMM, each
    kind in turn, back to back, for `seconds` in all: each kind's rate over that whole span.

    These are this machine's float32 GEMMs, and the roofline is the fastest kind, so using
    oneDNN or packed weights in our model cannot inflate its own fraction. The caller passes
    the time of the model's round it follows: on this shared host a lone 60 ms matmul often
    lands in a quiet moment that a round of seconds cannot, so a burst's rate would be a bar
    that no sustained run meets; over the same span both see the same neighbours.
    """
    from embedder_service.models import mkl_packed
    from embedder_service.models.clip import onednn_linear_available

    a, b = torch.randn(size, size), torch.randn(size, size)
    kinds = {"aten_mm": lambda: torch.mm(a, b)}
    if onednn_linear_available():
        kinds["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    if mkl_packed.available():
        packed = torch.ops.mkl._mkl_reorder_linear_weight(b, size)
        kinds["mkl_packed"] = lambda: torch.ops.mkl._mkl_linear(a, packed, b, None, size)
    spent = dict.fromkeys(kinds, 0.0)
    counts = dict.fromkeys(kinds, 0)
    start = time.perf_counter()
    while min(counts.values()) == 0 or time.perf_counter() - start < seconds:
        for kind, fn in kinds.items():
            spent[kind] += timed(fn)
            counts[kind] += 1
    return {kind: 2 * size**3 * counts[kind] / spent[kind] / 1e9 for kind in kinds}


def line(**fields) -> None:
    print(json.dumps(fields), flush=True)


def llava_setup(tmp: Path, images: list[Image.Image], device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    from transformers import LlavaForConditionalGeneration

    from embedder_service.models.llava import LlavaVisionModel

    path = build_bench_small(tmp)
    ours = LlavaVisionModel.from_checkpoint(path, device=device, dtype=dtype)
    ref = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()

    def inputs(batch: int):
        return ours.preprocessor.batch(images[:batch]).to(device, dtype)  # [B, 3, 224, 224], the same tensor for both

    return dict(
        bench=BENCH, attn=ref.config.vision_config._attn_implementation, inputs=inputs, flops=flops_per_image(ours),
        run_ours=ours,
        run_ref=lambda pixels: ref.model.get_image_features(
            pixel_values=pixels, vision_feature_layer=-2, vision_feature_select_strategy="default").pooler_output,
        layers=dict(layers_run=ours.config.num_layers, layers_in_checkpoint=ours.config.vision.num_hidden_layers),
    )


def qwen2_vl_setup(tmp: Path, images: list[Image.Image], device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    from transformers import Qwen2VLForConditionalGeneration

    from embedder_service.models.qwen2_vl import Qwen2VLVisionModel

    path = build_qwen2_vl_bench_small(tmp)
    ours = Qwen2VLVisionModel.from_checkpoint(path, device=device, dtype=dtype)
    ref = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    square = [im.resize((QWEN_IMAGE_SIZE, QWEN_IMAGE_SIZE)) for im in images]
    grid = ours.preprocessor(square[0]).grid

    def inputs(batch: int):
        pre = [ours.preprocessor(im) for im in square[:batch]]  # the same patches for both
        return pre, torch.cat([p.patches for p in pre]).to(device, dtype), torch.tensor([p.grid for p in pre], device=device)

    return dict(
        bench=f"{BENCH}/qwen2_vl", attn=ref.config.vision_config._attn_implementation, inputs=inputs,
        flops=qwen2_vl_flops_per_image(ours, grid), run_ours=lambda x: ours.embed_batch(x[0]),
        run_ref=lambda x: ref.model.get_image_features(pixel_values=x[1], image_grid_thw=x[2]).pooler_output,
        layers=dict(layers_run=ours.config.depth, patches_per_image=grid[0] * grid[1] * grid[2]),
    )


def pixtral_setup(tmp: Path, images: list[Image.Image], device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    from transformers import LlavaForConditionalGeneration

    from embedder_service.models.pixtral import PixtralVisionModel

    path = build_pixtral_bench_small(tmp)
    ours = PixtralVisionModel.from_checkpoint(path, device=device, dtype=dtype)
    ref = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    sized = [im.resize(PIXTRAL_IMAGE) for im in images]
    rows, cols = ours.grid_size(ours.preprocessor(sized[0]))

    def inputs(batch: int):
        pre = [ours.preprocessor(im) for im in sized[:batch]]  # the same pixels for both; one size, so no padding
        return pre, torch.stack(pre).to(device, dtype), torch.tensor([list(p.shape[1:]) for p in pre], device=device)

    return dict(
        bench=f"{BENCH}/pixtral", attn=ref.config.vision_config._attn_implementation, inputs=inputs,
        flops=pixtral_flops_per_image(ours, rows, cols), run_ours=lambda x: ours.embed_batch(x[0]),
        run_ref=lambda x: ref.model.get_image_features(pixel_values=x[1], image_sizes=x[2], vision_feature_layer=-1,
                                                       vision_feature_select_strategy="full").pooler_output,
        layers=dict(layers_run=ours.config.num_layers, patches_per_image=rows * cols),
    )


def gemma3_setup(tmp: Path, images: list[Image.Image], device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    from transformers import Gemma3ForConditionalGeneration

    from embedder_service.models.gemma3 import Gemma3VisionModel

    path = build_gemma3_bench_small(tmp)
    ours = Gemma3VisionModel.from_checkpoint(path, device=device, dtype=dtype)
    ref = Gemma3ForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()

    def inputs(batch: int):
        return ours.preprocessor.batch(images[:batch]).to(device, dtype)  # [B, 3, 224, 224], the same tensor for both

    return dict(
        bench=f"{BENCH}/gemma3", attn=ref.config.vision_config._attn_implementation, inputs=inputs, flops=gemma3_flops_per_image(ours),
        run_ours=ours, run_ref=lambda pixels: ref.model.get_image_features(pixel_values=pixels).pooler_output,
        layers=dict(layers_run=ours.config.vision.num_hidden_layers, patches_per_image=ours.config.vision.num_patches,
                    tokens_per_image=ours.tokens_per_image),
    )


SETUPS = {"llava": llava_setup, "qwen2_vl": qwen2_vl_setup, "pixtral": pixtral_setup, "gemma3": gemma3_setup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per implementation and batch size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--family", choices=list(SETUPS), default="llava")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when a GPU is visible")
    args = parser.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (rng.integers(200, 480), rng.integers(200, 480), 3), dtype=np.uint8)) for _ in range(max(args.batches))]
    with tempfile.TemporaryDirectory() as tmp:
        setup = SETUPS[args.family](Path(tmp), images, *(("cuda", torch.bfloat16) if cuda else ()))
    if cuda:
        return run_cuda(args, setup)
    bench, attn, flops, run_ours, run_ref = setup["bench"], setup["attn"], setup["flops"], setup["run_ours"], setup["run_ref"]

    matmul: dict[str, list[float]] = {}
    with torch.inference_mode():
        matmul_gflops(seconds=1.0)  # warm-up
        for batch in args.batches:
            x = setup["inputs"](batch)
            ok = torch.allclose(torch.cat(list(run_ours(x))), torch.cat(list(run_ref(x))), atol=1e-3, rtol=1e-3)  # also the warm-up
            run_ours(x)  # a second pass of this row count settles the packed GEMMs on it (mkl_packed): steady state is timed
            times = {"ours": [], "ref": []}
            for r in range(args.rounds):
                order = ("ours", "ref") if r % 2 == 0 else ("ref", "ours")  # alternate who runs first
                for name in order:
                    fn = run_ours if name == "ours" else run_ref
                    times[name].append(timed(lambda: fn(x)))
                for kind, gflops in matmul_gflops(seconds=times["ours"][-1]).items():
                    matmul.setdefault(kind, []).append(gflops)
            ours_ips = batch / statistics.median(times["ours"])
            ref_ips = batch / statistics.median(times["ref"])
            ratio = ours_ips / ref_ips
            fields = dict(bench=bench, metric=f"images_per_s_batch{batch}", value=round(ours_ips, 3), unit="images/s",
                          baseline=round(ref_ips, 3), ratio=round(ratio, 3))
            if batch == 8:
                fields |= dict(target=">= 1.2", met=ratio >= 1.2)
            line(**fields, baseline_impl=f"transformers get_image_features (attn={attn})", outputs_match=ok)
            # Peak against peak: other processes on a shared machine only ever slow a run down, so the
            # fastest round of each (the matmuls' sustained over as long as a round) is the best
            # estimate of what it does alone. Medians are given too.
            roofline = max(max(v) for v in matmul.values())
            model_gflops = batch / min(times["ours"]) * flops / 1e9
            fraction = model_gflops / roofline
            median_fraction = ours_ips * flops / 1e9 / max(statistics.median(v) for v in matmul.values())
            line(bench=bench, metric=f"roofline_fraction_batch{batch}", value=round(fraction, 3), unit="fraction of matmul GFLOP/s",
                 baseline=round(roofline, 2), ratio=round(fraction, 3), target=">= 0.8", met=fraction >= 0.8,
                 model_gflop_per_s=round(model_gflops, 2), median_based=round(median_fraction, 3))
    line(bench=bench, metric="gflop_per_image", value=round(flops / 1e9, 3), unit="GFLOP", **setup["layers"])
    for kind, values in matmul.items():
        line(bench=bench, metric=f"matmul_2048_gflop_per_s_{kind}", value=round(max(values), 2), unit="GFLOP/s",
             median=round(statistics.median(values), 2), threads=torch.get_num_threads(), sustained="as long as a round of ours")

def run_cuda(args, setup: dict) -> None:
    """GPU mode: ours vs transformers in bfloat16, CUDA-event timing, fractions of the peaks measured here."""
    from cuda_ext.timing import copy_gb_per_s, cuda_seconds, matmul_tflops

    bench, flops, run_ours, run_ref = f"{setup['bench']}/cuda", setup["flops"], setup["run_ours"], setup["run_ref"]
    peak_tflops, copy_gbps = matmul_tflops(), copy_gb_per_s()
    line(bench=bench, metric="matmul_bf16_tflop_per_s", value=round(peak_tflops, 1), unit="TFLOP/s",
         device=torch.cuda.get_device_name(), size=8192)
    line(bench=bench, metric="copy_bandwidth", value=round(copy_gbps, 1), unit="GB/s", note="bytes read + written")
    with torch.inference_mode():
        for batch in args.batches:
            x = setup["inputs"](batch)
            diff = (torch.cat(list(run_ours(x))).float() - torch.cat(list(run_ref(x))).float()).abs().max().item()  # also the warm-up
            times = {"ours": [], "ref": []}
            for r in range(args.rounds):
                for name in ("ours", "ref") if r % 2 == 0 else ("ref", "ours"):  # alternate who runs first
                    fn = run_ours if name == "ours" else run_ref
                    times[name].append(cuda_seconds(lambda: fn(x)))
            ours_ips, ref_ips = batch / min(times["ours"]), batch / min(times["ref"])
            line(bench=bench, metric=f"images_per_s_batch{batch}", value=round(ours_ips, 2), unit="images/s",
                 baseline=round(ref_ips, 2), ratio=round(ours_ips / ref_ips, 3), max_abs_diff_bf16=round(diff, 4),
                 baseline_impl=f"transformers get_image_features (attn={setup['attn']})")
            tflops = ours_ips * flops / 1e12
            line(bench=bench, metric=f"matmul_peak_fraction_batch{batch}", value=round(tflops / peak_tflops, 4),
                 unit="fraction of bf16 matmul TFLOP/s", baseline=round(peak_tflops, 1), ratio=round(tflops / peak_tflops, 4),
                 model_tflop_per_s=round(tflops, 2))
    line(bench=bench, metric="gflop_per_image", value=round(flops / 1e9, 3), unit="GFLOP", **setup["layers"])


if __name__ == "__main__":
    main()
