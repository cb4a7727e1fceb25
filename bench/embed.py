"""Embedder throughput on bench-small: our LlavaVisionModel vs transformers' get_image_features.

bench-small (docs/DESIGN.md §9, bench/common.py): CLIP ViT-B/16 at 224 px (hidden 768, 12
layers, 12 heads, MLP 3072) + projector into an LM hidden size of 576, feature
layer −2, default strategy, random weights, float32. The checkpoint is the
family's demo model at those sizes (`common.write_bench_small`, with a one-layer
LM that is not measured), in a temporary folder; both implementations load that
folder and run on the same pixel tensors, measured alternately in one run (the
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

Prints one JSON line per metric (bench/common.py): images/s against transformers
(median rounds), and the model's GFLOP/s against the machine's fastest float32
matmul's (best rounds; the median-based fraction beside it).

GPU mode (`--device cuda`, the default when a GPU is visible): both implementations
in bfloat16 on the GPU, each call timed to its synchronisation; images/s against
transformers and the achieved TFLOP/s against a bfloat16 matmul's, with the GPU's matmul
TFLOP/s and copy bandwidth measured in the same run (bench `…/cuda`; the CPU
targets do not apply). The CPU run is as above.

    python bench/embed.py [--rounds 5] [--threads 2] [--family llava|qwen2_vl|pixtral|gemma3] [--device auto|cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from common import (
    BENCH_SMALL,
    LM,
    best_of,
    compare,
    emit,
    one_round,
    parse_args,
    write_bench_small,
)
from PIL import Image

BENCH = "embed/bench-small"
LM_HIDDEN = LM["hidden_size"]


def qwen2_vl_flops_per_image(model, grid: tuple[int, int, int]) -> int:
    """Multiply-adds × 2 of our Qwen2-VL tower and merger for an image of `grid` patches (norms, RoPE, activations not counted)."""
    c = model.config
    D, I, U = c.embed_dim, c.intermediate_size, c.merge_unit
    N = grid[0] * grid[1] * grid[2]
    patch = 2 * N * c.patch_dim * D
    per_layer = vit_layer_flops(N, D, I)
    merger = 2 * (N // U) * (U * D) ** 2 + 2 * (N // U) * (U * D) * c.out_hidden_size
    return patch + c.depth * per_layer + merger


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


def gemma3_flops_per_image(model) -> int:
    """Multiply-adds × 2 of our SigLIP tower and Gemma 3 projector for one image (norms, pooling, activations not counted)."""
    v = model.config.vision
    D, I, P, C, N = v.hidden_size, v.intermediate_size, v.patch_size, v.num_channels, v.num_patches
    return 2 * N * (C * P * P) * D + v.num_hidden_layers * vit_layer_flops(N, D, I) + 2 * model.tokens_per_image * D * model.hidden_size


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
    from embedder_service.models.gemm import onednn_linear_available

    a, b = torch.randn(size, size), torch.randn(size, size)
    kinds = {"aten_mm": lambda: torch.mm(a, b)}
    if onednn_linear_available():
        kinds["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    if mkl_packed.available():
        packed = torch.ops.mkl._mkl_reorder_linear_weight(b, size)
        kinds["mkl_packed"] = lambda: torch.ops.mkl._mkl_linear(a, packed, b, None, size)
    spent = dict.fromkeys(kinds, 0.0)
    rounds = 0
    while rounds == 0 or sum(spent.values()) < seconds:
        for kind, elapsed in one_round(kinds, rounds).items():
            spent[kind] += elapsed
        rounds += 1
    return {kind: 2 * size**3 * rounds / spent[kind] / 1e9 for kind in kinds}


def load(path: Path, ours_class, reference: str, device: str, dtype: torch.dtype):
    """Our vision model and transformers' `reference` model of the checkpoint at `path`."""
    import transformers

    ours = ours_class.from_checkpoint(path, device=device, dtype=dtype)
    return ours, getattr(transformers, reference).from_pretrained(path, dtype=dtype).to(device).eval()


def pixel_batches(ours, images: list[Image.Image], device: str, dtype: torch.dtype):
    """batch → the preprocessor's [B, 3, H, W] of the first images, the same tensor for both (towers of one image size)."""
    return lambda batch: ours.preprocessor.batch(images[:batch]).to(device, dtype)


