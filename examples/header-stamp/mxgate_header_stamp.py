"""An example transport agent: stamps every accepted message with a header and refuses recipients that match a
pattern. It is a package of its own (see pyproject.toml: entry point group ``mxgate``), configured with

    [plugins.header_stamp]
    header = "X-Stamped-By"
    reject_pattern = "^noreply-"
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mxgate import (
    Address,
    ConfigRegistry,
    Envelope,
    IncomingMessage,
    Reject,
    Reply,
    Runtime,
    Session,
    Verdict,
    hookimpl,
    setting,
)


@dataclass(frozen=True, slots=True)
class HeaderStampConfig:
    header: str = setting("X-Stamped-By", desc="Name of the header added to every accepted message.")
    value: str = setting("mxgate", desc="Its value.")
    reject_pattern: str = setting(
        "",
        desc="Recipients whose local part matches this regular expression are refused (550 5.7.1).",
        check=lambda v: _regex_error(v),
    )


def _regex_error(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"not a regular expression: {exc}"
    return None


class HeaderStamp:
    """Adds a header to every message; refuses recipients matching a pattern."""

    name = "header_stamp"
    priority = 10

    def __init__(self) -> None:
        self.config = HeaderStampConfig()

    @hookimpl
    def mxgate_lifecycle_register_config(self, registry: ConfigRegistry) -> None:
        registry.add_section(self.name, HeaderStampConfig, owner=self.name)

    @hookimpl
    def mxgate_lifecycle_on_startup(self, runtime: Runtime) -> None:
        self.config = runtime.config.plugin_section(self.name, HeaderStampConfig)

    @hookimpl
    def mxgate_receive_on_rcpt_command(self, rcpt: Address) -> Verdict | None:
        if self.config.reject_pattern and re.search(self.config.reject_pattern, rcpt.local):
            return Reject(Reply(550, "5.7.1", f"recipient {rcpt} refused by policy"))
        return None

    @hookimpl
    async def mxgate_receive_on_end_of_data(
        self, session: Session, envelope: Envelope, message: IncomingMessage
    ) -> Verdict | None:
        message.add_header(self.config.header, f"{self.config.value} ({session.listener})")
        return None
