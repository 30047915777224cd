"""Tokenizer stage: loading, training and fertility of byte-level BPE tokenizers."""
