"""Shared fixtures: the embedded model and its HF reference (loaded once per session), and a tiny
HF checkpoint folder. Helpers that tests import by name live in `tests.helpers`."""

import os

import pytest

from mesh.devices import ensure_cpu_devices

# Tests never write into the user's cache: each session gets its own weight cache folder.
os.environ.setdefault("WAFER_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "wafer"))
# Tests build many decoders and generators of the same shapes, each compiling its programs anew
# (and subprocesses compile what this process already did): XLA's persistent cache, in the folder
# the serve workers already use, turns every compilation after the first of a program into a load.
# Every program, however quick to compile (JAX's default caches only those over 1 s). Set in the
# environment, before JAX starts, so the subprocesses that tests launch share it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["WAFER_CACHE_DIR"], "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# Real 2D meshes need real devices: 16 emulated CPU devices (up to a 4x4 mesh), set before JAX
# starts. Larger meshes run in subprocesses (the stress test) or on the vcores executor.
TEST_CPU_DEVICES = 16
ensure_cpu_devices(TEST_CPU_DEVICES)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct as a `LoadedModel`."""
    from model.load import load_model
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2):
    """HF transformers' own load of the same GGUF file (float32, eval mode)."""
    from bench.hf_peer import load_hf_model
    return load_hf_model(smollm2.source)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random Llama written by transformers: TINY_LLAMA's shapes, untied head, 256 positions."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=160, max_position_embeddings=256,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly, with the reason, on machines without an NVIDIA GPU."""
    import jax
    try:
        has_gpu = bool(jax.devices("gpu"))
    except RuntimeError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none visible to JAX)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
