"""AUTH mechanisms without sockets (:mod:`mxgate.core.smtp.sasl`): what is challenged, what a client's line
gives, which replies refuse it."""

from __future__ import annotations

import base64

import pytest

from mxgate.core.smtp import sasl
from mxgate.core.smtp.sasl import Challenge, Credentials, Login, Plain
from mxgate.core.smtp.session import R


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("PLAIN", ("PLAIN", None)),
        ("plain AGEAYg==", ("PLAIN", "AGEAYg==")),
        ("  login   dXNlcg== ", ("LOGIN", "dXNlcg==")),
        (None, sasl.AUTH_SYNTAX),
        ("", sasl.AUTH_SYNTAX),
        ("PLAIN a b", sasl.AUTH_SYNTAX),
    ],
)
def test_parse_auth(arg: str | None, expected: object) -> None:
    assert sasl.parse_auth(arg) == expected


def test_mechanisms() -> None:
    assert sasl.MECHANISMS == ("PLAIN", "LOGIN")
    assert isinstance(sasl.new_exchange("PLAIN"), Plain)
    assert isinstance(sasl.new_exchange("LOGIN"), Login)
    assert sasl.new_exchange("CRAM-MD5") is None
    assert sasl.new_exchange("plain") is None  # the caller upper-cases (parse_auth)


def test_plain_initial_response() -> None:
    ex = Plain()
    assert not ex.veto_first
    creds = ex.start(b64(b"\0user@example.org\0secret"))
    assert creds == Credentials("user@example.org", "secret", "")
    assert isinstance(creds, Credentials) and creds.authzid_ok


def test_plain_after_challenge() -> None:
    ex = Plain()
    assert ex.start(None) == Challenge("")
    assert ex.respond(b64(b"u\0u\0p").encode() + b"  ") == Credentials("u", "p", "u")


def test_plain_other_authzid_is_not_ok() -> None:
    creds = Plain().start(b64(b"admin\0u\0p"))
    assert isinstance(creds, Credentials) and not creds.authzid_ok


@pytest.mark.parametrize(
    ("text", "reply"),
    [
        ("*", R.AUTH_CANCELLED),
        ("not base64!", R.AUTH_BAD64),
        (b64(b"u\0p"), sasl.PLAIN_SYNTAX),
        (b64(b"a\0b\0c\0d"), sasl.PLAIN_SYNTAX),
        (b64(b"\0\xff\0p"), R.AUTH_BAD64),
        ("=", sasl.PLAIN_SYNTAX),  # an empty response: no NULs
    ],
)
def test_plain_refusals(text: str, reply: object) -> None:
    assert Plain().start(text) == reply
    ex = Plain()
    ex.start(None)
    assert ex.respond(text.encode()) == reply


def test_login_dialogue() -> None:
    ex = Login()
    assert ex.veto_first
    assert ex.start(None) == Challenge("VXNlcm5hbWU6")
    assert ex.respond(b64(b"user").encode()) == Challenge("UGFzc3dvcmQ6")
    assert ex.respond(b64(b"pass").encode()) == Credentials("user", "pass")


def test_login_with_initial_username() -> None:
    ex = Login()
    assert ex.start(b64(b"user")) == Challenge("UGFzc3dvcmQ6")
    assert ex.respond(b"=") == Credentials("user", "")


def test_login_refusals() -> None:
    assert Login().start("*") == R.AUTH_BAD64  # on the AUTH line "*" is just bad base64
    ex = Login()
    ex.start(None)
    assert ex.respond(b"*") == R.AUTH_CANCELLED
    ex = Login()
    ex.start(None)
    ex.respond(b64(b"user").encode())
    assert ex.respond(b"%%%") == R.AUTH_BAD64
    assert Login().start(b64(b"\xff")) == R.AUTH_BAD64
