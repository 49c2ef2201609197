"""One entry point for every model source, with an on-disk cache of converted weights.

Converting SmolLM2's GGUF (dequantize, un-permute, fuse) takes seconds of numpy work; the
converted float32 weights are cached as a safetensors file keyed by the source's path, size and
modification time and by this converter's version, so a changed source or converter is never
served stale. The config and tokenizer ride in the same file's metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile

from mesh.errors import WaferError
from model.config import EMBEDDED_MODELS, ModelConfig, RopeScaling, preset
from model.dtypes import cast_params, resolve_dtype
from model.tokenizer import TextTokenizer, tokenizer_from_gguf_fields, tokenizer_from_hf_folder
from model.weights import Params, flatten_params, params_from_hf_state, unflatten_params

# Bump when the conversion changes what lands in the cache.
CONVERTER_VERSION = 1


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    params: Params  # jax arrays
    tokenizer: TextTokenizer | None
    source: str  # the file or folder the weights came from


def cache_dir() -> str:
    return os.environ.get("WAFER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "wafer")


def resolve_source(model: str | None = None, checkpoint: str | None = None) -> str:
    """The path to load: an explicit checkpoint, or the file behind an embedded preset."""
    if checkpoint is not None:
        if not os.path.exists(checkpoint):
            raise WaferError(f"checkpoint not found: {checkpoint}")
        return checkpoint
    name = model or EMBEDDED_MODELS[0]
    preset(name)  # unknown names fail here with the list of known presets
    if name not in EMBEDDED_MODELS:
        raise WaferError(f"preset {name!r} has no embedded weights (shapes only); "
                         f"pass --checkpoint PATH or use {', '.join(EMBEDDED_MODELS)}")
    from model.gguf_loader import smollm2_gguf_path
    return smollm2_gguf_path()


def load_model(model: str | None = None, checkpoint: str | None = None, use_cache: bool = True,
               dtype: str | None = None) -> LoadedModel:
    """Load weights, config and tokenizer from a preset name or a checkpoint path.

    `dtype` (float32, bfloat16, float16; None: the backend's default, see model/dtypes.py) is the
    storage of the weights, and through them of the activations and KV caches made from them.
    The on-disk cache stays float32: one entry serves every dtype.
    """
    source = resolve_source(model, checkpoint)
    loaded = _load_converted(source, use_cache, resolve_dtype(dtype))
    if checkpoint is None:  # an embedded preset: report it under the preset's name
        loaded.config = dataclasses.replace(loaded.config, name=model or EMBEDDED_MODELS[0])
    return loaded


def _load_converted(source: str, use_cache: bool, dtype) -> LoadedModel:
    cached = os.path.join(cache_dir(), f"{_cache_key(source)}.safetensors")
    if use_cache and os.path.exists(cached):
        loaded = _read_cache(cached, source, dtype)
        if loaded is not None:
            return loaded
    config, tensors, tokenizer = read_source(source)
    params = params_from_hf_state(config, tensors.get)
    if use_cache:
        _write_cache(cached, config, params, tokenizer)
    return LoadedModel(config, cast_params(params, dtype), tokenizer, source)


def read_source(source: str):
    """(config, HF-named tensors, tokenizer) from a .gguf file or an HF folder."""
    if os.path.isdir(source):
        from model.hf_checkpoint import read_hf_checkpoint
        return read_hf_checkpoint(source)
    from model.gguf_loader import read_gguf
    return read_gguf(source)


def _cache_key(source: str) -> str:
    paths = [source]
    if os.path.isdir(source):
        paths = sorted(os.path.join(source, f) for f in os.listdir(source))
    h = hashlib.sha256(f"v{CONVERTER_VERSION}".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def config_to_json(config: ModelConfig) -> str:
    d = dataclasses.asdict(config)
    d["rope_scaling"] = config.rope_scaling.value
    d["eos_token_ids"] = list(config.eos_token_ids)
    return json.dumps(d)


def config_from_json(text: str) -> ModelConfig:
    d = json.loads(text)
    d["rope_scaling"] = RopeScaling(d["rope_scaling"])
    d["eos_token_ids"] = tuple(d["eos_token_ids"])
    return ModelConfig(**d)


def _write_cache(path: str, config: ModelConfig, params: Params, tokenizer: TextTokenizer | None) -> None:
    from safetensors.numpy import save_file

    meta = {"config": config_to_json(config), "tokenizer": tokenizer.to_json() if tokenizer else ""}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Write then rename: a crash mid-write never leaves a truncated cache entry behind.
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        os.close(fd)
        save_file(flatten_params(params), tmp, metadata=meta)
        os.replace(tmp, path)
    except OSError:
        # An unwritable cache only costs the next load its conversion time.
        if "tmp" in locals() and os.path.exists(tmp):
            os.remove(tmp)


def _read_cache(path: str, source: str, dtype) -> LoadedModel | None:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata()
            config = config_from_json(meta["config"])
            flat = {name: f.get_tensor(name) for name in f.keys()}
        tokenizer = TextTokenizer.from_json(meta["tokenizer"]) if meta.get("tokenizer") else None
    except Exception:  # a damaged cache entry is rebuilt from the source, never trusted
        return None
    params = unflatten_params(flat, config.n_layers)
    return LoadedModel(config, cast_params(params, dtype), tokenizer, source)


def load_tokenizer(model: str | None = None, checkpoint: str | None = None) -> TextTokenizer | None:
    """The tokenizer alone (None when the source ships none), without converting any weights.

    A GGUF file's tokenizer takes seconds to read (the reader parses the whole file's metadata), so
    it is kept in the cache folder next to the converted weights, under the same key.
    """
    source = resolve_source(model, checkpoint)
    if os.path.isdir(source):
        return tokenizer_from_hf_folder(source)
    cached = os.path.join(cache_dir(), f"{_cache_key(source)}.tokenizer.json")
    try:
        with open(cached) as f:
            return TextTokenizer.from_json(f.read())
    except Exception:  # absent or damaged (tokenizers raises a bare Exception): read the source
        pass
    import gguf  # imported here: only GGUF sources need it

    try:
        reader = gguf.GGUFReader(source)
    except Exception as e:  # the gguf package raises ValueError/struct errors on bad bytes
        raise WaferError(f"{source}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tokenizer = tokenizer_from_gguf_fields(fields)
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cached), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(tokenizer.to_json())
        os.replace(tmp, cached)
    except OSError:  # an unwritable cache only costs the next start its read
        if "tmp" in locals() and os.path.exists(tmp):
            os.remove(tmp)
    return tokenizer
