"""What a family module declares, and how a checkpoint is assembled from it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vlmq.demo_model.checkpoint import TinyCheckpoint
from vlmq.demo_model.tensors import Shapes
from vlmq.demo_model.tokenizer import CORPUS, build_tokenizer


@dataclass(frozen=True)
class Family:
    """One model family's tiny checkpoint in parts; each family module fills one in.

    `configs(ids, vocab_size, vision, text, **options)` gives config.json and the processor's JSON files
    from the special tokens' IDs, the tokenizer's size and the overrides of the vision and text configs.
    """

    special_tokens: tuple[str, ...]  # trained into the tokenizer first: IDs 0, 1, … in this order
    roles: dict[str, str]  # tokenizer_config.json's named tokens: bos_token, eos_token, image_token, …
    stop_tokens: tuple[str, ...]  # generation_config.json's eos_token_id
    chat_template: str
    configs: Callable[..., dict[str, dict]]
    tensors: Callable[[dict], Shapes]  # config.json → every weight's shape
    corpus: tuple[str, ...] = CORPUS
    offset_norms: tuple[str, ...] = ()  # name prefixes under which norms scale by 1 + weight (Gemma's)

    def checkpoint(self, vision: dict | None = None, text: dict | None = None, **options) -> TinyCheckpoint:
        """This family's checkpoint: tiny, or bigger where `vision` and `text` override fields of its configs.

        A `vocab_size` above the demo tokenizer's pads the embedding table: the tokenizer never produces
        those IDs and decoding skips them, but the LM pays for a full-size vocabulary.
        """
        tok = build_tokenizer(self.special_tokens, self.corpus, self.roles.get("bos_token"))
        ids = {name: tok.token_to_id(name) for name in self.special_tokens}
        files = self.configs(ids, tok.get_vocab_size(), vision or {}, text or {}, **options)
        text_config = files["config.json"]["text_config"]
        if text_config["vocab_size"] < tok.get_vocab_size():
            raise ValueError(f"vocab_size {text_config['vocab_size']} is below the demo tokenizer's {tok.get_vocab_size()}")
        stops = [ids[name] for name in self.stop_tokens]
        files |= {
            "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", **self.roles,
                                      "model_max_length": text_config["max_position_embeddings"]},
            "generation_config.json": {"bos_token_id": text_config["bos_token_id"], "eos_token_id": stops[0] if len(stops) == 1 else stops,
                                       "pad_token_id": text_config["pad_token_id"]},
        }
        return TinyCheckpoint(tok, self.chat_template, files, self.tensors(files["config.json"]), self.offset_norms)


def lm_config(defaults: dict, overrides: dict) -> dict:
    """`defaults` with `overrides`, and head_dim = hidden_size / num_attention_heads unless given."""
    text = defaults | overrides
    text.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
    return text