def llava_setup(path: Path, images: list[Image.Image], device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    from embedder_service.models.llava import LlavaVisionModel

    ours, ref = load(path, LlavaVisionModel, "LlavaForConditionalGeneration", device, dtype)
    return dict(
        bench=BENCH, ref=ref, inputs=pixel_batches(ours, images, device, dtype), flops=flops_per_image(ours), run_ours=ours,
        run_ref=lambda pixels: ref.model.get_image_features(
            pixel_values=pixels, vision_feature_layer=-2, vision_feature_select_strategy="default").pooler_output,
        layers=dict(layers_run=ours.config.num_layers, layers_in_checkpoint=ours.config.vision.num_hidden_layers),
    )


def qwen2_vl_setup(path: Path, images: list[Image.Image], device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    from embedder_service.models.qwen2_vl import Qwen2VLVisionModel

    ours, ref = load(path, Qwen2VLVisionModel, "Qwen2VLForConditionalGeneration", device, dtype)
    square = [im.resize(BENCH_SMALL["qwen2_vl"].image) for im in images]
    grid = ours.preprocessor(square[0]).grid

    def inputs(batch: int):
        pre = [ours.preprocessor(im) for im in square[:batch]]  # the same patches for both
        return pre, torch.cat([p.patches for p in pre]).to(device, dtype), torch.tensor([p.grid for p in pre], device=device)

    return dict(
        bench=f"{BENCH}/qwen2_vl", ref=ref, inputs=inputs, flops=qwen2_vl_flops_per_image(ours, grid),
        run_ours=lambda x: ours.embed_batch(x[0]),
        run_ref=lambda x: ref.model.get_image_features(pixel_values=x[1], image_grid_thw=x[2]).pooler_output,
        layers=dict(layers_run=ours.config.depth, patches_per_image=grid[0] * grid[1] * grid[2]),
    )


def pixtral_setup(path: Path, images: list[Image.Image], device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    from embedder_service.models.pixtral import PixtralVisionModel

    ours, ref = load(path, PixtralVisionModel, "LlavaForConditionalGeneration", device, dtype)
    sized = [im.resize(BENCH_SMALL["pixtral"].image) for im in images]
    rows, cols = ours.grid_size(ours.preprocessor(sized[0]))

    def inputs(batch: int):
        pre = [ours.preprocessor(im) for im in sized[:batch]]  # the same pixels for both; one size, so no padding
        return pre, torch.stack(pre).to(device, dtype), torch.tensor([list(p.shape[1:]) for p in pre], device=device)

    return dict(
        bench=f"{BENCH}/pixtral", ref=ref, inputs=inputs, flops=pixtral_flops_per_image(ours, rows, cols),
        run_ours=lambda x: ours.embed_batch(x[0]),
        run_ref=lambda x: ref.model.get_image_features(pixel_values=x[1], image_sizes=x[2], vision_feature_layer=-1,
                                                       vision_feature_select_strategy="full").pooler_output,
        layers=dict(layers_run=ours.config.num_layers, patches_per_image=rows * cols),
    )


def gemma3_setup(path: Path, images: list[Image.Image], device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    from embedder_service.models.gemma3 import Gemma3VisionModel

    ours, ref = load(path, Gemma3VisionModel, "Gemma3ForConditionalGeneration", device, dtype)
    return dict(
        bench=f"{BENCH}/gemma3", ref=ref, inputs=pixel_batches(ours, images, device, dtype), flops=gemma3_flops_per_image(ours),
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
    args = parse_args(parser, quick={"rounds": 1})
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (rng.integers(200, 480), rng.integers(200, 480), 3), dtype=np.uint8)) for _ in range(max(args.batches))]
    with tempfile.TemporaryDirectory() as tmp:
        write_bench_small(Path(tmp), args.family, lm=LM | {"num_hidden_layers": 1})  # the LM is not measured
        setup = SETUPS[args.family](Path(tmp), images, *(("cuda", torch.bfloat16) if cuda else ()))
    if cuda:
        return run_cuda(args, setup)
    bench, flops, run_ours, run_ref = setup["bench"], setup["flops"], setup["run_ours"], setup["run_ref"]
    attn = setup["ref"].config.vision_config._attn_implementation

    matmul: dict[str, list[float]] = {}
    with torch.inference_mode():
        matmul_gflops(seconds=1.0)  # warm-up
        for batch in args.batches:
            x = setup["inputs"](batch)
            ok = torch.allclose(torch.cat(list(run_ours(x))), torch.cat(list(run_ref(x))), atol=1e-3, rtol=1e-3)  # also the warm-up
            run_ours(x)  # a second pass of this row count settles the packed GEMMs on it (mkl_packed): steady state is timed
            times = {"ours": [], "ref": []}
            for r in range(args.rounds):
                for name, seconds in one_round({"ours": lambda: run_ours(x), "ref": lambda: run_ref(x)}, r).items():
                    times[name].append(seconds)
                for kind, gflops in matmul_gflops(seconds=times["ours"][-1]).items():
                    matmul.setdefault(kind, []).append(gflops)
            ours_ips = batch / statistics.median(times["ours"])
            ref_ips = batch / statistics.median(times["ref"])
            compare(bench, f"images_per_s_batch{batch}", ours_ips, ref_ips, "images/s", ">= 1.2" if batch == 8 else None,
                    baseline_impl=f"transformers get_image_features (attn={attn})", outputs_match=ok)
            # Peak against peak: other processes on a shared machine only ever slow a run down, so the
            # fastest round of each (the matmuls' sustained over as long as a round) is the best
            # estimate of what it does alone. Medians are given too.
            roofline = max(max(v) for v in matmul.values())
            model_gflops = batch / min(times["ours"]) * flops / 1e9
            median_fraction = ours_ips * flops / 1e9 / max(statistics.median(v) for v in matmul.values())
            compare(bench, f"roofline_fraction_batch{batch}", model_gflops, roofline, "GFLOP/s", ">= 0.8",
                    baseline_impl="the fastest float32 matmul kind, sustained as long as a round", median_based=median_fraction)
    emit(bench, "gflop_per_image", flops / 1e9, "GFLOP", **setup["layers"])
    for kind, values in matmul.items():
        emit(bench, f"matmul_2048_gflop_per_s_{kind}", max(values), "GFLOP/s", median=statistics.median(values),
             threads=torch.get_num_threads(), sustained="as long as a round of ours")


def run_cuda(args, setup: dict) -> None:
    """GPU mode: ours vs transformers in bfloat16, each call timed to its synchronisation, fractions of the peaks measured here."""
    from cuda_ext.timing import copy_gb_per_s, matmul_tflops

    bench, flops, run_ours, run_ref = f"{setup['bench']}/cuda", setup["flops"], setup["run_ours"], setup["run_ref"]
    peak_tflops, copy_gbps = matmul_tflops(), copy_gb_per_s()
    emit(bench, "matmul_bf16_tflop_per_s", peak_tflops, "TFLOP/s", device=torch.cuda.get_device_name(), size=8192)
    emit(bench, "copy_bandwidth", copy_gbps, "GB/s", note="bytes read + written")
    with torch.inference_mode():
        for batch in args.batches:
            x = setup["inputs"](batch)
            diff = (torch.cat(list(run_ours(x))).float() - torch.cat(list(run_ref(x))).float()).abs().max().item()
            t = best_of({"ours": lambda: run_ours(x), "ref": lambda: run_ref(x)}, args.rounds, sync=torch.cuda.synchronize)
            ours_ips, ref_ips = batch / t["ours"], batch / t["ref"]
            compare(bench, f"images_per_s_batch{batch}", ours_ips, ref_ips, "images/s", max_abs_diff_bf16=diff,
                    baseline_impl=f"transformers get_image_features (attn={setup['ref'].config.vision_config._attn_implementation})")
            compare(bench, f"matmul_peak_fraction_batch{batch}", ours_ips * flops / 1e12, peak_tflops, "TFLOP/s")
    emit(bench, "gflop_per_image", flops / 1e9, "GFLOP", **setup["layers"])


if __name__ == "__main__":
    main()
