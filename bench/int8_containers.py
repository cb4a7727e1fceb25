"""What 8-bit containers cost in accuracy and save in bytes, per family (issue 26): an image embedded by each
family's checkpoint in float32, stored as float16 and as int8 (`VLMQ_CONTAINER_DTYPE=int8`), and the
language model run on the float32 rows and on the int8 rows dequantized.

Per family: bytes per image of int8 ÷ float16 (target ≤ 0.51 at a 7B model's width; a tiny checkpoint's
narrow rows pay relatively more for their scales), the rows' worst cosine similarity to the float32 rows
(target ≥ 0.999), the prompt logits' largest absolute difference, and how many of 64 greedy tokens agree
(EOS ignored). Also the bytes of a LLaVA-1.5-7B-sized image (576 × 4096).

`--size bench-small` runs the bench-small checkpoints (ViT-B towers, SmolLM2-135M-shaped LM) instead of the
tiny test ones.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import BENCH_SMALL, emit, parse_args, write_bench_small
from PIL import Image

from embedder_service.models import load_vision_model
from generator_service.engine import Engine, GenerationRequest
from generator_service.sampling import SamplingParams
from generator_service.tokenizer import Tokenizer
from shared.modeling.checkpoint import Checkpoint
from shared.modeling.registry import family_for
from shared.store.container import EmbeddingContainer, encode_container, stored_as
from shared.store.token_ids import EMBEDDING_INDEX_BASE
from vlmq.demo_model import tiny_checkpoint

BENCH = "int8_containers"
FAMILIES = ("llava", "qwen2_vl", "pixtral", "gemma3")
NEW_TOKENS = 64


def _image(size: tuple[int, int]) -> Image.Image:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _container(path: Path, image: Image.Image) -> EmbeddingContainer:
    vision = load_vision_model(str(path), "cpu", "float32")
    pixels = vision.preprocessor(image)
    [rows] = vision.embed_batch([pixels])  # [N, D] float32
    return EmbeddingContainer(id="bench", model=vision.fingerprint, tenant="bench", first_token_id=EMBEDDING_INDEX_BASE,
                              num_tokens=rows.shape[0], embeddings=rows, layout=vision.layout_for(pixels), grid=vision.grid_for(pixels))


def _logits(lm, ids: list[int], container: EmbeddingContainer) -> torch.Tensor:
    positions, _ = lm.prompt_positions(ids, [container])
    ranges = torch.tensor([[container.first_token_id, container.num_tokens]])
    return lm.prefill(torch.tensor(ids), lm.new_cache(1, len(ids)), 0, ranges=ranges, rows=container.embeddings,
                      all_logits=True, positions=positions)  # [P, V]


def _greedy(lm, ids: list[int], containers: list[EmbeddingContainer]) -> list[list[int]]:
    engine = Engine(lm, max_batch=len(containers), max_seq_len=len(ids) + NEW_TOKENS + 1)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    handles = [engine.submit(GenerationRequest(ids, params, [container])) for container in containers]
    engine.run_until_idle()
    return [handle.result().token_ids for handle in handles]


def measure(family: str, path: Path, image_size: tuple[int, int]) -> None:
    exact = _container(path, _image(image_size))
    int8 = stored_as(exact, "int8")
    ratio = len(encode_container(int8)) / len(encode_container(stored_as(exact, "float16")))
    dequantized = int8.dequantized(torch.float32)
    cosine = torch.nn.functional.cosine_similarity(dequantized.embeddings, exact.embeddings, dim=1).min().item()

    checkpoint = Checkpoint(path)
    lm = family_for(checkpoint.config).load_language_class().from_checkpoint(checkpoint, device="cpu", dtype=torch.float32)
    ids = Tokenizer.from_checkpoint(checkpoint).encode_with_images(["USER: ", "\nDescribe the image. ASSISTANT:"], [exact]).ids
    with torch.inference_mode():
        reference = _logits(lm, ids, exact)
        logits_diff = (_logits(lm, ids, dequantized) - reference).abs().max().item()
    float_tokens, int8_tokens = _greedy(lm, ids, [exact, dequantized])
    agree = next((i for i, (a, b) in enumerate(zip(float_tokens, int8_tokens)) if a != b), NEW_TOKENS)
    shape = list(exact.embeddings.shape)
    emit(BENCH, f"{family}: int8 bytes per image ÷ float16", ratio, "ratio", shape=shape)
    emit(BENCH, f"{family}: worst row cosine, int8 vs float32", cosine, "cosine", shape=shape, target=">= 0.999", met=cosine >= 0.999)
    emit(BENCH, f"{family}: prompt logits, largest |int8 − float32|", logits_diff, "logit",
         logits_max_abs=reference.abs().max().item(), prompt_tokens=len(ids))
    emit(BENCH, f"{family}: greedy tokens equal before the first difference", agree, f"of {NEW_TOKENS} tokens",
         same_tokens=sum(a == b for a, b in zip(float_tokens, int8_tokens)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "bench-small"], default="tiny")
    args = parse_args(parser, quick={})
    llava_7b = EmbeddingContainer(id="7b", model="m", tenant="t", first_token_id=EMBEDDING_INDEX_BASE, num_tokens=576,
                                  embeddings=torch.randn(576, 4096, dtype=torch.float16))
    ratio = len(encode_container(stored_as(llava_7b, "int8"))) / len(encode_container(llava_7b))
    emit(BENCH, "LLaVA-1.5-7B image (576 × 4096): int8 bytes ÷ float16", ratio, "ratio", target="<= 0.51", met=ratio <= 0.51)
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            path = Path(tmp) / family
            if args.size == "tiny":
                tiny_checkpoint(family).write(path)
                image_size = (64, 48)
            else:
                write_bench_small(path, family)
                image_size = BENCH_SMALL[family].image
            measure(family, path, image_size)


if __name__ == "__main__":
    main()
