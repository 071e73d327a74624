"""The one file downloader: resumable, verified, atomic (standard library only).

The body is streamed into `<dest>.part`; a `.part` left by an interrupted run is resumed with an
HTTP Range request. Only once its size and sha256 match (where known) is it renamed to `<dest>`,
so a file at `dest` is always complete and verified, and later runs use it without re-hashing.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from sadr.cache import file_sha256, lock_for
from sadr.errors import UnavailableError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_TIMEOUT_S = 60


class DownloadError(UnavailableError):
    """A file could not be fetched; the message says from where, and how to supply it by hand."""


class ChecksumError(DownloadError):
    """A fetched file has the wrong size or sha256; its partial copy has been deleted."""


# Where ROME's authors publish CounterFact, zsRE and the consistency metric's files
ROME_DATA_URL = "https://rome.baulab.info/data/dsets/"


@dataclass(frozen=True)
class RemoteFile:
    """A file at `url`, with its expected byte size and sha256 where they are known."""

    url: str
    size: int | None = None
    sha256: str | None = None

    @property
    def filename(self) -> str:
        return Path(urlparse(self.url).path).name


def download(remote: RemoteFile, directory: str | os.PathLike, hint: str = "") -> Path:
    """Return `directory/remote.filename`, fetching it first unless it is already there.

    `hint` (e.g. which config key to set for a manual copy) is appended to every error message.
    """
    dest = Path(directory) / remote.filename
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with lock_for(dest):  # one download per file across processes (e.g. the parallel shards of a sweep)
        if not dest.is_file():  # another process may have completed it while this one waited
            _download_to(remote, dest, hint)
    return dest


def _download_to(remote: RemoteFile, dest: Path, hint: str) -> None:
    part = dest.with_name(dest.name + ".part")
    try:
        _fetch(remote, part)
    except (OSError, http.client.HTTPException) as exc:
        kept = f"; the partial file {part} is kept and the next run resumes it" if part.exists() else ""
        raise DownloadError(_message(f"could not download {remote.url}: {exc}{kept}.", hint)) from exc
    _verify(remote, part, hint)
    os.replace(part, dest)
    log.info("downloaded %s to %s", remote.url, dest)


def _fetch(remote: RemoteFile, part: Path) -> None:
    have = part.stat().st_size if part.exists() else 0
    if remote.size is not None and have >= remote.size:
        return  # already complete (or too long, which _verify reports)
    headers = {"Range": f"bytes={have}-"} if have else {}
    log.info("downloading %s to %s%s", remote.url, part, f" (resuming at byte {have})" if have else "")
    try:
        response = urllib.request.urlopen(urllib.request.Request(remote.url, headers=headers), timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left after `have`: the .part already holds the whole file
            return
        raise
    with response:
        start = _first_byte(response) if response.status == 206 else 0
        if start in (0, have):
            resumed = have > 0 and start == have
            if have and not resumed:
                log.info("%s ignored the Range request; downloading from the start", remote.url)
            with open(part, "ab" if resumed else "wb") as out:
                shutil.copyfileobj(response, out, _CHUNK)
            # urllib returns a short body silently when the connection drops; Content-Length tells.
            length = response.headers.get("Content-Length")
            expected = (have if resumed else 0) + int(length) if length is not None else None
            got = part.stat().st_size
            if expected is not None and got != expected:
                raise ConnectionError(f"the connection closed after {got} of {expected} bytes")
            return
    # a piece from elsewhere in the file (Content-Range), which appended to the partial file would corrupt it
    sent = response.headers.get("Content-Range") or "no Content-Range"
    if not have:
        raise ConnectionError(f"asked for the whole file, the server sent part of it ({sent})")
    log.info("%s answered a request for the bytes from %d with %s; downloading from the start", remote.url, have, sent)
    part.unlink()
    _fetch(remote, part)


def _first_byte(response) -> int | None:
    """Where a 206 response's body starts in the file, from its Content-Range (`bytes 1000-1999/2000`)."""
    match = re.match(r"bytes\s+(\d+)-", response.headers.get("Content-Range") or "")
    return int(match[1]) if match else None


def _verify(remote: RemoteFile, part: Path, hint: str) -> None:
    size = part.stat().st_size
    if remote.size is not None and size < remote.size:
        raise DownloadError(
            _message(
                f"download of {remote.url} stopped at {size} of {remote.size} bytes; "
                f"the partial file {part} is kept and the next run resumes it.",
                hint,
            )
        )
    if remote.size is not None and size != remote.size:
        part.unlink()
        raise ChecksumError(
            _message(f"{remote.url} has {size} bytes, expected {remote.size}; the download was deleted.", hint)
        )
    if remote.sha256:
        digest = file_sha256(part)
        if digest != remote.sha256.lower():
            part.unlink()
            raise ChecksumError(
                _message(f"{remote.url} has sha256 {digest}, expected {remote.sha256}; the download was deleted.", hint)
            )


def _message(problem: str, hint: str) -> str:
    return f"{problem} {hint}".strip()
