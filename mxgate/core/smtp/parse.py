"""MAIL FROM / RCPT TO argument parsing (RFC 5321 §4.1.2, RFC 6531 for SMTPUTF8, RFC 1870 SIZE, RFC 6152 BODY).

Pure functions: a command argument goes in, a :class:`MailCommand` / :class:`RcptCommand` or a
:class:`ParseError` carrying the :class:`~mxgate.core.model.Reply` to send comes out.
Syntax of the command as a whole (``FROM:`` missing, parameters) is ``501``/``555``; a path whose address is
malformed is ``553`` with the reason (RFC 5321 §4.2.2 "mailbox syntax incorrect"), enhanced ``5.1.7`` for the sender
and ``5.1.3`` for a recipient (RFC 3463 §3.2 "bad sender's / destination mailbox address syntax") -- control and
bidi characters in an SMTPUTF8 address included. RFC 6531's ``5.6.7`` ("non-ASCII addresses not permitted") is kept
for a non-ASCII address sent without SMTPUTF8.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final

from mxgate.core.model import Address, DsnNotify, DsnRet, RecipientDsn, Reply
from mxgate.core.textsafe import address_problem

__all__ = [
    "MailCommand",
    "ParseError",
    "RcptCommand",
    "parse_bdat",
    "parse_mail",
    "parse_path",
    "parse_rcpt",
    "xtext_decode",
    "xtext_encode",
]

MAX_LOCAL = 64  # RFC 5321 §4.5.3.1.1
MAX_DOMAIN = 255  # §4.5.3.1.2
MAX_PATH = 256  # §4.5.3.1.3

_ATEXT_ASCII = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_DOT_STRING = re.compile(rf"^[{_ATEXT_ASCII}]+(?:\.[{_ATEXT_ASCII}]+)*\Z")
# RFC 6531: UTF8-non-ascii is allowed in atext and in quoted strings
_DOT_STRING_UTF8 = re.compile(rf"^[{_ATEXT_ASCII}\u0080-\U0010ffff]+(?:\.[{_ATEXT_ASCII}\u0080-\U0010ffff]+)*\Z")
_QUOTED = re.compile(r'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_QUOTED_UTF8 = re.compile(r'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"\Z')
_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_LABEL_UTF8 = re.compile(
    r"^[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\u0080-\U0010ffff-]*[A-Za-z0-9\u0080-\U0010ffff])?\Z"
)
_PARAM_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*\Z")
_PARAM_VALUE = re.compile(r"^[\x21-\x3c\x3e-\x7e]+\Z")  # esmtp-value: no "=", no SP, no controls


class ParseError(Exception):
    """A command argument that cannot be accepted, with the reply that says why."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True, slots=True)
class MailCommand:
    sender: Address
    params: tuple[tuple[str, str | None], ...]  # upper-cased keys, in order
    size: int | None = None
    body: str = "7BIT"  # 7BIT | 8BITMIME
    smtputf8: bool = False
    ret: DsnRet | None = None  # RFC 3461 §4.3
    envid: str | None = None  # RFC 3461 §4.4, decoded
    requiretls: bool = False  # RFC 8689 §3

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(k if v is None else f"{k}={v}" for k, v in self.params)


_NO_DSN = RecipientDsn()


@dataclass(frozen=True, slots=True)
class RcptCommand:
    recipient: Address
    params: tuple[tuple[str, str | None], ...]
    dsn: RecipientDsn = _NO_DSN


MAX_ENVID = 100  # RFC 3461 §4.4: "100 characters or less" (encoded)
MAX_ORCPT = 500  # §4.2: the encoded parameter, 500 characters at most
_XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")  # §4: xtext
_ADDR_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*\Z")  # atom, in practice "rfc822" or "utf-8"


def xtext_decode(value: str) -> str | None:
    """RFC 3461 §4 xtext -> text; ``None`` when ``value`` is not xtext (or decodes to a control character)."""
    if not _XTEXT.match(value):
        return None
    out = re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)
    if any(not (0x20 <= ord(c) <= 0x7E) for c in out):
        return None
    return out


