"""Record-level schema checking shared by every dataset format.

A format reads its raw records only through `Record`, which type-checks each field as it hands it
out, so a format's parse function *is* its schema: any missing or mistyped field raises
`InvalidRecordError` naming the file, the record index (0-based position in the file's JSON list),
the field path and what was expected. `parse_records` applies the `dataset.on_invalid` policy.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, NoReturn, TypeVar

from sadr.conf.schema import InvalidRecordPolicy
from sadr.errors import InvalidSettingError

log = logging.getLogger(__name__)

T = TypeVar("T")
_ABSENT = object()
_LOGGED_SKIPS = 10  # individual warnings before only the final count is logged


class InvalidRecordError(InvalidSettingError):
    """One record does not match its format's schema."""

    def __init__(self, source: str, index: int, field: str, expected: str, got: Any = _ABSENT,
                 fix: str = "Fix the record, or set dataset.on_invalid=skip to skip invalid records."):
        self.source, self.index, self.field, self.expected, self.got = source, index, field, expected, got
        self.missing = got is _ABSENT
        where = f"{source}: record {index}" + (f", field '{field}'" if field else "")
        found = "it is missing" if got is _ABSENT else f"got {_preview(got)}"
        self.problem = f"{where}: expected {expected}, {found}"
        super().__init__(f"{self.problem}. {fix}")


class Record:
    """Read-only view of one raw record (or an object nested in it) that validates every field it returns."""

    def __init__(self, data: dict, source: str, index: int, path: str = ""):
        self._data, self.source, self.index, self._path = data, source, index, path

    def field(self, key: str) -> str:
        """The dotted path of `key` inside the record, for messages."""
        return f"{self._path}.{key}" if self._path else key

    def fail(self, key: str, expected: str, got: Any = _ABSENT) -> NoReturn:
        raise InvalidRecordError(self.source, self.index, self.field(key), expected, got)

    def keys(self) -> list[str]:
        return list(self._data)

    def _get(self, key: str, required: bool, expected: str) -> Any:
        """The raw value; _ABSENT when the field is absent, or null, and not required."""
        value = self._data.get(key, _ABSENT)
        if value is None and not required:
            return _ABSENT
        if value is _ABSENT and required:
            self.fail(key, expected)
        return value

    def text(self, key: str, required: bool = True) -> str | None:
        """A non-empty string; None when absent (or null) and not required."""
        value = self._get(key, required, "a non-empty string")
        if value is _ABSENT:
            return None
        if not _is_text(value):
            self.fail(key, "a non-empty string", value)
        return value

    def texts(self, key: str, required: bool = True) -> list[str]:
        """A list of non-empty strings; [] when absent (or null) and not required."""
        value = self._get(key, required, "a list of non-empty strings")
        if value is _ABSENT:
            return []
        if not isinstance(value, list):
            self.fail(key, "a list of non-empty strings", value)
        for i, item in enumerate(value):
            if not _is_text(item):
                self.fail(f"{key}[{i}]", "a non-empty string", item)
        return value

    def text_or_texts(self, key: str) -> list[str]:
        """A non-empty string, as a list of one, or a list of non-empty strings."""
        value = self._get(key, True, "a non-empty string or a list of them")
        return self.texts(key) if isinstance(value, list) else [self.text(key)]

    def alias(self, key: str) -> str:
        """A non-empty string, or the first alias of a (nested) list of aliases such as [["Paris", "City of Light"]]."""
        value = self._get(key, True, "a string or a list of aliases")
        while isinstance(value, list) and value:
            value = value[0]
        if not _is_text(value):
            self.fail(key, "a non-empty string or a non-empty list of alias strings", self._data[key])
        return value

    def identifier(self, key: str) -> int | str:
        value = self._get(key, True, "an integer or a string id")
        if isinstance(value, bool) or not isinstance(value, int) and not _is_text(value):
            self.fail(key, "an integer or a string id", value)
        return value

    def child(self, key: str, required: bool = True) -> Record:
        """A nested object; an empty one when absent (or null) and not required."""
        value = self._get(key, required, "a JSON object")
        if value is _ABSENT:
            value = {}
        if not isinstance(value, dict):
            self.fail(key, "a JSON object", value)
        return Record(value, self.source, self.index, self.field(key))

    def children(self, key: str, required: bool = True) -> list[Record]:
        """A list of nested objects; [] when absent (or null) and not required."""
        value = self._get(key, required, "a list of JSON objects")
        if value is _ABSENT:
            return []
        if not isinstance(value, list):
            self.fail(key, "a list of JSON objects", value)
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                self.fail(f"{key}[{i}]", "a JSON object", item)
        return [Record(item, self.source, self.index, self.field(f"{key}[{i}]")) for i, item in enumerate(value)]


def parse_records(
    raw: list, source: str, parse: Callable[[Record], T], policy: InvalidRecordPolicy
) -> tuple[list[T], int]:
    """Parse every raw record; an invalid one raises, or with policy `skip` is logged and counted."""
    parsed, skipped = [], 0
    for index, item in enumerate(raw):
        try:
            if not isinstance(item, dict):
                raise InvalidRecordError(source, index, "", "a JSON object", item)
            parsed.append(parse(Record(item, source, index)))
        except InvalidRecordError as exc:
            if policy is InvalidRecordPolicy.error:
                raise
            skipped += 1
            if skipped <= _LOGGED_SKIPS:
                log.warning("skipping invalid record: %s", exc.problem)
    if skipped:
        log.warning("%s: skipped %d invalid record(s) of %d (dataset.on_invalid=skip)", source, skipped, len(raw))
    return parsed, skipped


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _preview(value: Any, width: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
