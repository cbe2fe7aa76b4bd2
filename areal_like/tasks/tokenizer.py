"""Tokenizers: built in code for models built from config (``char``, ``bpe``:
areal_like/tasks/TASKS.md), or a local HF one. Importing this module imports neither torch nor
transformers.
"""

from __future__ import annotations

import string
from functools import lru_cache
from pathlib import Path

from areal_like.settings.config import ConfigError, ModelConfig

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
CHAR_VOCAB = SPECIAL + list(string.printable)  # 4 + 100 = 104

CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"
BPE_SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2; eos = <|im_end|>
BPE_MIN_VOCAB = 256 + len(BPE_SPECIAL)  # the byte alphabet + the special tokens
# Qwen2's pre-tokenizer: words, single digits, punctuation runs, newlines, spaces
BPE_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@lru_cache(maxsize=1)
def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # byte-level spelling (" " as "Ġ"): Qwen2Tokenizer, on a reload, puts its own byte-level
    # pre-tokenizer in front and would drop plain " " and "\n" entries
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab = {(t if t in SPECIAL else byte_level.pre_tokenize_str(t)[0][0]): i
             for i, t in enumerate(CHAR_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("."), behavior="isolated"),
        byte_level])  # one token per (ASCII) character
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", BOS_ID)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                 eos_token="<eos>", unk_token="<unk>")
    hf.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant: {% endif %}")
    return hf


@lru_cache(maxsize=4)
def bpe_tokenizer(vocab_size: int = 512):
    """Byte-level BPE with at most ``vocab_size`` entries, trained on ``data/corpus.txt``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < BPE_MIN_VOCAB:
        raise ConfigError(f"model.vocab_size={vocab_size} is too small for model.tokenizer=bpe: "
                          f"it needs at least {BPE_MIN_VOCAB} (256 bytes + {len(BPE_SPECIAL)} "
                          "special tokens), e.g. 512")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(BPE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BPE_SPECIAL,
                                  min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train([str(CORPUS)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   chat_template=CHATML)


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def load_tokenizer(model: ModelConfig):
    """The tokenizer of ``model``: from ``model.path`` when it holds one, else
    ``model.tokenizer``; for a model built from config, no larger than ``model.vocab_size`` (a
    ``model.path``'s embedding is its config.json's, which the preflight compares)."""
    if model.path and _has_tokenizer(Path(model.path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model.path)
    if model.tokenizer == "char":
        tok = char_tokenizer()
    elif model.tokenizer == "bpe":
        tok = bpe_tokenizer(model.vocab_size)
    elif _has_tokenizer(Path(model.tokenizer).expanduser()):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(Path(model.tokenizer).expanduser()))
    else:
        raise ConfigError(f"model.tokenizer={model.tokenizer!r} is not 'char', 'bpe' or a local "
                          "directory holding a tokenizer (tokenizer.json or tokenizer_config.json)")
    if not model.path and len(tok) > model.vocab_size:  # model.path: launch/preflight.py checks
        raise ConfigError(f"model.vocab_size={model.vocab_size} is smaller than the tokenizer "
                          f"(model.tokenizer={model.tokenizer!r}: {len(tok)} tokens)")
    return tok
