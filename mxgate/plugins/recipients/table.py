"""Recipient files: which addresses exist, as lines of addresses and patterns; reloaded when the file changes.

One entry per line; blank lines and lines starting with ``#`` are ignored; after the first word of a line anything
may follow (so a Postfix ``relay_recipient_maps`` source such as ``user@example.org OK`` works as it is):

- ``user@example.org`` — that address (case-insensitive);
- ``@example.org`` — every address at that domain (a catch-all);
- ``*-list@example.org``, ``team?@example.org`` — shell-style wildcards (``*``, ``?``) anywhere in the address.

Pure parsing and matching (:func:`parse_table`, :class:`RecipientTable`) apart from the file watching
(:class:`RecipientFile`, whose :meth:`~RecipientFile.load` does blocking I/O and is run off the event loop).
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["FileSignature", "LoadResult", "RecipientFile", "RecipientTable", "parse_table"]

MAX_FILE_BYTES = 64 * 1024 * 1024  # a recipients file larger than this is refused (a mistake, not a directory)


@dataclass(frozen=True, slots=True)
class RecipientTable:
    """The entries of one file, lower-cased."""

    addresses: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()  # catch-alls
    patterns: tuple[re.Pattern[str], ...] = ()
    entries: int = 0

    def matches(self, address: str) -> bool:
        """Whether ``address`` (``local@domain``) is listed, by address, catch-all or pattern."""
        address = address.lower()
        if address in self.addresses:
            return True
        domain = address.rpartition("@")[2]
        if domain in self.domains:
            return True
        return any(p.match(address) for p in self.patterns)


def parse_table(text: str) -> tuple[RecipientTable, list[str]]:
    """A table from a file's text, and the problems found (``"line 3: ..."``); bad lines are skipped."""
    addresses: set[str] = set()
    domains: set[str] = set()
    patterns: list[re.Pattern[str]] = []
    problems: list[str] = []
    entries = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        entry = line.split()[0].lower()
        local, at, domain = entry.rpartition("@")
        if not at or not domain.strip("."):
            problems.append(f"line {number}: expected user@domain, @domain or a pattern, got {entry[:80]!r}")
            continue
        if not entry.isprintable():
            problems.append(f"line {number}: control characters in {entry[:80]!r}")
            continue
        entries += 1
        if "*" in entry or "?" in entry:
            patterns.append(re.compile(fnmatch.translate(entry), re.DOTALL))
        elif not local:
            domains.add(domain.rstrip("."))
        else:
            addresses.add(entry)
    return RecipientTable(frozenset(addresses), frozenset(domains), tuple(patterns), entries), problems


@dataclass(frozen=True, slots=True)
class FileSignature:
    """What changes when a file is rewritten or replaced: checked with one ``stat``."""

    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileSignature:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True, slots=True)
class LoadResult:
    """The outcome of one :meth:`RecipientFile.load`: a new table, no change, or an error."""

    changed: bool
    signature: FileSignature | None = None
    table: RecipientTable | None = None
    problems: tuple[str, ...] = ()
    error: str | None = None


@dataclass
class RecipientFile:
    """A recipients file and the table last loaded from it. :meth:`load` runs in a thread (``stat`` and, when the
    file changed, read and parse); :meth:`apply` takes its result on the event loop. A file that disappears or
    cannot be read keeps the last good table in force."""

    path: Path
    table: RecipientTable | None = None
    signature: FileSignature | None = None
    error: str | None = None
    problems: tuple[str, ...] = field(default=())

    def load(self) -> LoadResult:
        try:
            before = FileSignature.of(self.path.stat())
            if before == self.signature:
                return LoadResult(False)
            if before.size > MAX_FILE_BYTES:
                return LoadResult(False, error=f"{self.path}: larger than {MAX_FILE_BYTES} bytes")
            data = self.path.read_bytes()
            after = FileSignature.of(self.path.stat())
        except OSError as exc:
            return LoadResult(False, error=f"{self.path}: {exc.strerror or exc}")
        if after != before:  # being written now: read it again at the next check
            return LoadResult(False)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            return LoadResult(False, error=f"{self.path}: not UTF-8 ({exc})")
        table, problems = parse_table(text)
        return LoadResult(True, after, table, tuple(problems))

    def apply(self, result: LoadResult) -> bool:
        """Take a load's result; True when a new table is now in force."""
        self.error = result.error
        if not result.changed or result.table is None:
            return False
        self.table, self.signature, self.problems = result.table, result.signature, result.problems
        return True
