"""What every bench script shares: the JSON-line printer, the one best-of-rounds timer, `--quick`, the
bench-small checkpoints and the line saying which CPU ran them.

Every result is one JSON object on one line: bench, metric, value, unit, the CPU, and for a comparison
baseline, ratio, target and met. bench/table.py makes the markdown table of them; bench/run_all.py runs
every bench and writes bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the scripts run as `python bench/X.py`, with bench/ rather than the repo on the path

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from shared.modeling.timing import fastest  # noqa: E402
from vlmq.demo_model import tiny_checkpoint  # noqa: E402
from vlmq.demo_model.checkpoint import TinyCheckpoint  # noqa: E402

# The instruction-set extensions that decide which kernels run (oneDNN, MKL, the decode kernels).
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def _cpuinfo(key: str) -> str:
    """The first `key: value` of /proc/cpuinfo, or "" off Linux."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == key), "")


CPU = _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_description() -> str:
    """The CPU's model, logical CPU count and SIMD flags: `Intel(R) Xeon(R) … (2 logical CPUs; avx2 fma avx512f …)`."""
    flags = set(_cpuinfo("flags").split())
    return f"{CPU} ({os.cpu_count()} logical CPUs; {' '.join(f for f in SIMD_FLAGS if f in flags) or 'no flags known'})"


def _rounded(value):
    return round(value, 4) if isinstance(value, float) else value


def emit(bench: str, metric: str, value: float, unit: str, **context) -> None:
    """One result line; `context` (sizes, notes, the device) goes in as it is, then the CPU that ran it."""
    fields = {"bench": bench, "metric": metric, "value": _rounded(value), "unit": unit}
    print(json.dumps(fields | {k: _rounded(v) for k, v in context.items()} | {"cpu": CPU}), flush=True)


def compare(bench: str, metric: str, value: float, baseline: float, unit: str, target: str | None = None, **context) -> None:
    """A result against a baseline in the same unit: ratio = value ÷ baseline, and with a `target` on the ratio
    (">= 1.2", "<= 1.05") whether it is met."""
    ratio = value / baseline
    fields = {"baseline": baseline, "ratio": ratio}
    if target is not None:
        op, bound = target.split()
        fields |= {"target": target, "met": ratio >= float(bound) if op == ">=" else ratio <= float(bound)}
    emit(bench, metric, value, unit, **fields, **context)


def best_of(calls: dict[str, Callable[[], object]], rounds: int, sync: Callable[[], object] | None = None) -> dict[str, float]:
    """Each call's best seconds over `rounds` rounds after one untimed warm-up each, the calls taking turns.

    Best, not median: other work on a shared machine only ever adds time. Taking turns exposes every
    contender to the same load. `sync` runs inside each timing, after the call (a GPU's queued work).
    """
    if sync is not None:
        calls = {name: (lambda call=call: (call(), sync())) for name, call in calls.items()}
    for call in calls.values():
        call()
    return fastest(calls, rounds)[1]


def one_round(calls: dict[str, Callable[[], object]], index: int) -> dict[str, float]:
    """Each call's seconds, run once in turn, in reverse order on odd `index` so that none always runs on a
    warmer cache: a round of `best_of` for benches that keep every round (for medians, or work between rounds)."""
    order = list(calls)[::-1] if index % 2 else list(calls)
    return fastest({name: calls[name] for name in order}, rounds=1)[1]


def parse_args(parser: argparse.ArgumentParser, quick: dict) -> argparse.Namespace:
    """The bench's arguments plus --quick, which sets the options in `quick` (fewer rounds, the same shapes):
    a check that the bench runs, not a measurement."""
    flags = ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in quick.items())
    parser.add_argument("--quick", action="store_true", help=f"check that it runs: {flags}")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(quick)
    return args


# bench-small (docs/DESIGN.md §9): each family's checkpoint from vlmq.demo_model at these sizes, random weights, float32
# on the CPU. The language model is SmolLM2-135M-shaped, the vision towers ViT-B wide.
LM = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3}
SMOLLM2_135M = LM | {"vocab_size": 49152, "num_hidden_layers": 30, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
                     "max_position_embeddings": 2048}
VIT_B = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}


