"""Fuzzing the receive side's pure parsers with hypothesis: MAIL/RCPT arguments, header blocks, the Received
header. Whatever the client sends, a parser returns a result or raises :class:`ParseError` with a 5xx reply --
never another exception -- and what it accepts is safe to put in an envelope and a trace header (no CR, LF or
NUL, within RFC 5321 limits, ASCII unless SMTPUTF8).

``make test`` runs a few hundred examples per property; ``make soak`` (marker ``soak``) runs many more.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from mxgate.core.model import Address
from mxgate.core.smtp.parse import (
    MAX_DOMAIN,
    MAX_LOCAL,
    ParseError,
    parse_bdat,
    parse_mail,
    parse_path,
    parse_rcpt,
)
from mxgate.core.smtp.transaction import parse_headers, received_header

QUICK = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOAK = settings(max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
SMTP_CHARS = ATEXT + '<>@:;,."\\[] =\t\r\n\x00\x7f' + "äü€\U0001f600"

# Building blocks that make the search hit interesting corners quickly (bracket, quote, route and parameter
# syntax), mixed with arbitrary text.
PIECES = st.sampled_from(
    [
        "FROM:",
        "TO:",
        "from: ",
        "<",
        ">",
        "<>",
        "@",
        ":",
        ",",
        '"',
        "\\",
        ".",
        "..",
        "[",
        "]",
        "IPv6:",
        "::1",
        "192.0.2.1",
        " SIZE=",
        " BODY=8BITMIME",
        " SMTPUTF8",
        " NOTIFY=NEVER",
        " NOTIFY=SUCCESS,DELAY",
        " ORCPT=rfc822;",
        " ENVID=",
        " RET=HDRS",
        " REQUIRETLS",
        "+2B",
        "+0A",
        "=",
        " ",
        "example.org",
        "user",
        "%",
        "!",
        "\r\n",
        "\n",
        "\x00",
        "ü",
        "x" * 70,
        "a." * 130,
    ]
)
ARGS = st.one_of(
    st.text(alphabet=SMTP_CHARS, max_size=300),
    st.lists(st.one_of(PIECES, st.text(alphabet=SMTP_CHARS, max_size=8)), max_size=25).map("".join),
    st.text(max_size=300),
)


def _octets(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def _check_address(addr: Address, *, utf8: bool) -> None:
    """What any accepted address must satisfy, whatever the input was."""
    if addr.is_null:
        return
    for part in (addr.local, addr.domain):
        assert part
        assert not any(c in part for c in "\r\n\x00"), addr
        assert not any(c in part for c in " \t<>") or part.startswith('"') or part.startswith("["), addr
    assert _octets(addr.local) <= MAX_LOCAL
    assert _octets(addr.domain) <= MAX_DOMAIN + 2
    if not utf8:
        assert addr.local.isascii() and addr.domain.isascii(), addr
    if not addr.local.startswith('"'):
        assert "@" not in addr.local, addr  # a quoted local part is the only place an "@" may hide


def _check_reply(exc: ParseError) -> None:
    reply = exc.reply
    assert 500 <= reply.code < 600, reply
    assert re.fullmatch(r"5\.\d{1,3}\.\d{1,3}", reply.enhanced), reply
    assert str(reply.code)[0] == reply.enhanced[0]
    assert "\r" not in reply.text and "\n" not in reply.text, reply


def mail_property(arg: str, esmtp: bool, utf8_offered: bool) -> None:
    try:
        mail = parse_mail(arg, esmtp=esmtp, smtputf8_offered=utf8_offered)
    except ParseError as exc:
        _check_reply(exc)
        return
    _check_address(mail.sender, utf8=mail.smtputf8)
    assert mail.smtputf8 <= utf8_offered
    assert mail.body in ("7BIT", "8BITMIME")
    assert mail.size is None or mail.size >= 0
    assert mail.envid is None or (len(mail.envid) <= 100 and all(" " <= c <= "~" for c in mail.envid))
    if not esmtp:
        assert mail.params == ()
    for key, value in mail.params:
        assert key == key.upper() and key.isascii()
        assert value is None or not any(c in value for c in " \r\n\x00=")


def rcpt_property(arg: str, utf8: bool) -> None:
    try:
        rcpt = parse_rcpt(arg, smtputf8=utf8)
    except ParseError as exc:
        _check_reply(exc)
        return
    assert not rcpt.recipient.is_null
    _check_address(rcpt.recipient, utf8=utf8)
    assert {k for k, _ in rcpt.params} <= {"NOTIFY", "ORCPT"}  # DSN (RFC 3461) is all a RCPT may carry
    if rcpt.dsn.orcpt is not None:  # decoded xtext: printable ASCII, safe in a DSN field
        assert all(" " <= c <= "~" for c in rcpt.dsn.orcpt[0] + rcpt.dsn.orcpt[1]), rcpt.dsn
    notify = rcpt.dsn.notify
    assert notify is None or (notify and ("NEVER" not in notify or len(notify) == 1))


@QUICK
@given(ARGS, st.booleans(), st.booleans())
@example('FROM:<"a\\\r\n"@b.example>', True, True)
@example("FROM:<a@b.example> SIZE=" + "9" * 5000, True, True)
@example("FROM:<" + "@r." * 200 + ":a@b.example>", True, True)
@example("FROM:<a@[IPv6:" + ":" * 300 + "]>", True, True)
@example("FROM:<a@[]>", True, True)
@example("FROM:<@:a@b.example>", True, True)
def test_fuzz_parse_mail(arg: str, esmtp: bool, utf8_offered: bool) -> None:
    mail_property(arg, esmtp, utf8_offered)


@QUICK
@given(ARGS, st.booleans())
@example('TO:<"a@evil.example"@example.org>', False)
@example("TO:<a@b@example.org>", False)
@example("TO:<\xff@example.org>", False)
@example("TO:<a\udcff@example.org>", True)
@example("TO:<postmaster>", False)
def test_fuzz_parse_rcpt(arg: str, utf8: bool) -> None:
    rcpt_property(arg, utf8)


# -- a valid address always survives the round trip ------------------------------------------------------------

LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
DOMAIN = st.lists(LABEL, min_size=2, max_size=5).map(".".join).filter(lambda d: len(d) <= MAX_DOMAIN)
LOCAL = (
    st.lists(st.text(alphabet=ATEXT, min_size=1, max_size=12), min_size=1, max_size=5)
    .map(".".join)
    .filter(lambda s: len(s) <= MAX_LOCAL)
)


@QUICK
@given(LOCAL, DOMAIN)
def test_valid_addresses_round_trip(local: str, domain: str) -> None:
    addr = parse_rcpt(f"TO:<{local}@{domain}>").recipient
    assert addr == Address(local, domain)
    assert parse_rcpt(f"TO:<{addr}>").recipient == addr
    mail = parse_mail(f"FROM:<{local}@{domain.upper()}> SIZE=1000")
    assert mail.sender == Address(local, domain)


@QUICK
@given(LOCAL, DOMAIN, st.lists(DOMAIN, min_size=1, max_size=3))
def test_source_route_never_changes_the_final_domain(local: str, domain: str, route: list[str]) -> None:
    """RFC 5321 §4.1.2/C: a source route is ignored -- relaying is decided on the final domain alone."""
    adl = ",".join(f"@{r}" for r in route)
    path = f"<{adl}:{local}@{domain}>"
    assume(_octets(path) <= 258)
    addr = parse_rcpt(f"TO:{path}").recipient
    assert addr.domain == domain and addr.local == local


@QUICK
@given(st.text(alphabet=ATEXT + "@.", max_size=15), st.text(alphabet=ATEXT + "@.", max_size=15), DOMAIN)
def test_an_at_sign_hides_only_in_a_quoted_local_part(head: str, tail: str, domain: str) -> None:
    """The domain is always what follows the LAST "@": an unquoted "@" in the local part is refused (553)."""
    local = f"{head}@{tail}"
    try:
        addr = parse_rcpt(f"TO:<{local}@{domain}>").recipient
    except ParseError as exc:
        assert exc.reply.code == 553
        return
    raise AssertionError(f"accepted {addr!r}")


@QUICK
@given(st.text(max_size=300), st.booleans(), st.booleans())
def test_fuzz_parse_path(path: str, utf8: bool, allow_null: bool) -> None:
    from mxgate.core.model import Reply

    bad = Reply(553, "5.1.3", "Bad address")
    try:
        addr = parse_path(f"<{path}>", utf8=utf8, bad=bad, allow_null=allow_null)
    except ParseError as exc:
        _check_reply(exc)
        return
    _check_address(addr, utf8=utf8)
    assert allow_null or not addr.is_null


# -- header blocks and the Received header ---------------------------------------------------------------------


@QUICK
@given(st.binary(max_size=2000))
def test_fuzz_parse_headers(block: bytes) -> None:
    for name, value in parse_headers(block):
        assert name and ":" not in name
        assert "\r\n" not in value


HELO = st.text(max_size=255).filter(lambda s: s and " " not in s)


def _parsed_or_none(arg: str) -> str | None:
    try:
        return str(parse_rcpt(f"TO:<{arg}>", smtputf8=True).recipient)
    except ParseError:
        return None


# recipients as the server has them: whatever the parser accepted (quoted local parts included)
RECIPIENT = st.one_of(
    st.builds(lambda local, domain: f"{local}@{domain}", LOCAL, DOMAIN),
    st.text(alphabet=SMTP_CHARS, max_size=60).map(lambda t: f'"{t}"@example.org').map(_parsed_or_none),
    ARGS.map(_parsed_or_none),
).filter(lambda r: r is not None)


@QUICK
@given(HELO, st.lists(RECIPIENT, max_size=3), st.sampled_from(["192.0.2.7", "2001:db8::7"]))
def test_received_header_cannot_be_split(helo: str, recipients: list[str], ip: str) -> None:
    """Whatever the client put in EHLO (a hostile client controls it), the trace header stays one header:
    every line but the first is a continuation, no bare CR/LF, no NUL."""
    head = received_header(
        helo=helo,
        ip=ip,
        hostname="mx.gateway.test",
        esmtp=True,
        tls=None,
        auth=False,
        ident="abc.1",
        recipients=tuple(recipients),
        when=datetime(2026, 1, 1, tzinfo=UTC),
    )
    assert head.endswith(b"\r\n")
    lines = head[:-2].split(b"\r\n")
    assert lines[0].startswith(b"Received: from ")
    assert all(line[:1] == b"\t" for line in lines[1:]), head
    for line in lines:
        assert b"\r" not in line and b"\n" not in line and b"\x00" not in line


# -- soak: the same properties, many more examples -------------------------------------------------------------


def _soak(fn: Callable[..., None], *strategies: Any) -> Callable[[], None]:
    @pytest.mark.soak
    @SOAK
    @given(st.tuples(*strategies))
    def run(args: tuple[Any, ...]) -> None:
        fn(*args)

    return run


test_soak_fuzz_parse_mail = _soak(mail_property, ARGS, st.booleans(), st.booleans())
test_soak_fuzz_parse_rcpt = _soak(rcpt_property, ARGS, st.booleans())


def bdat_property(arg: bytes) -> None:
    try:
        size, last = parse_bdat(arg)
    except ParseError as exc:
        _check_reply(exc)
        return
    assert 0 <= size < 10**20 and isinstance(last, bool)
    assert arg.split(b" ")[0].isdigit()


@QUICK
@given(
    st.one_of(st.binary(max_size=40), st.text(alphabet="0123456789 LASTlast-+\r\n\x00", max_size=30).map(str.encode))
)
@example(b"00000000000000000000 LAST")
@example(b"1 LAST ")
def test_bdat_argument(arg: bytes) -> None:
    bdat_property(arg)
