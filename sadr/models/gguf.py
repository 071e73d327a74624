"""A GGUF file (local, or fetched into the hub cache) unpacked once into a model folder in the cache, which later
runs load in a fraction of a second.

transformers reads a GGUF file slowly: it parses the file's metadata, the whole vocabulary included, once for the
config, once for the weights and once for the tokenizer, and rebuilds its tensor-name map for every tensor. That
takes about 15 s for the 135M-parameter offline default on 2 CPU cores, against 0.2 s for the same weights from a
saved folder. The folder holds what loading the file gives (its weights unpacked, in the run's dtype, and its
tokenizer), so a run on it computes what a run on the file does. It is keyed by the file's content, the dtype and
the versions of the packages that unpack it: transformers, and gguf, whose code dequantises the tensors.
"""
from __future__ import annotations

import logging
from importlib.metadata import version
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from sadr.cache import file_sha256, lock_for
from sadr.models.fingerprint import cache_key
from sadr.models.saving import write_model_folder

log = logging.getLogger(__name__)


def dense_gguf_options(gguf_name: str) -> dict:
    """`from_pretrained` options that load a GGUF file's weights unpacked into a plain model, whose weights the
    editors write and `save_pretrained` saves. Without `dequantize`, transformers marks the model as GGUF-quantized
    (and refuses to save it), and keeps the weights packed where it has a kernel for the file's architecture."""
    return {"gguf_file": gguf_name, "quantization_config": GgufConfig(dequantize=True)}


def unpacking_versions() -> dict[str, str]:
    return {package: version(package) for package in ("transformers", "gguf")}


def unpacked_gguf(path: Path, dtype: torch.dtype, cache_dir: str | Path) -> Path:
    """The model folder of the GGUF file at `path` loaded in `dtype`, written into `cache_dir` on first use (one job
    writes it while the others wait; it appears whole or not at all)."""
    key = cache_key(kind="gguf-unpacked", file=file_sha256(path), dtype=str(dtype), **unpacking_versions())
    folder = Path(cache_dir) / "models" / "unpacked" / f"{path.stem}.{key}"
    with lock_for(folder):
        if not (folder / "config.json").is_file():
            _unpack(path, dtype, folder)
    return folder


def _unpack(path: Path, dtype: torch.dtype, folder: Path) -> None:
    log.info("unpacking %s into %s, once: later runs load that folder", path, folder)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **dense_gguf_options(path.name))
    write_model_folder(model, tokenizer, folder)
    size = sum(file.stat().st_size for file in folder.iterdir())
    log.info("unpacked %s: %.2f GB in %s (delete the folder to reclaim the space)", path.name, size / 1e9, folder)
