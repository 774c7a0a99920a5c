"""Frozen text encoders (T5, MiniLM, a hash encoder for tests) and the on-disk embedding cache."""
