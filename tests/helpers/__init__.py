"""Shared test helpers, imported by test files (never collected: pytest collects `test_*.py` only).

- `hf_checkpoints`: random-weight Llama-3, Qwen2 and Mistral folders written by transformers.
- `hf_reference`: HF transformers as the reference: its greedy tokens and logits on one torch
  thread, the token and logit comparisons, and their tolerances.
- `cli_runner`: `wafer` in-process (`run_cli`) and the one-line error check.
- `kv_fixtures`: the KV handoff tests' tiny model, prompts and busy decode batch.
- `workers`: scripts the multi-process tests launch by path, and their environment.

Keep this package light to import: worker scripts import it before their JAX setup.
"""
