"""Evaluation: Shapes prompt-following accuracy and FID/KID."""