@dataclass(frozen=True)
class BenchSmall:
    """One family's bench-small beyond the shared shapes."""

    vision: dict  # the tower the embed bench measures, as overrides of the family's tiny vision config
    image: tuple[int, int]  # (width, height) of the images the benches feed it
    text: dict = field(default_factory=dict)  # the family's own language-model fields
    options: dict = field(default_factory=dict)  # tiny_checkpoint's options


BENCH_SMALL = {
    # CLIP ViT-B/16 at 224 px: 14 × 14 = 196 image tokens.
    "llava": BenchSmall(VIT_B | {"image_size": 224, "patch_size": 16, "projection_dim": 512}, (224, 224)),
    # Qwen2-VL's tower at ViT-B width: 448 px in 14 px patches, 32 × 32 merged 2 × 2 into 256 rows.
    "qwen2_vl": BenchSmall({"depth": 12, "embed_dim": 768, "num_heads": 12, "mlp_ratio": 4, "patch_size": 14}, (448, 448),
                           options={"min_pixels": 56 * 56, "max_pixels": 448 * 448}),
    # A Pixtral tower at ViT-B width, gated MLP: 512 × 384 px in 16 px patches, 24 rows of 32.
    "pixtral": BenchSmall(VIT_B | {"image_size": 512, "patch_size": 16}, (512, 384)),
    # SigLIP ViT-B/16 at 224 px, 14 × 14 patches pooled 2 × 2 to 49 rows (64 is not a Gemma 3 shape for 196
    # patches: its pool kernel is patches per side ÷ tokens per side, 14 ÷ 8 = 1). Its LM keeps Gemma 3's
    # sliding and global layers, with a window of 64 so that prefill and decode both slide.
    "gemma3": BenchSmall(VIT_B | {"image_size": 224, "patch_size": 16}, (224, 224),
                         text={"query_pre_attn_scalar": 64, "sliding_window": 64}, options={"tokens_per_image": 49}),
}


def patches(family: str) -> tuple[int, int]:
    """(rows, columns) of patches of `family`'s bench-small image."""
    shape = BENCH_SMALL[family]
    width, height = shape.image
    return height // shape.vision["patch_size"], width // shape.vision["patch_size"]


def write_bench_small(path: Path, family: str, *, tower: bool = True, lm: dict = SMOLLM2_135M) -> TinyCheckpoint:
    """`family`'s bench-small checkpoint into `path`, random weights at transformers' scale (std 0.02).

    tower=False keeps the demo's tiny tower at the bench's image geometry (the generate bench does not
    measure it); `lm` overrides the language model's fields (the embed bench runs a one-layer one).
    """
    shape = BENCH_SMALL[family]
    vision = shape.vision if tower else {k: v for k, v in shape.vision.items() if k in ("image_size", "patch_size")}
    checkpoint = tiny_checkpoint(family, vision=vision, text=lm | shape.text, **shape.options)
    checkpoint.write(path, weight_std=0.02)
    _silence_unspoken_tokens(path / "model.safetensors", ordinary_ids(checkpoint.tokenizer))
    return checkpoint


def ordinary_ids(tokenizer) -> list[int]:
    """The tokenizer's IDs that are text: not its special tokens (BOS, the chat and image markers)."""
    special = set(tokenizer.get_added_tokens_decoder())
    return [i for i in range(tokenizer.get_vocab_size()) if i not in special]


def _silence_unspoken_tokens(weights_file: Path, spoken: list[int]) -> None:
    """Zero the embedding (tied: also LM-head) rows of every ID but the `spoken` ones: the special tokens and the
    IDs past the tokenizer's (the LM's vocabulary is padded to a real model's). Their logits are then 0, below
    the best of the others', so greedy decoding always picks a token with text, and a streaming client sees
    every token as with a real model. With random weights the LM otherwise repeats its last input, which ends
    a Pixtral chat prompt as [/INST]: decoded, nothing. The products stay full-size."""
    weights = load_file(weights_file)
    for name, tensor in weights.items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            silent = torch.ones(tensor.shape[0], dtype=torch.bool)
            silent[spoken] = False
            tensor[silent] = 0
    save_file(weights, weights_file, metadata={"format": "pt"})
