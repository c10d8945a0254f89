"""Message metadata as a typed value (``MessageMeta``), its one queue form, and the header view categorizer hooks
get (``MessageHeaders``). Pure: no queue, no socket."""

from __future__ import annotations

import dataclasses

import pytest

from mxgate import IncomingMessage, MessageHeaders, MessageMeta
from mxgate.core.metadata import NO_META

RECEIVED = MessageMeta(
    listener="smtp",
    inbound_connector="partner",
    session="01HX",
    client_ip="192.0.2.7",
    helo="mx.example.net",
    tls_version="TLSv1.3",
    tls_cipher="TLS_AES_128_GCM_SHA256",
    auth_user="alice",
    internal=True,
    body_8bit=True,
    smtputf8=True,
    extra={"route.to": "archive", "score": "3"},
)


def test_every_field_survives_the_queue_form() -> None:
    assert MessageMeta.from_pairs(RECEIVED.to_pairs()) == RECEIVED
    marks = MessageMeta(
        origin="tlsrpt", tls_required_no=True, dsn_for="Q1", expanded_from=("Q2", "list@example.org"), categorized=True
    )
    assert MessageMeta.from_pairs(marks.to_pairs()) == marks
    assert NO_META.to_pairs() == () and MessageMeta.from_pairs(()) == NO_META


def test_the_queue_form_uses_the_keys_queues_always_had() -> None:
    """Older versions read what this one writes, and the other way round: the keys and values are unchanged."""
    assert dict(RECEIVED.to_pairs()) == {
        "listener": "smtp",
        "connector": "partner",
        "session": "01HX",
        "client_ip": "192.0.2.7",
        "helo": "mx.example.net",
        "tls": "TLSv1.3",
        "cipher": "TLS_AES_128_GCM_SHA256",
        "auth_user": "alice",
        "internal": "yes",
        "body": "8BITMIME",
        "smtputf8": "yes",
        "extra.route.to": "archive",
        "extra.score": "3",
    }
    assert MessageMeta(categorized=True, expanded_from=("Q2", "a@b.example")).to_pairs() == (
        ("expanded_from", "Q2 a@b.example"),
        ("categorized", "1"),
    )
    assert MessageMeta(tls_required_no=True, dsn_for="Q3").to_pairs() == (("tls_required", "no"), ("dsn_for", "Q3"))


def test_old_values_and_unknown_keys() -> None:
    meta = MessageMeta.from_pairs(
        [("body", "7BIT"), ("smtputf8", "no"), ("tls_required", "yes"), ("categorized", "0"), ("someday", "x")]
    )
    assert not meta.body_8bit and not meta.smtputf8 and not meta.tls_required_no and not meta.categorized
    assert meta.extra == {"someday": "x"}  # not dropped: kept under its own name
    assert MessageMeta.from_pairs([("body", "8bitmime")]).body_8bit


def test_it_is_frozen_and_hashable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RECEIVED.client_ip = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        RECEIVED.extra["score"] = "4"  # type: ignore[index]
    source = {"a": "1"}
    meta = MessageMeta(extra=source)
    source["a"] = "2"  # a copy was taken
    assert meta.extra == {"a": "1"}
    assert hash(meta) == hash(MessageMeta(extra={"a": "other"}))  # extra is not hashed, but compared
    assert meta != MessageMeta(extra={"a": "other"})
    assert dataclasses.replace(RECEIVED, categorized=True).extra == RECEIVED.extra


def test_of_takes_the_typed_value_none_or_pairs() -> None:
    assert MessageMeta.of(RECEIVED) is RECEIVED
    assert MessageMeta.of(None) == NO_META
    assert MessageMeta.of([("origin", "tlsrpt"), ("tls_required", "no")]) == MessageMeta(
        origin="tlsrpt", tls_required_no=True
    )


def test_receive_hooks_set_plugin_metadata_with_checked_keys() -> None:
    message = IncomingMessage(b"Subject: x\r\n\r\nhi\r\n", (("Subject", "x"),))
    message.set_meta("route-by-header.to", "archive")
    message.set_meta("route-by-header.to", "relay")  # replaced
    assert message.meta == {"route-by-header.to": "relay"}
    for bad in ("", "a b", "x=y", ".lead", "a" * 65, "é"):
        with pytest.raises(ValueError, match="invalid metadata key"):
            message.set_meta(bad, "v")
    with pytest.raises(TypeError):
        message.set_meta("n", 3)  # type: ignore[arg-type]


# -- headers -----------------------------------------------------------------------------------------------------

RAW = (
    b"Received: from a by b\r\n"
    b"Received: from c\r\n by d\r\n"
    b"X-Route-To:  Archive \r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
    b"X-Raw: caf\xc3\xa9 8-bit\r\n"
    b"\r\n"
    b"X-Route-To: in-the-body\r\n"
)


def test_header_lookup_is_case_insensitive_and_stops_at_the_body() -> None:
    headers = MessageHeaders.of_message(RAW)
    assert headers.get("x-route-to") == "Archive"
    assert headers.get_all("X-ROUTE-TO") == ("Archive",)  # the one in the body is not a header
    assert headers.get_all("received") == ("from a by b", "from c by d")  # unfolded
    assert "SUBJECT" in headers and "Cc" not in headers and 3 not in headers
    assert headers.get("Cc") is None and headers.get("Cc", "none") == "none"
    assert list(headers) == ["Received", "Received", "X-Route-To", "Subject", "X-Raw"]
    assert len(headers) == 5


def test_header_values_are_decoded() -> None:
    headers = MessageHeaders.of_message(RAW)
    assert headers.get("Subject") == "café"  # RFC 2047
    assert headers.get("X-Raw") == "café 8-bit"  # raw UTF-8 (SMTPUTF8)
    assert headers.items()[2] == ("X-Route-To", "Archive")


def test_odd_header_sections() -> None:
    assert len(MessageHeaders()) == 0 and MessageHeaders().get("Subject") is None
    assert MessageHeaders.of_message(b"no header section at all").items() == ()
    weird = MessageHeaders(b"To: <<<@@@>>>,\r\nDate: not a date\r\nFrom: =?bad?x?zz?=\r\n")
    assert weird.get("To") is not None and weird.get("Date") == "not a date"
    assert weird.get("From") is not None
    assert MessageHeaders.of_message(b"Subject: only\r\n").get("subject") == "only"  # no body separator
