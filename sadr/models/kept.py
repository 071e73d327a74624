"""The jobs of a Hydra sweep that run one after another in one process (the basic launcher) load a model once.

The last loaded model is kept with its fingerprint. A later job asking for the same model (source, its files' inodes,
sizes and times, revision, family, device, dtype) gets it back if its weights still have that fingerprint
(every protocol restores them bit for bit), and a fresh load otherwise. Asking for another model releases the
kept one first, so two models never hold memory at once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sadr.models.devices import release_unused_memory
from sadr.models.fingerprint import model_fingerprint
from sadr.models.loading import LoadedModel, load_model

log = logging.getLogger(__name__)


@dataclass
class _Kept:
    request: tuple
    loaded: LoadedModel
    fingerprint: str


_kept: _Kept | None = None


def _files_stamp(source: str) -> tuple | None:
    """Each file of a local model with its inode, size, modification and status-change times (None for a hub id or an
    embedded model). The status-change time moves with every write and cannot be set back, so a file copied in with
    its old modification time kept (`cp -p`, `rsync -t`) still counts as changed."""
    path = Path(source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file())
    else:
        return None
    stats = [(f.name, f.stat()) for f in files]
    return tuple((name, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for name, s in stats)


def load_model_kept(source: str, **options) -> tuple[LoadedModel, str]:
    """`load_model(source, **options)` and the model's fingerprint, reusing the kept model where it is the same."""
    global _kept
    request = (source, _files_stamp(source), *sorted(options.items()))
    if _kept is not None and _kept.request == request:
        if model_fingerprint(_kept.loaded.model) == _kept.fingerprint:
            log.info("using the model already loaded in this process (%s)", _kept.loaded.resolved_source)
            release_unused_memory()  # what the previous job held (its statistics on the GPU, say), before this job takes more
            return _kept.loaded, _kept.fingerprint
        log.warning("the weights of the model kept in this process changed since it was loaded; loading it again")
    release_kept_model()
    loaded = load_model(source, **options)
    _kept = _Kept(request, loaded, model_fingerprint(loaded.model))
    return loaded, _kept.fingerprint


def release_kept_model() -> None:
    """Drop the kept model and return its memory (and anything else unreferenced) to the device."""
    global _kept
    _kept = None
    release_unused_memory()
