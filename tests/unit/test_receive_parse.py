"""MAIL/RCPT argument parsing: paths, parameters, and the reply each mistake gets."""

from __future__ import annotations

import pytest

from mxgate.core.model import Address
from mxgate.core.smtp.parse import ParseError, parse_mail, parse_rcpt


def test_mail_simple_and_params() -> None:
    m = parse_mail("FROM:<Alice@Example.ORG> SIZE=1000 BODY=8BITMIME")
    assert m.sender == Address("Alice", "example.org")
    assert (m.size, m.body, m.smtputf8) == (1000, "8BITMIME", False)
    assert m.options == ("SIZE=1000", "BODY=8BITMIME")


def test_mail_null_sender_and_space_after_colon() -> None:
    assert parse_mail("FROM:<>").sender.is_null
    assert parse_mail("from: <a@b.example>").sender == Address("a", "b.example")


def test_source_route_ignored_and_quoted_local_part() -> None:
    assert parse_rcpt("TO:<@relay.example:u@d.example>").recipient == Address("u", "d.example")
    assert parse_rcpt('TO:<"john doe>x"@d.example>').recipient == Address('"john doe>x"', "d.example")


def test_smtputf8() -> None:
    m = parse_mail("FROM:<jörg@bücher.example> SMTPUTF8")
    assert m.smtputf8 and m.sender.local == "jörg"
    with pytest.raises(ParseError) as exc:
        parse_mail("FROM:<jörg@example.org>")
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (553, "5.6.7")
    assert parse_rcpt("TO:<ü@example.org>", smtputf8=True).recipient.local == "ü"


@pytest.mark.parametrize(
    "char",
    ["\x00", "\x07", "\x1b", "\x7f", "\x85", "\x9b", "\u061c", "\u200e", "\u200f", "\u202a", "\u202e", "\u2066",
     "\u2069", "\u2028"],
)  # fmt: skip
@pytest.mark.parametrize("where", ["local", "quoted", "domain"])
def test_controls_and_bidi_controls_in_smtputf8_addresses_are_refused(char: str, where: str) -> None:
    address = {"local": f"a{char}b@d.example", "quoted": f'"a{char}b"@d.example', "domain": f"a@d{char}x.example"}[
        where
    ]
    with pytest.raises(ParseError) as exc:
        parse_mail(f"FROM:<{address}> SMTPUTF8")
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (553, "5.1.7")
    assert f"U+{ord(char):04X}" in exc.value.reply.text
    with pytest.raises(ParseError) as exc:
        parse_rcpt(f"TO:<{address}>", smtputf8=True)
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (553, "5.1.3")


def test_address_literals() -> None:
    assert parse_mail("FROM:<a@[192.0.2.1]>").sender.domain == "[192.0.2.1]"
    assert parse_mail("FROM:<a@[IPv6:2001:db8::1]>").sender.domain == "[ipv6:2001:db8::1]"
    with pytest.raises(ParseError):
        parse_mail("FROM:<a@[300.1.1.1]>")


@pytest.mark.parametrize(
    ("arg", "code", "enhanced", "words"),
    [
        ("<a@b.example>", 501, "5.5.4", "MAIL FROM"),
        ("FROM:a@b.example", 501, "5.5.4", "angle brackets"),
        ("FROM:<a@b.example", 501, "5.5.4", "missing"),
        ("FROM:<a@b.example>SIZE=1", 501, "5.5.4", "space"),
        ("FROM:<a@b.example> SIZE=x", 501, "5.5.4", "SIZE"),
        ("FROM:<a@b.example> BODY=BINARYMIME", 501, "5.5.4", "BODY"),
        ("FROM:<a@b.example> FOO=1", 555, "5.5.4", "FOO"),
        ("FROM:<a@b.example> SMTPUTF8=1", 501, "5.5.4", "value"),
        ("FROM:<a..b@b.example>", 553, "5.1.7", "local part"),
        ("FROM:<ab.example>", 553, "5.1.7", "domain is needed"),
        ("FROM:<a@-bad-.example>", 553, "5.1.7", "invalid domain"),
        ("FROM:<a@b..example>", 553, "5.1.7", "invalid domain"),
        ("FROM:<" + "x" * 65 + "@b.example>", 553, "5.1.7", "64"),
    ],
)
def test_mail_errors(arg: str, code: int, enhanced: str, words: str) -> None:
    with pytest.raises(ParseError) as exc:
        parse_mail(arg)
    reply = exc.value.reply
    assert (reply.code, reply.enhanced) == (code, enhanced)
    assert words in reply.text


def test_helo_session_refuses_parameters() -> None:
    with pytest.raises(ParseError) as exc:
        parse_mail("FROM:<a@b.example> SIZE=10", esmtp=False)
    assert exc.value.reply.code == 555


