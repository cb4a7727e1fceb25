"""The demo tokenizer: byte-level BPE trained on a few sentences, so nothing is downloaded."""

from __future__ import annotations

from tokenizers import Tokenizer

CORPUS = (
    "A photo of a cat sitting on a red sofa next to a window.",
    "Describe this image in one sentence. What do you see?",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "USER: ASSISTANT: a dog, a bird, a car, a tree, a house, the sky is blue.",
    "Émile a vu un château près de la forêt — très beau! 猫と犬 😀",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation: , . ; : ! ? ( ) [ ] { }",
)


def build_tokenizer(special_tokens: tuple[str, ...], corpus: tuple[str, ...] = CORPUS, bos_token: str | None = None,
                    vocab_size: int = 400) -> Tokenizer:
    """A byte-level BPE tokenizer with `special_tokens` as IDs 0, 1, … in order, trained on `corpus`; its
    post-processor adds `bos_token` in front when given (Qwen's has none)."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) * 4, trainer)
    if bos_token is not None:
        bos = tok.token_to_id(bos_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos)]
        )
    return tok
