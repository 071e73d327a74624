"""Which file a dataset is read from: `dataset.path`, else its URL downloaded into
`<cache_dir>/datasets/`, else the copy packaged with sadr."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from sadr.conf.schema import DatasetConfig
from sadr.data.download import RemoteFile, download
from sadr.data.registry import DatasetFormat
from sadr.errors import MissingInputError


def resolve_source(fmt: DatasetFormat, cfg: DatasetConfig, cache_dir: str | os.PathLike) -> Path:
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if not path.is_file():
            found = "is a directory, not a file" if path.is_dir() else "not found"
            raise MissingInputError(
                f"dataset file {found}: {path} (dataset.path). Set dataset.path=<path to the {cfg.name} JSON file>, "
                "or set dataset.path=null to use the canonical copy."
            )
        return path
    remote = _remote(fmt, cfg)
    if remote is not None:
        hint = f"To use a copy you fetched yourself, download {remote.url} and set dataset.path=/path/to/{remote.filename}."
        return download(remote, Path(cache_dir) / "datasets", hint=hint)
    return _packaged(fmt.packaged, cfg.name)


def _remote(fmt: DatasetFormat, cfg: DatasetConfig) -> RemoteFile | None:
    """The file to download: `dataset.url` or the canonical one; the canonical size/sha256 apply only to the
    canonical URL, and `dataset.size` / `dataset.sha256` override them."""
    url = cfg.url or (fmt.remote.url if fmt.remote else None)
    if url is None:
        return None
    known = fmt.remote if fmt.remote and fmt.remote.url == url else RemoteFile(url)
    return RemoteFile(url, size=cfg.size if cfg.size is not None else known.size, sha256=cfg.sha256 or known.sha256)


def _packaged(relative: str, name: str) -> Path:
    resource = importlib.resources.files("sadr.data").joinpath(relative)
    # sadr is installed as plain files, so this is the file's own path and stays valid after the `with`.
    with importlib.resources.as_file(resource) as path:
        if not path.is_file():
            raise MissingInputError(
                f"the packaged {name} dataset is missing: {path}. Reinstall sadr, "
                f"or set dataset.path=<path to the {name} JSON file>."
            )
        return path
