"""Tokenizers: a character-level one built in code (tiny models, tests, quickstart) or a local HF one.

The char tokenizer has 104 tokens: ``<pad>=0 <bos>=1 <eos>=2 <unk>=3`` then ``string.printable``,
one token per character, so token count == character count and decoding is exact. Encoding adds
``<bos>`` in front. It is a real ``PreTrainedTokenizerFast`` (save_pretrained / from_pretrained
round-trip), so an engine or trainer loads it from a model directory like any HF tokenizer.
"""

from __future__ import annotations

import string
from functools import lru_cache

from areal_like.config import ModelConfig

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
CHAR_VOCAB = SPECIAL + list(string.printable)  # 4 + 100 = 104


@lru_cache(maxsize=1)
def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(CHAR_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()  # decode without inserting spaces
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                 unk_token="<unk>")
    hf.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant: {% endif %}")
    return hf


def load_tokenizer(model: ModelConfig):
    """The tokenizer of ``model``: from its local directory when it has one, else the char tokenizer."""
    from pathlib import Path

    if model.path and (Path(model.path) / "tokenizer.json").is_file() or (
            model.path and (Path(model.path) / "tokenizer_config.json").is_file()):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model.path)
    if model.vocab_size < len(CHAR_VOCAB):
        raise ValueError(f"model.vocab_size={model.vocab_size} is smaller than the char tokenizer ({len(CHAR_VOCAB)})")
    return char_tokenizer()