@pytest.mark.parametrize(
    ("arg", "code", "enhanced"),
    [
        ("TO:<>", 553, "5.1.3"),
        ("TO:<postmaster>", 553, "5.1.3"),
        ("FROM:<a@b.example>", 501, "5.5.4"),
        ("TO:<a@b.example> XFOO=BAR", 555, "5.5.4"),
        ("TO:<a b@c.example>", 553, "5.1.3"),
    ],
)
def test_rcpt_errors(arg: str, code: int, enhanced: str) -> None:
    with pytest.raises(ParseError) as exc:
        parse_rcpt(arg)
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (code, enhanced)


@pytest.mark.parametrize(
    "arg",
    [
        "FROM:<a@example.org\n>",  # "$" in a pattern matches before a final newline; the patterns use \Z
        "FROM:<a\n@example.org>",
        "FROM:<a@example.org> X-KEY\n=1",
    ],
)
def test_a_newline_at_the_end_of_a_part_is_refused(arg: str) -> None:
    with pytest.raises(ParseError) as err:
        parse_mail(arg)
    assert err.value.reply.code in (501, 553, 555)


def test_header_names_and_status_codes_refuse_a_final_newline() -> None:
    from mxgate.core.model import IncomingMessage

    msg = IncomingMessage(b"Subject: x\r\n\r\nbody\r\n", ())
    with pytest.raises(ValueError):
        msg.add_header("X-Injected\n", "1")


# --- DSN (RFC 3461) and REQUIRETLS (RFC 8689) parameters ----------------------------------------------------------


def test_dsn_mail_parameters() -> None:
    from mxgate.core.model import DsnRet

    m = parse_mail("FROM:<a@b.example> RET=hdrs ENVID=QQ+2B314+3D")
    assert (m.ret, m.envid, m.requiretls) == (DsnRet.HDRS, "QQ+314=", False)
    assert parse_mail("FROM:<a@b.example> RET=FULL").ret is DsnRet.FULL
    assert parse_mail("FROM:<> REQUIRETLS").requiretls
    plain = parse_mail("FROM:<a@b.example>")
    assert (plain.ret, plain.envid, plain.requiretls) == (None, None, False)


@pytest.mark.parametrize(
    "arg",
    [
        "FROM:<a@b.example> RET=BODY",
        "FROM:<a@b.example> RET",
        "FROM:<a@b.example> RET=FULL RET=HDRS",
        "FROM:<a@b.example> ENVID",
        "FROM:<a@b.example> ENVID=" + "x" * 101,
        "FROM:<a@b.example> ENVID=a+2",  # a truncated hex escape
        "FROM:<a@b.example> ENVID=a+2b",  # xtext hex is upper case
        "FROM:<a@b.example> ENVID=a+0A",  # a control character, even encoded
        "FROM:<a@b.example> ENVID=a+b",
        "FROM:<a@b.example> REQUIRETLS=yes",
    ],
)
def test_dsn_mail_parameter_errors(arg: str) -> None:
    with pytest.raises(ParseError) as exc:
        parse_mail(arg)
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (501, "5.5.4")


def test_dsn_rcpt_parameters() -> None:
    from mxgate.core.model import DsnNotify

    r = parse_rcpt("TO:<a@b.example> NOTIFY=success,Delay ORCPT=rfc822;Bob+2Bx@Example.ORG")
    assert r.dsn.notify == frozenset({DsnNotify.SUCCESS, DsnNotify.DELAY})
    assert r.dsn.orcpt == ("rfc822", "Bob+x@Example.ORG")
    assert (r.dsn.notify_text, r.dsn.orcpt_text) == ("SUCCESS,DELAY", "rfc822;Bob+x@Example.ORG")
    never = parse_rcpt("TO:<a@b.example> NOTIFY=NEVER").dsn
    assert never.notify == frozenset({DsnNotify.NEVER}) and never.notify_text == "NEVER" and never.orcpt is None
    assert parse_rcpt("TO:<a@b.example>").dsn.notify is None


@pytest.mark.parametrize(
    "arg",
    [
        "TO:<a@b.example> NOTIFY=NEVER,FAILURE",
        "TO:<a@b.example> NOTIFY=SOMETIMES",
        "TO:<a@b.example> NOTIFY=",
        "TO:<a@b.example> NOTIFY",
        "TO:<a@b.example> NOTIFY=FAILURE,FAILURE",
        "TO:<a@b.example> NOTIFY=FAILURE NOTIFY=DELAY",
        "TO:<a@b.example> ORCPT=a@b.example",  # no address type
        "TO:<a@b.example> ORCPT=rfc822;",
        "TO:<a@b.example> ORCPT=rfc822;a+zz@b.example",
        "TO:<a@b.example> ORCPT=;a@b.example",
        "TO:<a@b.example> ORCPT=rfc822;" + "a" * 500,
    ],
)
def test_dsn_rcpt_parameter_errors(arg: str) -> None:
    with pytest.raises(ParseError) as exc:
        parse_rcpt(arg)
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (501, "5.5.4")
