"""Why the language models' CPU products run on vlmq's own panel kernel: it against the alternatives, 1 to 512 tokens.

One bench-small language model's worth of products (SmolLM2-135M's 30 layers: QKV 960 × 576, O 576 × 576,
gate/up 3072 × 576, down 576 × 1536; 424 MB of float32, more than the weights a cache holds), every layer's
own weights so that they stream from memory as in a forward, for N tokens:

- `panel`: `cuda_ext.decode`'s `panel_linear` over weights packed in panels of 16 outputs (what the models run);
- `row_major`: the same kernels' `linear`, one dot product per output over the checkpoint's layout
  (the LM head's, and the layers' before the panels);
- `mkl`: torch's `F.linear` on the row-major weight;
- `onednn`: torch's oneDNN linear on its blocked layout (the torch path's where the kernels are unavailable).

Decoding is 1 to 8 tokens a step, a second question's prefill ~20–30, a prompt's 200–512. Prints one JSON line per
token count: panel's time against each other's (ratio < 1: panel faster), and the GFLOP/s of each.

    python bench/products.py [--threads 2] [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import SMOLLM2_135M, best_of, compare, parse_args

from cuda_ext.decode.ops import cpu_decode_ops, pack_panels, set_decode_kernel

TOKENS = (1, 2, 4, 8, 16, 29, 64, 221, 512)


def layer_shapes() -> list[tuple[int, int]]:
    """(outputs, inputs) of one bench-small layer's four products."""
    lm = SMOLLM2_135M
    d, inter, heads, kv_heads = lm["hidden_size"], lm["intermediate_size"], lm["num_attention_heads"], lm["num_key_value_heads"]
    qkv = (heads + 2 * kv_heads) * d // heads
    return [(qkv, d), (d, d), (2 * inter, d), (d, inter)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parse_args(parser, quick={"rounds": 1})
    torch.set_num_threads(args.threads)
    set_decode_kernel("auto")
    ops = cpu_decode_ops("cpu", torch.float32)
    if ops is None:
        raise SystemExit("the CPU decode kernels are unavailable here (see the log): nothing to compare")
    g = torch.Generator().manual_seed(0)
    shapes = layer_shapes()
    layers = [[torch.randn(m, k, generator=g) * 0.02 for m, k in shapes] for _ in range(SMOLLM2_135M["num_hidden_layers"])]
    panels = [[pack_panels(w) for w in layer] for layer in layers]
    blocked = [[torch.ops.mkldnn._reorder_linear_weight(w, None) for w in layer] for layer in layers]
    flops_per_token = 2 * sum(m * k for m, k in shapes) * len(layers)

    for tokens in TOKENS:
        xs = [torch.randn(tokens, k, generator=g) for _, k in shapes]

        def run(product) -> None:
            for layer in range(len(layers)):
                for i, x in enumerate(xs):
                    product(layer, i, x)

        with torch.inference_mode():
            t = best_of({
                "panel": lambda: run(lambda l, i, x: panels[l][i].linear(x)),
                "row_major": lambda: run(lambda l, i, x: ops.linear(x, layers[l][i])),
                "mkl": lambda: run(lambda l, i, x: F.linear(x, layers[l][i])),
                "onednn": lambda: run(lambda l, i, x: torch.ops.mkldnn._linear_pointwise(x, blocked[l][i], None, "none", [], "")),
            }, args.rounds)
        gflops = {name: round(tokens * flops_per_token / seconds / 1e9, 1) for name, seconds in t.items()}
        for other in ("row_major", "mkl", "onednn"):
            compare("products/bench-small-lm", f"products_ms_{tokens}_tokens_vs_{other}", t["panel"] * 1e3, t[other] * 1e3, "ms",
                    tokens=tokens, threads=args.threads, gflop_per_s=gflops)


if __name__ == "__main__":
    main()
