"""The one exception hierarchy of mxgate.

Expected outcomes (no policy published, NXDOMAIN, a rejected recipient) are return values, not exceptions.
Exceptions are for what the caller cannot carry on from without telling somebody.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class MxgateError(Exception):
    """Root of every error mxgate raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One mistake in one configuration file."""

    file: str
    path: str  # key path, e.g. "outbound_connector[2].tls"; "" for the whole file
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.path}" if self.path else self.file
        return f"{where}: {self.message}"


class ConfigError(MxgateError):
    """A configuration file is invalid; carries every problem found in it, not just the first."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def single(cls, file: str, path: str, message: str) -> ConfigError:
        return cls([ConfigProblem(file, path, message)])


class PluginError(MxgateError):
    """A plugin could not be loaded or broke the hook contract."""


class StateError(MxgateError):
    """The state directory is unusable (missing, unreadable, read-only)."""


class WorkerError(MxgateError):
    """A receive worker process could not start (its own error is logged by it)."""


class StartupError(StateError):
    """A start-up failure said in one line naming the file or port (``mxgate run`` prints it, no traceback)."""
