"""Files computed once and shared by every run and every concurrent job: templates, statistics, scores, projections.

Three guarantees, whatever the number of jobs started at once on an empty cache:
- **computed once**: the first job to need an entry computes it while holding a file lock (`filelock`, an OS
  lock, so the lock of a job that crashed is released with its process); the others wait, then load it;
- **never half-read**: an entry is written to a temporary file in the same folder and renamed into place;
- **damage is repaired**: an entry that cannot be read (a copy cut short, a full disk) or whose content fails its
  CRC-32 (a changed byte) is named in a warning, removed and computed again.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from filelock import FileLock

from sadr.errors import InvalidSettingError

log = logging.getLogger(__name__)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's content, read 8 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()


def writable_dir(path: str | Path, setting: str, override: str | None = None) -> Path:
    """`path` as a folder this process can write in, made if missing; else a one-line error naming `setting` and the
    override that sets it (`setting` itself by default)."""
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise InvalidSettingError(f"cannot write in {folder} ({setting}): {err.strerror or err}; set "
                                  f"{override or setting}=<a folder this user can write in>") from err
    return folder


@dataclass(frozen=True)
class EntryFormat:
    """How one kind of entry is written and read back."""

    save: Callable[[Any, Path], None]
    load: Callable[[Path], Any]
    suffix: str  # of an entry's file name


def _save_json(value, path: Path) -> None:
    """`value` with the CRC-32 of its JSON text: a changed digit still parses, so parsing alone would not find it."""
    text = json.dumps(value, ensure_ascii=False)
    path.write_text(json.dumps({"crc32": zlib.crc32(text.encode()), "value": value}, ensure_ascii=False), encoding="utf-8")


def _load_json(path: Path):
    """What `_save_json` wrote, after checking its CRC-32 (JSON text written again from what it parses to is the same
    text: Python's floats and key order survive the round trip)."""
    entry = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(entry, dict) or entry.keys() != {"crc32", "value"}:
        raise ValueError("no CRC-32 beside its value (written by an older sadr, or not a cache entry)")
    if zlib.crc32(json.dumps(entry["value"], ensure_ascii=False).encode()) != entry["crc32"]:
        raise ValueError("its value does not match its CRC-32")
    return entry["value"]


def _load_torch(path: Path):
    """A torch.save file, into host memory (an entry written from a GPU must load on a machine without one), after
    checking the CRC-32 that torch.save writes for each of its records: torch.load does not, so a changed byte (a bad
    copy, bit rot) would load silently. The check reads the file once more, about 0.5 s per GB."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except zipfile.BadZipFile as err:
        raise ValueError(f"not a whole torch.save file ({err})") from err
    if damaged is not None:
        raise ValueError(f"the content of its record {damaged} does not match its CRC-32")
    return torch.load(path, weights_only=True, map_location="cpu")


# JSON entries have a name of their own since they carry a CRC-32: sadr before 2026-12-06 wrote bare JSON values under
# `<key>.json`, and, sharing a cache with this one, would read the wrapper as the value.
JSON = EntryFormat(_save_json, _load_json, ".crc.json")
TORCH = EntryFormat(lambda value, path: torch.save(value, path), _load_torch, ".pt")


def lock_for(path: Path) -> FileLock:
    """The lock guarding `path` (or a group of entries computed together, named by `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock")


@functools.cache
def new_file_mode() -> int:
    """The mode an ordinary new file gets under this process's umask (mkstemp's own is owner-only). Read once, from
    /proc where it can be: otherwise reading the umask means setting it for a moment."""
    try:
        status = Path("/proc/self/status").read_text()
        umask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def write_atomically(value, path: Path, fmt: EntryFormat) -> None:
    """`value` written to a temporary file beside `path`, then renamed onto it: `path` is whole or absent. The entry
    gets the mode any new file gets, so a cache shared by a group stays readable to it.

    Callers hold the entry's lock, so another temporary file of the same entry is what a killed writer left (as large
    as the entry: gigabytes for a big model's statistics), and is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{glob.escape(path.name)}.*.tmp"):
        log.info("removing %s, left by a writer that was killed", stale)
        stale.unlink(missing_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(handle)
    os.chmod(temporary, new_file_mode())
    try:
        fmt.save(value, Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_entry(path: Path, fmt: EntryFormat):
    """The entry at `path`, or None when there is none or it is damaged (then it is removed, with a warning)."""
    if not path.is_file():
        return None
    try:
        return fmt.load(path)
    except PermissionError as err:  # not damaged: another user's entry, to be left alone
        raise InvalidSettingError(f"cannot read the cache entry {path} ({err.strerror}): this user may not read it (another "
                                  "user's?); make it readable, or set cache_dir=<a folder of your own>") from err
    except Exception as err:  # a damaged file raises whatever its reader raises
        log.warning("cache entry %s is damaged (%s: %s); removing it and computing it again", path,
                    type(err).__name__, err)
        path.unlink(missing_ok=True)
        return None


def cached(path: Path, compute: Callable[[], Any], fmt: EntryFormat = JSON):
    """The entry at `path`: read, or computed once across processes and written atomically."""
    value = read_entry(path, fmt)
    if value is not None:
        return value
    with lock_for(path):
        value = read_entry(path, fmt)  # another job may have written it while this one waited
        if value is None:
            value = compute()
            write_atomically(value, path, fmt)
    return value
