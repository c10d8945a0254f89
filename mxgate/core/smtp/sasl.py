"""AUTH (RFC 4954) mechanisms as socket-free exchanges: the server asks an exchange what to send
(:class:`Challenge`, answered with ``334``), feeds it the client's lines, and ends with :class:`Credentials` or the
:class:`Reply` that refuses them. Checking the credentials (``resolve_credentials``), the ``on_auth_command`` veto
and the failure limiter stay with the server (:meth:`mxgate.core.smtp.connection.Connection.cmd_auth`).

Mechanisms: ``PLAIN`` (RFC 4616) and ``LOGIN`` (draft-murchison-sasl-login). Both carry a password in the clear,
so the session's policy offers AUTH only where it is allowed (:meth:`ReceivePolicy.check_auth`).
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import ClassVar, Final

from mxgate.core.model import Reply
from mxgate.core.smtp.session import R

__all__ = [
    "MECHANISMS",
    "Challenge",
    "Credentials",
    "Exchange",
    "Login",
    "Plain",
    "Step",
    "new_exchange",
    "parse_auth",
]

AUTH_SYNTAX: Final = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
PLAIN_SYNTAX: Final = Reply(501, "5.5.2", "PLAIN response must be authzid NUL authcid NUL password")


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``334 <text>`` (base64, possibly empty) and feed the client's next line to :meth:`Exchange.respond`."""

    text: str


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the client sent. ``authzid``: PLAIN's authorization identity (empty: the same as ``username``)."""

    username: str
    password: str
    authzid: str = ""

    @property
    def authzid_ok(self) -> bool:
        """We let no one act as someone else: an authorization identity must be the username itself."""
        return not self.authzid or self.authzid == self.username


Step = Challenge | Credentials | Reply


def parse_auth(arg: str | None) -> tuple[str, str | None] | Reply:
    """``AUTH mechanism [initial-response]`` → (upper-case mechanism, initial response or ``None``)."""
    parts = (arg or "").split()
    if not parts or len(parts) > 2:
        return AUTH_SYNTAX
    return parts[0].upper(), parts[1] if len(parts) == 2 else None


def _b64(text: str) -> bytes | None:
    if text == "=":  # RFC 4954 §4: an empty initial response
        return b""
    try:
        return binascii.a2b_base64(text.encode("ascii", "replace"), strict_mode=True)
    except (binascii.Error, ValueError):
        return None


def _line_text(line: bytes) -> str:
    return line.decode("ascii", "replace").strip()


class Exchange:
    """One AUTH dialogue. ``veto_first``: the server asks ``on_auth_command`` before the exchange starts (no
    username known yet); otherwise once the credentials are decoded, with the username."""

    mechanism: ClassVar[str]
    veto_first: ClassVar[bool]

    def start(self, initial: str | None) -> Step:
        """The first step; ``initial``: the response given on the AUTH line (``None``: none)."""
        raise NotImplementedError

    def respond(self, line: bytes) -> Step:
        """The client's answer to the last :class:`Challenge` (the line without CRLF); ``*`` cancels."""
        text = _line_text(line)
        if text == "*":
            return R.AUTH_CANCELLED
        return self._take(text)

    def _take(self, text: str) -> Step:
        raise NotImplementedError


class Plain(Exchange):
    """RFC 4616: one message, ``authzid NUL authcid NUL password``."""

    mechanism = "PLAIN"
    veto_first = False

    def start(self, initial: str | None) -> Step:
        return Challenge("") if initial is None else self._take(initial)

    def _take(self, text: str) -> Step:
        if text == "*":
            return R.AUTH_CANCELLED
        raw = _b64(text)
        if raw is None:
            return R.AUTH_BAD64
        parts = raw.split(b"\0")
        if len(parts) != 3:
            return PLAIN_SYNTAX
        try:
            authzid, username, password = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            return R.AUTH_BAD64
        return Credentials(username, password, authzid)


class Login(Exchange):
    """``LOGIN``: the username, then the password, each asked for (``Username:``, ``Password:`` in base64); the
    username may come as the initial response."""

    mechanism = "LOGIN"
    veto_first = True
    USERNAME: Final = "VXNlcm5hbWU6"
    PASSWORD: Final = "UGFzc3dvcmQ6"

    def __init__(self) -> None:
        self._username: str | None = None

    def start(self, initial: str | None) -> Step:
        return Challenge(self.USERNAME) if initial is None else self._take(initial)

    def _take(self, text: str) -> Step:
        raw = _b64(text)
        if raw is None:
            return R.AUTH_BAD64
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            return R.AUTH_BAD64
        if self._username is None:
            self._username = value
            return Challenge(self.PASSWORD)
        return Credentials(self._username, value)


_MECHANISMS: Final[dict[str, type[Exchange]]] = {"PLAIN": Plain, "LOGIN": Login}
MECHANISMS: Final = tuple(_MECHANISMS)


def new_exchange(mechanism: str) -> Exchange | None:
    """A fresh exchange for an upper-case mechanism name; ``None`` for one we do not offer."""
    cls = _MECHANISMS.get(mechanism)
    return None if cls is None else cls()
