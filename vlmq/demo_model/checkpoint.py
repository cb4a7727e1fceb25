"""A tiny checkpoint's folder, as data, and writing it with random weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from vlmq.demo_model.tensors import Shapes

# Norms whose weights start at identity, as trained models' roughly are.
NORM_SUFFIXES = ("norm.weight", "norm1.weight", "norm2.weight", "layrnorm.weight", "ln_q.weight", "ln_pre.weight")


@dataclass(frozen=True)
class TinyCheckpoint:
    """Everything in a tiny checkpoint's folder but the weights' values: `write` gives them random values
    (the demo, the benchmarks); the tests let `transformers` make them and add the rest with `write_files`."""

    tokenizer: Tokenizer
    chat_template: str
    files: dict[str, dict]  # the JSON files by name: config.json, tokenizer_config.json, preprocessor_config.json, …
    tensors: Shapes  # every weight's shape, named as transformers saves them
    offset_norms: tuple[str, ...] = ()  # name prefixes under which norms scale by 1 + weight (Gemma's)

    @property
    def config(self) -> dict:
        return self.files["config.json"]

    def write_files(self, path: str | Path, skip: tuple[str, ...] = ()) -> Path:
        """The tokenizer, chat template and JSON files (but those named in `skip`) into the folder `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path / "tokenizer.json"))
        (path / "chat_template.jinja").write_text(self.chat_template)
        for name, content in self.files.items():
            if name not in skip:
                (path / name).write_text(json.dumps(content, indent=2) + "\n")
        return path

    def write(self, path: str | Path, seed: int = 0, weight_std: float = 0.2) -> Path:
        """The whole checkpoint with random weights: normal(0, `weight_std`) matrices (std 1 for embeddings),
        zero biases, identity norms. 0.2 makes a tiny model's greedy decoding decisive; bigger ones want
        transformers' 0.02, which keeps activations in range over many layers."""
        path = self.write_files(path)
        generator = torch.Generator().manual_seed(seed)
        weights = {}
        for name, shape in self.tensors.items():
            if name.endswith(NORM_SUFFIXES):
                weights[name] = torch.full(shape, 0.0 if name.startswith(self.offset_norms) else 1.0)
            elif name.endswith(".bias"):
                weights[name] = torch.zeros(shape)
            else:
                weights[name] = torch.randn(shape, generator=generator) * (1.0 if "embed" in name else weight_std)
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        return path
