"""A run directory: the composed config, the environment, one JSON line per finished case, the tables.

Rows are appended and flushed as each case finishes, so an interrupted run loses nothing; re-running
with the same directory and the same config skips the finished cases.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from sadr.errors import DamagedFileError, UsageError

CONFIG_FILE, ENV_FILE, ROWS_FILE, METRICS_FILE = "config.yaml", "environment.json", "cases.jsonl", "metrics.csv"
RUN_LOCK = ".sadr-run.lock"  # held by the one invocation working in a run directory
SEQUENTIAL_STATE = "sequential_state.pt"  # the sequential protocol's checkpoint: the requests edited so far and the weights
DELTA_CHECKPOINT = "delta_checkpoint"  # the finished δs of the group being edited (sadr/editors/delta_checkpoint.py)
PACKAGES = ("sadr", "torch", "transformers", "huggingface-hub", "hydra-core", "omegaconf", "datasets", "pandas", "numpy",
            "gguf", "accelerate")


log = logging.getLogger(__name__)


class RunConflictError(UsageError):
    pass


# Where and how results are written, and where the work runs, not what the results are: a run resumes with these
# changed (after running out of GPU memory, say). CPU threads, cases side by side and fluency's texts side by side give
# the results of one at a time up to float rounding, and a run already narrows the cases itself when a group does not
# fit; C's factors are the same wherever they are kept. environment.json records the latest invocation's values.
NOT_IDENTITY = ("output_dir", "progress", "save_edited", "threads", "editor.parallel_cases", "model.stats.factor_device",
                "eval.generation_batch_size")


def _without_execution_settings(plain: dict) -> dict:
    for dotted in NOT_IDENTITY:
        *parents, key = dotted.split(".")
        node = plain
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(key, None)
    return plain


def _identity(cfg: DictConfig) -> dict:
    """The settings that determine results."""
    return _without_execution_settings(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False, enum_to_str=True))


_ABSENT = object()


def _differing(run: dict, now: dict, prefix: str = "") -> Iterator[tuple[str, object, object]]:
    """(dotted key, value in the run, value now) of each setting whose value differs, in key order."""
    for key in sorted(set(run) | set(now), key=str):
        before, after = run.get(key, _ABSENT), now.get(key, _ABSENT)
        if isinstance(before, dict) and isinstance(after, dict):
            yield from _differing(before, after, f"{prefix}{key}.")
        elif before != after:
            yield f"{prefix}{key}", before, after


def config_differences(run: dict, now: dict) -> list[str]:
    """Each setting whose value differs between a run's config and the one given now, as its dotted key and the two
    values written as an override takes them: "dataset.limit (1 in the run, 2 now)",
    "eval.metrics ([efficacy,relation] in the run, [efficacy] now)"."""
    return [f"{key} ({_as_override(before)} in the run, {_as_override(after)} now)"
            for key, before, after in _differing(run, now)]


def _as_override(value, width: int = 400) -> str:
    """`value` as a Hydra override's right-hand side (a plain word bare, other text, numbers and words such as true as
    text quoted), cut to `width`."""
    if value is _ABSENT:
        return "(absent)"
    text = _override_text(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _override_text(value) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{_override_text(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_override_text(item) for item in value) + "]"
    if isinstance(value, str):
        bare = re.fullmatch(r"[A-Za-z_][\w./+-]*", value) and value.lower() not in ("true", "false", "null", "nan", "inf")
        return value if bare else "'" + value.replace("'", "\\'") + "'"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def read_config(file: Path) -> dict:
    """A run's config.yaml as a plain dict; one that is not YAML was damaged or edited, and is named with the fix."""
    try:
        return OmegaConf.to_container(OmegaConf.load(file), resolve=False)
    except OSError:  # not the file's content: unreadable, or gone
        raise
    except Exception as err:  # whatever the YAML parser raises for what is not YAML
        raise DamagedFileError(
            f"{file} cannot be read ({' '.join(str(err).split())}); it was damaged or edited: delete it, and a rerun "
            "of the run's own command writes it again and keeps the finished cases in its cases.jsonl") from None


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _numbered_lines(file: Path) -> Iterator[tuple[int, bytes, bool]]:
    """Each line of `file` with its number (lines end as `bytes.splitlines` ends them, a lone carriage return
    included) and whether it may be cut short: only the last line of a file that does not end with a newline. Reading
    stops at that line, so that the rest of it, appended meanwhile, is not read as a line of its own."""
    number = 0
    with open(file, "rb") as f:
        for chunk in f:  # up to and with each newline; only the file's end comes without one
            whole = chunk.endswith(b"\n")
            lines = chunk.splitlines()
            for index, line in enumerate(lines, start=1):
                number += 1
                yield number, line, not whole and index == len(lines)
            if not whole:
                return


