"""Configs, weights, loaders, tokenizer, the single-device reference decoder."""
