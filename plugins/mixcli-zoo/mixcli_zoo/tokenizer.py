"""Character-level tokenizer built locally (no hub download)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """One token per character of ``alphabet`` (duplicates dropped, order kept).

    Ids 0-3 are <pad>, <s>, </s>, <unk>; characters follow in alphabet order, so the
    same alphabet always gives the same ids. ``encode`` prepends <s> (no </s>), which
    suits prompting a causal LM; training code appends the eos id itself.
    """
    chars = list(dict.fromkeys(alphabet))
    for c in chars:
        if c in SPECIALS:
            raise ValueError(f"alphabet character {c!r} collides with a special token")
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for c in chars:
        vocab[c] = len(vocab)
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    # Split("") isolates every character, spaces included, so nothing is normalised away.
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",  # left padding so batched greedy generation lines up
        clean_up_tokenization_spaces=False,
    )
    return fast