TAIL_BLOCK = 1 << 20  # bytes read at a time, from the end, to find where a file's last line begins


def _last_line_start(f, end: int) -> int:
    """The offset just after the last newline before `end` in the binary file `f`, or 0 where there is none."""
    position = end
    while position > 0:
        begin = max(0, position - TAIL_BLOCK)
        f.seek(begin)
        found = f.read(position - begin).rfind(b"\n")
        if found >= 0:
            return begin + found + 1
        position = begin
    return 0


class HeldRun(NamedTuple):
    """The run a folder holds under other settings: each setting that differs (`config_differences`) and its dotted
    key, and whether all it holds are kept δs, which may be given up."""
    differences: list[str]
    keys: list[str]
    only_deltas: bool


class RunDirectory:
    def __init__(self, path: str | Path, *, make: bool = True):
        """`make`: create the folder; a reader that must leave nothing behind (a sweep's checks) does not."""
        self.path = Path(path)
        if make:
            self.path.mkdir(parents=True, exist_ok=True)

    def claim(self, cfg: DictConfig) -> None:
        """Write config.yaml, or check that the one already there describes the same run (`held_run`)."""
        target = self.path / CONFIG_FILE
        identity = _identity(cfg)
        recorded = self._recorded_identity()
        if recorded == identity:
            return
        held = self._held_run(recorded, identity) if recorded is not None else None
        if held:
            only_deltas = (f"; or, to give up the δs it kept and start it again with these settings, delete "
                           f"{self.path / DELTA_CHECKPOINT}") if held.only_deltas else ""
            raise RunConflictError(
                f"{self.path} already holds a run with a different config (differs in: "
                f"{'; '.join(held.differences)}); resume only with identical settings (the run's values, in "
                f"{target}, also where a newer sadr changed a default), or choose a new directory with "
                f"hydra.run.dir=...{only_deltas}"
            )
        tmp = target.with_suffix(".tmp")
        tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(identity)))
        tmp.replace(target)

    def held_run(self, cfg: DictConfig) -> HeldRun | None:
        """The run with other settings than `cfg` that this folder holds, which a run of `cfg` here would refuse to
        resume, or None. Reads only, so a sweep's checks ask it of each job's folder before any job starts."""
        recorded = self._recorded_identity()
        identity = _identity(cfg)
        return None if recorded is None or recorded == identity else self._held_run(recorded, identity)

    def _recorded_identity(self) -> dict | None:
        target = self.path / CONFIG_FILE
        return _without_execution_settings(read_config(target)) if target.is_file() else None

    def _held_run(self, recorded: dict, identity: dict) -> HeldRun | None:
        """A run that stopped before it finished a case, checkpointed an edit or kept a δ (a mistake in its settings,
        say) holds nothing to protect: its config may be replaced. Kept δs would be read back by a rerun, which would
        edit with δs optimised under other settings."""
        rows, checkpointed = self.count(), self.checkpointed()
        if rows or checkpointed or self.deltas_kept():
            keys = [key for key, _, _ in _differing(recorded, identity)]
            return HeldRun(config_differences(recorded, identity), keys, only_deltas=not (rows or checkpointed))
        return None

    def write_environment(self, extra: dict) -> None:
        versions = {}
        for name in PACKAGES:
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                versions[name] = None
        record = {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
                  "git_commit": git_commit(), **extra}
        (self.path / ENV_FILE).write_text(json.dumps(record, indent=2, default=str))

    def iter_rows(self) -> Iterator[dict]:
        """Every finished case's row, read a line at a time: at paper scale a run's file holds GBs of attention blobs,
        which callers that count rows or read a few fields need not hold at once. Only the last line may be cut short
        (by a kill while it was written), and is then left out; any other line that does not parse is damage, which
        would silently drop finished cases. A case's second row (two invocations appending at once, where the file
        system has no locks) is damage too: its scores would count twice. Blank lines are skipped."""
        file = self.path / ROWS_FILE
        if not file.is_file():
            return
        first_line: dict[str, int] = {}  # case id -> the line of its row
        for number, line, last in _numbered_lines(file):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:  # not JSON, or not UTF-8 text (UnicodeDecodeError)
                if last:
                    return
                problem = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8 text"
                raise DamagedFileError(
                    f"line {number} of {file} is not a whole JSON row ({problem}); it was not written by an "
                    "interrupted run, so the file was damaged or edited: delete that line, and a rerun of the same "
                    "command redoes its case") from None
            if not isinstance(row, dict) or "case_id" not in row:
                raise DamagedFileError(
                    f"line {number} of {file} is not a case's row (a JSON object with its case_id), so the file was "
                    "damaged or edited: delete that line, and a rerun of the same command redoes its case")
            case = str(row["case_id"])
            if case in first_line:
                raise DamagedFileError(
                    f"line {number} of {file} is a second row of case {case} (line {first_line[case]} is its first), "
                    "which would count twice in the tables: two invocations wrote in the folder at once, or the file "
                    "was edited; delete one of the two lines")
            first_line[case] = number
            yield row

    def rows(self) -> list[dict]:
        """Every finished case's row (`iter_rows`), for callers that need them all at once."""
        return list(self.iter_rows())

    def count(self) -> int:
        """How many cases are finished, without holding their rows."""
        return sum(1 for _ in self.iter_rows())

    def checkpointed(self) -> bool:
        """Whether a sequential run has checkpointed edits here (its rows come only at the end)."""
        return (self.path / SEQUENTIAL_STATE).is_file()

    def deltas_kept(self) -> bool:
        """Whether the edit in progress kept δs here, for a rerun to read back (sadr/editors/delta_checkpoint.py)."""
        return any((self.path / DELTA_CHECKPOINT).glob("*.pt"))

    def finished(self) -> set[str]:
        return {str(row["case_id"]) for row in self.iter_rows()}

    def append(self, row: dict) -> None:
        with open(self.path / ROWS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def drop_partial_line(self) -> None:
        """Remove a trailing line cut short by a kill, so appends start on a clean line; a whole row that only lacks
        its newline (the kill came just before it) is kept, and the newline added, as `rows` counts it. The file is
        cut or appended to in place, never rewritten: a kill meanwhile leaves every finished row."""
        file = self.path / ROWS_FILE
        if not file.is_file():
            return
        with open(file, "rb") as f:  # only the last line is read: a paper-scale run's rows take gigabytes
            end = f.seek(0, os.SEEK_END)
            if end == 0:
                return
            f.seek(end - 1)
            if f.read(1) == b"\n":
                return
            start = _last_line_start(f, end)
            f.seek(start)
            last = f.read()
        try:
            json.loads(last)
        except ValueError:  # cut short (a JSON or a UTF-8 error)
            os.truncate(file, start)
            log.warning("dropped the last line of %s, cut short (%d bytes) by a kill while it was written; its case is "
                        "redone", file, end - start)
            return
        with open(file, "ab") as f:
            f.write(b"\n")

    @contextmanager
    def working(self) -> Iterator[None]:
        """Held by the one invocation working here: a second one at the same time (a job launched twice, or requeued
        while the first still runs) would append the same cases again, so it stops at once. The lock goes when its
        process ends, however it ends."""
        lock = FileLock(str(self.path / RUN_LOCK), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise RunConflictError(f"another sadr-run is working in {self.path} (it holds {self.path / RUN_LOCK}); let "
                                   "it finish, or give this one another folder (hydra.run.dir=..., or hydra.sweep.dir=... "
                                   "for a sweep)") from None
        except OSError as err:  # a file system without locks: run as before the lock existed
            log.warning("cannot lock %s (%s); make sure no other sadr-run works in this folder at the same time",
                        self.path, err)
            lock = None
        try:
            yield
        finally:
            if lock is not None:
                lock.release()

    def write_metrics(self, table: pd.DataFrame) -> Path:
        target = self.path / METRICS_FILE
        table.to_csv(target.with_suffix(".tmp"), index=False)
        target.with_suffix(".tmp").replace(target)
        return target
