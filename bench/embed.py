"""Embedder throughput on bench-small: our LlavaVisionModel vs transformers' get_image_features.

bench-small (DESIGN §8): CLIP ViT-B/16 at 224 px (hidden 768, 12 layers, 12
heads, MLP 3072) + projector into an LM hidden size of 576, feature layer −2,
default strategy, random weights, float32. The checkpoint is written with
`transformers` into a temporary folder; both implementations load that folder
and run on the same pixel tensors, measured alternately in one run (the
machine is shared: absolute figures move, ratios less).

Prints one JSON object per line: bench, metric, value, unit, and for
comparisons baseline, ratio, target, met.

    python bench/embed.py [--rounds 5] [--threads 2]
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


def build_bench_small(path: Path) -> Path:
    """ViT-B/16-224 + projector to 576, with a one-layer LM (the LM is not measured)."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

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


def flops_per_image(model) -> int:
    """Multiply-adds × 2 that our model computes for one image, from its config (norms and activations not counted)."""
    v = model.config.vision
    D, I, P, C = v.hidden_size, v.intermediate_size, v.patch_size, v.num_channels
    N = v.num_patches + 1  # tokens through the encoder, CLS included
    patch = 2 * v.num_patches * (C * P * P) * D
    per_layer = 2 * N * D * 3 * D + 2 * N * D * D + 2 * 2 * N * D * I + 2 * 2 * N * N * D  # qkv, out, fc1+fc2, scores+values
    n_out = model.tokens_per_image
    k = len(model.config.feature_layers)
    projector = 2 * n_out * (D * k) * LM_HIDDEN + 2 * n_out * LM_HIDDEN * LM_HIDDEN
    return patch + model.config.num_layers * per_layer + projector


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_gflops(size: int = 2048, tries: int = 3) -> dict[str, float]:
    """float32 GFLOP/s of a size³ matmul through aten (MKL sgemm) and through oneDNN, best of `tries`.

    Both are this machine's float32 GEMM. The roofline is the fastest seen, so
    using oneDNN in our model cannot inflate its own roofline fraction, and
    contention from other processes can only lower our fraction, not raise it.
    """
    from embedder_service.models.clip import onednn_linear_available

    a, b = torch.randn(size, size), torch.randn(size, size)
    kinds = {"aten_mm": lambda: torch.mm(a, b)}
    if onednn_linear_available():
        kinds["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return {kind: 2 * size**3 / min(timed(fn) for _ in range(tries)) / 1e9 for kind, fn in kinds.items()}


def line(**fields) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per implementation and batch size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from embedder_service.models.llava import LlavaVisionModel

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_bench_small(Path(tmp))
        ours = LlavaVisionModel.from_checkpoint(path, device="cpu", dtype=torch.float32)
        ref = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    attn = ref.config.vision_config._attn_implementation

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (rng.integers(200, 480), rng.integers(200, 480), 3), dtype=np.uint8)) for _ in range(max(args.batches))]
    flops = flops_per_image(ours)

    def run_ours(pixels):
        return ours(pixels)

    def run_ref(pixels):
        return ref.model.get_image_features(pixel_values=pixels, vision_feature_layer=-2, vision_feature_select_strategy="default").pooler_output

    matmul: dict[str, list[float]] = {}
    with torch.inference_mode():
        matmul_gflops()  # warm-up
        for batch in args.batches:
            pixels = ours.preprocessor.batch(images[:batch])  # [B, 3, 224, 224], the same tensor for both
            ok = torch.allclose(run_ours(pixels), torch.stack(list(run_ref(pixels))), atol=1e-3, rtol=1e-3)  # also the warm-up
            times = {"ours": [], "ref": []}
            for r in range(args.rounds):
                order = ("ours", "ref") if r % 2 == 0 else ("ref", "ours")  # alternate who runs first
                for name in order:
                    fn = run_ours if name == "ours" else run_ref
                    times[name].append(timed(lambda: fn(pixels)))
                for kind, gflops in matmul_gflops().items():
                    matmul.setdefault(kind, []).append(gflops)
            ours_ips = batch / statistics.median(times["ours"])
            ref_ips = batch / statistics.median(times["ref"])
            ratio = ours_ips / ref_ips
            fields = dict(bench=BENCH, metric=f"images_per_s_batch{batch}", value=round(ours_ips, 3), unit="images/s",
                          baseline=round(ref_ips, 3), ratio=round(ratio, 3))
            if batch == 8:
                fields |= dict(target=">= 1.2", met=ratio >= 1.2)
            line(**fields, baseline_impl=f"transformers get_image_features (attn={attn})", outputs_match=ok)
            # Peak against peak: other processes on a shared machine only ever slow a run down, so the
            # fastest round of each is the best estimate of what it does alone. Medians are given too.
            roofline = max(max(v) for v in matmul.values())
            model_gflops = batch / min(times["ours"]) * flops / 1e9
            fraction = model_gflops / roofline
            median_fraction = ours_ips * flops / 1e9 / max(statistics.median(v) for v in matmul.values())
            line(bench=BENCH, metric=f"roofline_fraction_batch{batch}", value=round(fraction, 3), unit="fraction of matmul GFLOP/s",
                 baseline=round(roofline, 2), ratio=round(fraction, 3), target=">= 0.8", met=fraction >= 0.8,
                 model_gflop_per_s=round(model_gflops, 2), median_based=round(median_fraction, 3))
    line(bench=BENCH, metric="gflop_per_image", value=round(flops / 1e9, 3), unit="GFLOP", layers_run=ours.config.num_layers,
         layers_in_checkpoint=ours.config.vision.num_hidden_layers)
    for kind, values in matmul.items():
        line(bench=BENCH, metric=f"matmul_2048_gflop_per_s_{kind}", value=round(max(values), 2), unit="GFLOP/s",
             median=round(statistics.median(values), 2), threads=torch.get_num_threads())

if __name__ == "__main__":
    main()
