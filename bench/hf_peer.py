"""HF transformers (PyTorch) on the same weights: the reference for tests and the peer for benchmarks.

Only this module and the tests import torch; the product path never does. transformers loads a
GGUF through its own dequantizer (`gguf_file=`) and a checkpoint folder as usual, so the
reference never shares our loading code.
"""

from __future__ import annotations

import os
import time


def load_hf_model(source: str, dtype: str = "float32"):
    """An `AutoModelForCausalLM` in eval mode for a .gguf file or an HF folder, on the GPU
    if PyTorch sees one; `dtype` (float32, bfloat16, float16) is torch's storage and compute dtype."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(os.cpu_count() or 1)
    torch_dtype = getattr(torch, dtype)
    if os.path.isdir(source):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(source), gguf_file=os.path.basename(source), dtype=torch_dtype)
    # The peer runs where PyTorch runs best: on the GPU when there is one (never on this project's
    # CPU machines, whose torch is the CPU build).
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def hf_greedy(model, prompts: list[list[int]], new_tokens: int, stop_on_eos: bool = False) -> list[list[int]]:
    """Greedy `generate` from equal-length prompts; returns only the new ids per prompt."""
    import torch

    ids = torch.tensor(prompts, dtype=torch.long, device=model.device)
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None)
    if not stop_on_eos:
        kwargs.update(min_new_tokens=new_tokens, eos_token_id=None)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pad_token_id=model.config.eos_token_id if not stop_on_eos else None, **kwargs)
    return out[:, ids.shape[1]:].tolist()


def hf_logits(model, prompt: list[int]):
    """float32 numpy logits [T, V] of a full forward over one prompt."""
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([prompt], device=model.device)).logits[0].float().cpu().numpy()


def hf_decode_seconds(model, prompts: list[list[int]], steps: int) -> float:
    """Seconds HF `generate` spends on `steps` decode steps, prefill excluded.

    Timed as generate(steps + 1 tokens) minus generate(1 token): both include the same prefill,
    so the difference is `steps` decode steps, what our decoder's tok/s also counts.
    """
    t0 = time.perf_counter()
    hf_greedy(model, prompts, 1)  # returns host lists: the GPU work is finished
    t1 = time.perf_counter()
    hf_greedy(model, prompts, steps + 1)
    t2 = time.perf_counter()
    return max((t2 - t1) - (t1 - t0), 1e-9)


def hf_prefill(model, prompt: list[int]):
    """HF's prefill of one prompt: (last-token logits [V], keys and values as L arrays [K, T, H])."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt], device=model.device), use_cache=True)
    layers = out.past_key_values.layers
    return (out.logits[0, -1].float().cpu().numpy(), [layer.keys[0].float().cpu().numpy() for layer in layers],
            [layer.values[0].float().cpu().numpy() for layer in layers])