def xtext_encode(value: str) -> str:
    """Text -> RFC 3461 §4 xtext: ``+``, ``=`` and everything outside ``!``..``~`` as ``+HH`` (for ASCII text;
    a non-ASCII character is encoded byte by byte in UTF-8)."""
    out = []
    for ch in value:
        if "!" <= ch <= "~" and ch not in "+=":
            out.append(ch)
        else:
            out.extend(f"+{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def _dsn_bad(what: str) -> ParseError:
    return ParseError(Reply(501, "5.5.4", f"Bad {what} parameter (RFC 3461)"))


def _split_keyword(arg: str, keyword: str, usage: str) -> str:
    """``FROM:<a@b> SIZE=1`` -> ``<a@b> SIZE=1``; tolerates one space after the colon (common clients)."""
    if arg[: len(keyword)].upper() != keyword:
        raise ParseError(Reply(501, "5.5.4", f"Syntax: {usage}"))
    rest = arg[len(keyword) :]
    if rest.startswith(" "):
        rest = rest[1:]
    return rest


def _split_path(rest: str, usage: str) -> tuple[str, str]:
    """The ``<...>`` path (quotes may contain '>') and the parameter text after it."""
    if not rest.startswith("<"):
        raise ParseError(Reply(501, "5.5.4", f"Syntax: {usage} (the address must be in angle brackets)"))
    in_quotes = False
    escaped = False
    for i in range(1, len(rest)):
        c = rest[i]
        if escaped:
            escaped = False
        elif c == "\\" and in_quotes:
            escaped = True
        elif c == '"':
            in_quotes = not in_quotes
        elif c == ">" and not in_quotes:
            after = rest[i + 1 :]
            if after and not after.startswith(" "):
                raise ParseError(Reply(501, "5.5.4", f"Syntax: {usage} (space needed before parameters)"))
            return rest[: i + 1], after.strip(" ")
    raise ParseError(Reply(501, "5.5.4", f"Syntax: {usage} (missing '>')"))


def _check_domain(domain: str, utf8: bool, bad: Reply) -> str:
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        try:
            if literal[:5].upper() == "IPV6:":
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            raise ParseError(Reply(bad.code, bad.enhanced, f"{bad.text}: invalid address literal")) from None
        return domain
    if len(domain) > MAX_DOMAIN:
        raise ParseError(Reply(bad.code, bad.enhanced, f"{bad.text}: domain longer than {MAX_DOMAIN} octets"))
    labels = domain.split(".")
    pattern = _LABEL_UTF8 if utf8 else _LABEL
    if not domain or not all(pattern.match(label) for label in labels):
        raise ParseError(Reply(bad.code, bad.enhanced, f"{bad.text}: invalid domain"))
    return domain


def parse_path(path: str, *, utf8: bool, bad: Reply, allow_null: bool) -> Address:
    """``<local@domain>`` (an A-d-l source route is accepted and ignored, RFC 5321 §4.1.2/C) -> Address."""
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH + 2:
        raise ParseError(Reply(bad.code, bad.enhanced, f"{bad.text}: path longer than {MAX_PATH} octets"))
    inner = path[1:-1]
    # C0/C1 and bidi controls: RFC 6531's UTF8-non-ascii would admit C1 and bidi controls, and an address is shown
    # to people (logs, `mxgate queue`, the recipient's mail client) -- mailbox syntax we refuse (553, X.1.7/X.1.3)
    problem = address_problem(inner)
    if problem is not None:
        raise ParseError(Reply(bad.code, bad.enhanced, f"{bad.text}: {problem}"))
    if inner == "":
        if allow_null:
            return Address.null()
        raise ParseError(Reply(bad.code, bad.enhanced, f"{bad.text}: empty address"))
    if inner.startswith("@"):
        colon = inner.find(":")
        if colon < 0:
            raise ParseError(Reply(bad.code, bad.enhanced, f"{bad.text}: bad source route"))
        inner = inner[colon + 1 :]
    at = inner.rfind("@")
    if at <= 0:
        raise ParseError(Reply(bad.code, bad.enhanced, f"{bad.text}: a domain is needed (local@domain)"))
    local, domain = inner[:at], inner[at + 1 :]
    if len(local.encode("utf-8", "surrogateescape")) > MAX_LOCAL:
        raise ParseError(Reply(bad.code, bad.enhanced, f"{bad.text}: local part longer than {MAX_LOCAL} octets"))
    if local.startswith('"'):
        ok = (_QUOTED_UTF8 if utf8 else _QUOTED).match(local)
    else:
        ok = (_DOT_STRING_UTF8 if utf8 else _DOT_STRING).match(local)
    if not ok:
        if not utf8 and not local.isascii():
            raise ParseError(Reply(553, "5.6.7", "Non-ASCII address needs the SMTPUTF8 parameter"))
        raise ParseError(Reply(bad.code, bad.enhanced, f"{bad.text}: invalid local part"))
    if not utf8 and not domain.isascii():
        raise ParseError(Reply(553, "5.6.7", "Non-ASCII address needs the SMTPUTF8 parameter"))
    _check_domain(domain, utf8, bad)
    return Address(local, domain.rstrip(".").lower() if domain.isascii() else domain.rstrip("."))


def _params(text: str) -> tuple[tuple[str, str | None], ...]:
    out: list[tuple[str, str | None]] = []
    for item in text.split():
        key, eq, value = item.partition("=")
        if not _PARAM_KEY.match(key) or (eq and not _PARAM_VALUE.match(value)):
            raise ParseError(Reply(501, "5.5.4", f"Bad parameter syntax: {item[:40]!r}"))
        out.append((key.upper(), value if eq else None))
    return tuple(out)


# the replies to a path that does not parse (made once: every MAIL and RCPT names them)
_BAD_SENDER: Final = Reply(553, "5.1.7", "Bad sender address syntax")
_BAD_RECIPIENT: Final = Reply(553, "5.1.3", "Bad recipient address syntax")


def parse_mail(arg: str, *, esmtp: bool = True, smtputf8_offered: bool = True) -> MailCommand:
    """The argument of ``MAIL`` (everything after ``MAIL ``).

    ``REQUIRETLS`` is parsed here whatever the session; whether it may be used (only over TLS) is the policy's
    decision."""
    usage = "MAIL FROM:<address> [parameters]"
    path, rest = _split_path(_split_keyword(arg, "FROM:", usage), usage)
    params = _params(rest)
    if params and not esmtp:
        raise ParseError(Reply(555, "5.5.4", "Parameters need EHLO, not HELO"))
    keys = [k for k, _ in params]
    if len(set(keys)) != len(keys):
        raise ParseError(Reply(501, "5.5.4", "A MAIL parameter is given twice"))
    size: int | None = None
    body = "7BIT"
    utf8 = False
    ret: DsnRet | None = None
    envid: str | None = None
    requiretls = False
    for key, value in params:
        if key == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise _dsn_bad("RET")
            ret = DsnRet(value.upper())
        elif key == "ENVID":
            decoded = xtext_decode(value) if value is not None and len(value) <= MAX_ENVID else None
            if decoded is None:
                raise _dsn_bad("ENVID")
            envid = decoded
        elif key == "REQUIRETLS":
            if value is not None:
                raise ParseError(Reply(501, "5.5.4", "REQUIRETLS takes no value"))
            requiretls = True
        elif key == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                raise ParseError(Reply(501, "5.5.4", "Bad SIZE parameter: SIZE=<octets>"))
            size = int(value)
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise ParseError(Reply(501, "5.5.4", "Bad BODY parameter: BODY=7BIT or BODY=8BITMIME"))
            body = value.upper()
        elif key == "SMTPUTF8" and smtputf8_offered:
            if value is not None:
                raise ParseError(Reply(501, "5.5.4", "SMTPUTF8 takes no value"))
            utf8 = True
        else:
            raise ParseError(Reply(555, "5.5.4", f"Unsupported MAIL parameter {key}"))
    sender = parse_path(path, utf8=utf8, bad=_BAD_SENDER, allow_null=True)
    return MailCommand(sender, params, size, body, utf8, ret, envid, requiretls)


def _notify(value: str | None) -> frozenset[DsnNotify]:
    words = value.upper().split(",") if value else []
    if not words or len(set(words)) != len(words) or not all(w in DsnNotify.__members__ for w in words):
        raise _dsn_bad("NOTIFY")
    notify = frozenset(DsnNotify(w) for w in words)
    if DsnNotify.NEVER in notify and len(notify) > 1:  # §4.1: NEVER stands alone
        raise _dsn_bad("NOTIFY")
    return notify


def _orcpt(value: str | None) -> tuple[str, str]:
    if value is None or len(value) > MAX_ORCPT:
        raise _dsn_bad("ORCPT")
    addr_type, sep, encoded = value.partition(";")
    decoded = xtext_decode(encoded) if sep else None
    if not decoded or not _ADDR_TYPE.match(addr_type):
        raise _dsn_bad("ORCPT")
    return addr_type.lower(), decoded


def parse_rcpt(arg: str, *, smtputf8: bool = False, postmaster_domain: str | None = None) -> RcptCommand:
    """The argument of ``RCPT`` (everything after ``RCPT ``); ``smtputf8`` = the transaction declared SMTPUTF8.

    ``<Postmaster>`` without a domain (RFC 5321 section 4.5.1: it must be accepted) becomes
    ``postmaster@<postmaster_domain>`` when that is given.
    """
    usage = "RCPT TO:<address> [parameters]"
    path, rest = _split_path(_split_keyword(arg, "TO:", usage), usage)
    params = _params(rest)
    keys = [k for k, _ in params]
    if len(set(keys)) != len(keys):
        raise ParseError(Reply(501, "5.5.4", "A RCPT parameter is given twice"))
    notify: frozenset[DsnNotify] | None = None
    orcpt: tuple[str, str] | None = None
    for key, value in params:
        if key == "NOTIFY":
            notify = _notify(value)
        elif key == "ORCPT":
            orcpt = _orcpt(value)
        else:
            raise ParseError(Reply(555, "5.5.4", f"Unsupported RCPT parameter {key}"))
    dsn = RecipientDsn(notify, orcpt)
    if postmaster_domain and path.lower() == "<postmaster>":
        return RcptCommand(Address("postmaster", postmaster_domain.lower()), params, dsn)
    rcpt = parse_path(path, utf8=smtputf8, bad=_BAD_RECIPIENT, allow_null=False)
    return RcptCommand(rcpt, params, dsn)


MAX_CHUNK_DIGITS = 20  # more octets than any message limit; bounds int() work


def parse_bdat(arg: bytes) -> tuple[int, bool]:
    """The argument of ``BDAT`` (RFC 3030 §2: ``BDAT <chunk-size> [LAST]``) -> ``(size, last)``.

    Works on bytes: a BDAT line that is not even text is still a syntax error, never a decoding error, because the
    caller must know whether it can find the end of the chunk (it cannot, after a syntax error).
    """
    parts = arg.split(b" ")
    bad = ParseError(Reply(501, "5.5.4", "Syntax: BDAT <octets> [LAST]"))
    if not 1 <= len(parts) <= 2:
        raise bad
    size = parts[0]
    if not size or len(size) > MAX_CHUNK_DIGITS or not size.isdigit():
        raise bad
    if len(parts) == 2 and parts[1].upper() != b"LAST":
        raise bad
    return int(size), len(parts) == 2
