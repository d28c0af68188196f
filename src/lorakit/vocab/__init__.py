"""Tokenizer vocabulary tools: SentencePiece training, merging into a base tokenizer, statistics."""
