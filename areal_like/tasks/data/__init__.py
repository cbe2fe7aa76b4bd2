"""Data shipped with the package: the BPE tokenizer's training text and the math_chat example
dataset."""
