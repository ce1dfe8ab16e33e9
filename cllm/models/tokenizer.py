"""Train the built-in teacher's tokenizer on task text with the `tokenizers` library.

Words (with their leading space) become single BPE tokens, so the template wording of an answer is
short and cheap to learn; every digit is its own token, so the model does arithmetic over ten
symbols instead of memorising multi-digit tokens. Every printable ASCII character is in the
alphabet, so text outside the task still encodes (character by character) instead of to <unk>.
Spaces are stored as "▁" and decoding is lossless: decode(encode(text)) == text.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

SPACE = "\u2581"  # "▁", as in SentencePiece
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
# A piece is: GSM8K's "####" answer marker, a word with an optional leading space, one other symbol
# with an optional leading space, a single digit, a lone space (before a number), or one whitespace.
PIECE = rf"####|{SPACE}?[A-Za-z]+|{SPACE}?[^A-Za-z0-9\s{SPACE}]|[0-9]|{SPACE}|\s"


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> Tokenizer:
    """A BPE tokenizer trained on `texts` (merges never cross a piece boundary)."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE), behavior="isolated")
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.Fuse()])
    alphabet = list(string.printable.replace(" ", SPACE).replace("\x0b", "").replace("\x0c", ""))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=alphabet,
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # Like Llama's tokenizers, start every encoded text with <s> (targets opt out with
    # add_special_tokens=False).
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    return tokenizer


def wrap_tokenizer(tokenizer: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    """The `transformers` view of the tokenizer: special tokens named, left padding for generation."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def train_tokenizer(
    texts: Iterable[str], output_dir: str | Path, *, vocab_size: int = 512, model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    """Train on `texts`, save the tokenizer files into `output_dir`, and return the HF tokenizer."""
    hf_tokenizer = wrap_tokenizer(build_tokenizer(texts, vocab_size), model_max_length)
    hf_tokenizer.save_pretrained(str(output_dir))
    return hf_tokenizer
