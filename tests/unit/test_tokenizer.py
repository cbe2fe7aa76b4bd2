"""The BPE tokenizer built from the shipped corpus, load_tokenizer's choices, and the model's token
ids."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from areal_like.settings.config import ConfigError, ModelConfig
from areal_like.tasks.tokenizer import BPE_MIN_VOCAB, bpe_tokenizer, char_tokenizer, load_tokenizer
from areal_like.weights.hf import qwen2_config

ROOT = Path(__file__).resolve().parents[2]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 37 + 45?"}]
CHATML_TEXT = ("<|im_start|>system\nBe brief.<|im_end|>\n"
               "<|im_start|>user\nWhat is 37 + 45?<|im_end|>\n"
               "<|im_start|>assistant\n")


def test_bpe_build_is_deterministic_across_processes(tmp_path):
    here = tmp_path / "here"
    bpe_tokenizer(512).save_pretrained(here)
    code = ("import sys; from areal_like.tasks.tokenizer import bpe_tokenizer; "
            "bpe_tokenizer(512).save_pretrained(sys.argv[1])")
    for seed in ("1", "2"):  # a different hash seed per process: no dict-order dependence
        there = tmp_path / f"there{seed}"
        subprocess.run([sys.executable, "-c", code, str(there)], check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": seed})
        assert (there / "tokenizer.json").read_bytes() == (here / "tokenizer.json").read_bytes()
    assert bpe_tokenizer(512) is bpe_tokenizer(512)  # built once per process


def test_bpe_special_tokens_digits_and_exact_round_trip():
    tok = bpe_tokenizer(512)
    assert len(tok) <= 512
    assert ([tok.convert_ids_to_tokens(i) for i in range(3)]
            == ["<pad>", "<|im_start|>", "<|im_end|>"])
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 2, None)
    assert tok("What is 37 + 45?")["input_ids"][0] not in (0, 1, 2)  # nothing added in front
    digits = tok("1234567890", add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]) for i in digits] == list("1234567890")  # one token per digit
    text = "héllo 😀 \\frac{1}{2} = \\boxed{0.5}\n\ttabs"
    assert tok.decode(tok(text)["input_ids"]) == text  # every byte is in the alphabet
    ids = tok(CHATML_TEXT)["input_ids"]
    assert ids.count(1) == 3 and ids.count(2) == 2  # the chat markers are single tokens
    reply = tok("<|im_start|>assistant\n82<|im_end|>")["input_ids"]
    assert tok.decode(reply, skip_special_tokens=True) == "assistant\n82"
    # its chat template is ChatML
    assert tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == CHATML_TEXT
    without = tok.apply_chat_template(CHAT, add_generation_prompt=False, tokenize=False)
    assert without + "<|im_start|>assistant\n" == CHATML_TEXT
    assert (tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
            == tok(CHATML_TEXT)["input_ids"])


def test_load_tokenizer_honours_model_tokenizer_and_a_saved_bpe_keeps_ids_specials_template(
        tmp_path):
    assert load_tokenizer(ModelConfig()) is char_tokenizer()
    assert load_tokenizer(ModelConfig(tokenizer="bpe", vocab_size=600)) is bpe_tokenizer(600)
    tok = bpe_tokenizer(512)
    tok.save_pretrained(tmp_path / "tok")
    text = "What is 37 + 45? The answer is \\boxed{82}."
    for again in (load_tokenizer(ModelConfig(path=str(tmp_path / "tok"), vocab_size=512)),
                  load_tokenizer(ModelConfig(tokenizer=str(tmp_path / "tok"), vocab_size=512))):
        assert again is not tok and again.chat_template == tok.chat_template
        assert ((again.pad_token_id, again.eos_token_id, len(again))
                == (tok.pad_token_id, tok.eos_token_id, len(tok)))
        assert again(text)["input_ids"] == tok(text)["input_ids"]
        assert (again.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
                == tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False))
    for vocab in (64, BPE_MIN_VOCAB - 1):
        with pytest.raises(ConfigError,
                           match=f"model.vocab_size={vocab} .*at least {BPE_MIN_VOCAB}"):
            load_tokenizer(ModelConfig(tokenizer="bpe", vocab_size=vocab))
    with pytest.raises(ConfigError, match="model.vocab_size=300 is smaller than the tokenizer"):
        load_tokenizer(ModelConfig(tokenizer=str(tmp_path / "tok"), vocab_size=300))
    with pytest.raises(ConfigError, match="model.tokenizer='nope'"):
        load_tokenizer(ModelConfig(tokenizer="nope"))
    with pytest.raises(ConfigError, match="model.vocab_size=100 is smaller than the tokenizer"):
        load_tokenizer(ModelConfig(vocab_size=100))


def test_built_model_config_carries_the_tokenizer_ids():
    char = qwen2_config(ModelConfig())
    assert (char.bos_token_id, char.eos_token_id, char.pad_token_id) == (1, 2, 0)
    bpe = qwen2_config(ModelConfig(tokenizer="bpe", vocab_size=512))
    assert (bpe.bos_token_id, bpe.eos_token_id, bpe.pad_token_id) == (None, 2, 0)
    assert bpe.vocab_size == 512


def test_char_tokenizer_reloaded_from_a_qwen2_model_directory_keeps_whitespace(tmp_path):
    """A qwen2 config.json makes AutoTokenizer rebuild the pre-tokenizer: whitespace is kept."""
    tok = char_tokenizer()
    tok.save_pretrained(tmp_path)
    qwen2_config(ModelConfig()).save_pretrained(tmp_path)
    again = load_tokenizer(ModelConfig(path=str(tmp_path)))
    assert type(again).__name__ == "Qwen2Tokenizer"  # the class that dropped whitespace
    text = "a b\n\tc\r\x0b\x0c"
    # <bos>, then string.printable's index + 4 per character
    ids = [1, 14, 98, 15, 100, 99, 16, 101, 102, 103]
    assert tok(text)["input_ids"] == again(text)["input_ids"] == ids
    assert (tok.decode(ids, skip_special_tokens=True)
            == again.decode(ids, skip_special_tokens=True) == text)
    assert again("347 * 29 = x")["input_ids"] == tok("347 * 29 = x")["input_ids"]
    chat = [{"role": "user", "content": "a b"}]
    assert (again.apply_chat_template(chat, return_dict=False)
            == tok.apply_chat_template(chat, return_dict=False))
