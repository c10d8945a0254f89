"""Receive-side decisions without a socket: connectors, relay rules, partner restrictions, limits, EHLO."""

from __future__ import annotations

from typing import Any

import pytest

from mxgate.core.config import build_config
from mxgate.core.model import Address, Envelope, Reply, TlsState
from mxgate.core.smtp.parse import ParseError, parse_mail, parse_rcpt
from mxgate.core.smtp.session import R, ReceivePolicy, ReceiveState, reject_reason

DOC: dict[str, Any] = {
    "server": {"hostname": "mx.example.org", "accepted_domains": ["example.org"], "max_recipients": 2},
    "listener": [{"name": "smtp", "address": "127.0.0.1:2525"}],
    "inbound_connector": [
        {"name": "exo", "sender_ips": ["10.1.0.0/16"], "may_relay": True, "require_tls": True},
        {
            "name": "partner",
            "sender_ips": ["10.2.0.0/16"],
            "sender_domains": ["partner.example"],
            "restrict_domains_to_ips": True,
            "accepted_domains": ["partner-only.example"],
        },
        {
            "name": "certpartner",
            "tls_sender_certificate_name": "mail.certpartner.example",
            "sender_domains": ["certpartner.example"],
            "restrict_domains_to_certificate": True,
            "may_relay": True,
        },
    ],
    "outbound_connector": [
        {"name": "internal", "recipient_domains": ["example.org", "partner-only.example"], "smart_hosts": ["10.9.9.9"]},
        {"name": "internet", "recipient_domains": ["*.com", "*.net"], "use_mx": True},
    ],
}


def policy(**listener: Any) -> ReceivePolicy:
    doc = {**DOC, "listener": [{**DOC["listener"][0], **listener}]}
    config = build_config(doc, check_files=False)
    return ReceivePolicy(config, config.listener[0], tls_available=True)


TLS = TlsState("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256)


def state(ip: str, p: ReceivePolicy, *, tls: TlsState | None = None, mail: str | None = None) -> ReceiveState:
    st = ReceiveState(peer_ip=ip, tls=tls, helo="client.example", esmtp=True)
    st.connector = p.select_connector(st)
    if mail is not None:
        assert p.check_mail(st, parse_mail(f"FROM:<{mail}>")) is None
        st.envelope = Envelope(mail_from=parse_mail(f"FROM:<{mail}>").sender)
    return st


def test_anonymous_internet_only_for_accepted_domains() -> None:
    p = policy()
    st = state("192.0.2.7", p, mail="someone@elsewhere.com")
    assert st.connector is None
    assert p.check_rcpt(st, Address("u", "example.org")) is None
    relay = p.check_rcpt(st, Address("u", "victim.com"))
    assert relay is not None and (relay.code, relay.enhanced) == (550, "5.7.1") and "Relay" in relay.text
    # not even with a connector's extra accepted domain
    assert p.check_rcpt(st, Address("u", "partner-only.example")) is not None


def test_connector_may_relay_but_needs_tls() -> None:
    p = policy()
    st = state("10.1.2.3", p)
    assert st.connector is not None and st.connector.name == "exo"
    need = p.check_mail(st, parse_mail("FROM:<a@example.org>"))
    assert need is not None and (need.code, need.enhanced) == (530, "5.7.0") and "exo" not in need.text
    st = state("10.1.2.3", p, tls=TLS, mail="a@example.org")
    assert p.check_rcpt(st, Address("u", "victim.com")) is None


def test_authenticated_user_may_relay() -> None:
    p = policy()
    st = state("192.0.2.7", p, mail="a@example.org")
    st.auth_user = "alice"
    assert p.check_rcpt(st, Address("u", "anywhere.com")) is None


def test_partner_domain_restricted_to_its_ips() -> None:
    p = policy()
    outsider = state("192.0.2.7", p)
    refused = p.check_mail(outsider, parse_mail("FROM:<ceo@partner.example>"))
    assert refused is not None and (refused.code, refused.enhanced) == (550, "5.7.1")
    assert refused.text == "Mail from partner.example is not accepted from this address"  # no connector name
    inside = state("10.2.0.9", p, mail="ceo@partner.example")
    assert inside.tx_connector is not None and inside.tx_connector.name == "partner"
    assert p.check_rcpt(inside, Address("u", "partner-only.example")) is None


def test_connector_scoped_to_sender_domains() -> None:
    p = policy()
    st = state("10.2.0.9", p, mail="x@other.com")  # partner IP, but not the partner's domain
    assert st.tx_connector is None
    assert p.check_rcpt(st, Address("u", "partner-only.example")) is not None


def test_partner_domain_restricted_to_certificate() -> None:
    p = policy()
    refused = p.check_mail(state("192.0.2.7", p, tls=TLS), parse_mail("FROM:<a@certpartner.example>"))
    assert refused is not None and refused.enhanced == "5.7.1" and "certificate" in refused.text
    assert refused.text == (
        "Mail from certpartner.example is only accepted over TLS with its sender's client certificate"
    )  # the domain, not our connector's name
    wrong = TlsState(
        "TLSv1.3", "X", 256, peer_certificate_names=("mail.other.example",), peer_certificate_verified=True
    )
    assert p.check_mail(state("192.0.2.7", p, tls=wrong), parse_mail("FROM:<a@certpartner.example>")) is not None
    good = TlsState(
        "TLSv1.3", "X", 256, peer_certificate_names=("mail.certpartner.example",), peer_certificate_verified=True
    )
    st = state("192.0.2.7", p, tls=good, mail="a@certpartner.example")
    assert st.connector is not None and st.connector.name == "certpartner"
    assert p.check_rcpt(st, Address("u", "relayed.com")) is None
    unverified = TlsState("TLSv1.3", "X", 256, peer_certificate_names=("mail.certpartner.example",))
    assert state("192.0.2.7", p, tls=unverified).connector is None


def test_no_route_for_accepted_domain_is_refused() -> None:
    doc = {**DOC, "outbound_connector": [{"name": "net", "recipient_domains": ["*.com"], "use_mx": True}]}
    config = build_config(doc, check_files=False)
    p = ReceivePolicy(config, config.listener[0], tls_available=False)
    st = state("192.0.2.7", p, mail="a@b.com")
    reply = p.check_rcpt(st, Address("u", "example.org"))
    assert reply is not None and (reply.code, reply.enhanced) == (550, "5.1.2") and "No route" in reply.text


def test_limits_and_sequence() -> None:
    p = policy(max_message_size=1000)
    st = ReceiveState(peer_ip="192.0.2.7")
    assert p.check_mail(st, parse_mail("FROM:<a@b.com>")) is R.NEED_EHLO
    st.helo = "x"
    assert p.check_mail(st, parse_mail("FROM:<a@b.com> SIZE=1001")) is R.TOO_BIG
    assert p.check_rcpt(st, Address("u", "example.org")) is R.NEED_MAIL
    st = state("192.0.2.7", p, mail="a@b.com")
    st.envelope = Envelope(mail_from=Address("a", "b.com"), rcpt_tos=(Address("1", "example.org"),) * 2)
    assert p.check_rcpt(st, Address("u", "example.org")) is R.TOO_MANY_RCPTS
    assert p.check_mail(st, parse_mail("FROM:<a@b.com>")) is R.NESTED_MAIL


def test_require_tls_listener() -> None:
    p = policy(require_tls=True, tls_cert="c.pem", tls_key="k.pem")
    assert p.check_mail(state("192.0.2.7", p), parse_mail("FROM:<a@b.com>")) is R.NEED_TLS


def test_ehlo_offers_auth_only_under_tls() -> None:
    p = policy()
    plain = state("192.0.2.7", p)
    lines = p.ehlo_lines(plain)
    for ext in ("PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "STARTTLS", "SIZE 52428800"):
        assert ext in lines
    assert not any(line.startswith("AUTH") for line in lines)
    assert p.check_auth(plain) is R.AUTH_NEEDS_TLS
    secured = state("192.0.2.7", p, tls=TLS)
    assert "AUTH PLAIN LOGIN" in p.ehlo_lines(secured) and "STARTTLS" not in p.ehlo_lines(secured)
    trusted = policy(allow_plaintext_auth=True)
    assert "AUTH PLAIN LOGIN" in trusted.ehlo_lines(state("192.0.2.7", trusted))


def test_reset_after_tls_forgets_everything() -> None:
    st = ReceiveState(peer_ip="1.2.3.4", helo="x", esmtp=True, auth_user="u", envelope=Envelope(Address("a", "b")))
    st.reset_after_tls()
    assert (st.helo, st.esmtp, st.auth_user, st.envelope) == (None, False, None, Envelope())


def test_error_budget() -> None:
    p = policy(max_errors=3)
    st = ReceiveState(peer_ip="1.2.3.4")
    assert [p.error(st) for _ in range(3)] == [False, False, True]


def test_postmaster_without_domain_goes_to_our_first_accepted_domain() -> None:
    p = policy()
    assert p.postmaster_domain == "example.org"
    rcpt = parse_rcpt("TO:<Postmaster>", postmaster_domain=p.postmaster_domain).recipient
    assert rcpt == Address("postmaster", "example.org")
    st = state("192.0.2.7", p, mail="someone@elsewhere.com")
    assert p.check_rcpt(st, rcpt) is None  # anonymous internet mail to postmaster is accepted
    # without a postmaster domain the bare name is refused as syntax
    with pytest.raises(ParseError, match="a domain is needed"):
        parse_rcpt("TO:<postmaster>")


def test_listener_without_auth_never_offers_or_accepts_it() -> None:
    p = policy(auth=False)
    st = state("192.0.2.7", p, tls=TLS)
    assert not any(line.startswith("AUTH") for line in p.ehlo_lines(st))
    assert p.check_auth(st) == R.AUTH_UNAVAILABLE


# --- CHUNKING / BDAT (RFC 3030) -----------------------------------------------------------------------------------


def test_bdat_arguments() -> None:
    from mxgate.core.smtp.parse import parse_bdat

    assert parse_bdat(b"0 LAST") == (0, True)
    assert parse_bdat(b"1000") == (1000, False)
    assert parse_bdat(b"12 last") == (12, True)
    for bad in (b"", b"-1", b"1 2", b"1 LAST x", b"LAST", b"1e3", b"\xd9\xa1", b"1 NOTLAST", b"9" * 21, b"1  LAST"):
        with pytest.raises(ParseError) as exc:
            parse_bdat(bad)
        assert (exc.value.reply.code, exc.value.reply.enhanced) == (501, "5.5.4"), bad


def test_bdat_sequence_and_size_across_chunks() -> None:
    p = policy(max_message_size=100)
    st = ReceiveState(peer_ip="192.0.2.7")
    assert p.check_bdat(st, 10) is R.NEED_EHLO
    st = state("192.0.2.7", p)
    assert p.check_bdat(st, 10) is R.NEED_MAIL
    st = state("192.0.2.7", p, mail="a@b.com")
    assert p.check_bdat(st, 10) is R.NEED_RCPT
    st.envelope = Envelope(mail_from=Address("a", "b.com"), rcpt_tos=(Address("u", "example.org"),))
    assert p.check_bdat(st, 0) is None and p.check_bdat(st, 100) is None
    assert p.check_bdat(st, 101) is R.TOO_BIG
    st.chunks = bytearray(b"x" * 60)
    assert p.check_bdat(st, 40) is None
    assert p.check_bdat(st, 41) is R.TOO_BIG  # the limit holds for the message, not each chunk
    assert (R.TOO_BIG.code, R.TOO_BIG.enhanced) == (552, "5.3.4")
    # BDAT and DATA do not mix (RFC 3030 §2): 503 5.5.1
    assert p.check_data(st) is R.DATA_AFTER_BDAT
    assert (R.DATA_AFTER_BDAT.code, R.DATA_AFTER_BDAT.enhanced) == (503, "5.5.1")
    st.reset_transaction()
    assert st.chunks is None and p.check_data(st) is R.NEED_MAIL


def test_bdat_needs_tls_on_a_require_tls_listener() -> None:
    p = policy(require_tls=True, tls_cert="c.pem", tls_key="k.pem")
    st = state("192.0.2.7", p)
    st.envelope = Envelope(mail_from=Address("a", "b.com"), rcpt_tos=(Address("u", "example.org"),))
    assert p.check_bdat(st, 5) is R.NEED_TLS


@pytest.mark.parametrize(
    "text",
    [b"a: b\r\n\r\nbare LF\n.\r\n", b"a: b\r\n\r\nbare CR\r.\r\n", b"a: b\r\n\r\nx\n.\nMAIL FROM:<x@y>\r\n", b"a\r"],
)
def test_bdat_message_smuggling_rules(text: bytes) -> None:
    assert policy().check_text(text) is R.BARE_LF_DATA


def test_bdat_message_line_length_and_no_dot_rules() -> None:
    p = policy()
    assert p.check_text(b"a: b\r\n\r\n" + b"x" * 999 + b"\r\n") is R.TEXT_LINE_TOO_LONG
    assert p.check_text(b"a: b\r\n\r\n" + b"x" * 998 + b"\r\n") is None
    # a line of "." is only text in a chunk: no end of data, no dot-stuffing
    assert p.check_text(b"a: b\r\n\r\n.\r\n..\r\n") is None
    assert p.check_text(b"") is None


def test_ehlo_offers_chunking() -> None:
    p = policy()
    assert "CHUNKING" in p.ehlo_lines(state("192.0.2.7", p))


# --- DSN and REQUIRETLS -------------------------------------------------------------------------------------------


def test_dsn_offered_and_requiretls_only_over_tls() -> None:
    p = policy()
    plain = state("192.0.2.7", p)
    assert "DSN" in p.ehlo_lines(plain) and "REQUIRETLS" not in p.ehlo_lines(plain)
    refused = p.check_mail(plain, parse_mail("FROM:<a@b.com> REQUIRETLS"))
    assert refused is R.REQUIRETLS_NEEDS_TLS and (refused.code, refused.enhanced) == (530, "5.7.10")
    secured = state("192.0.2.7", p, tls=TLS)
    assert "REQUIRETLS" in p.ehlo_lines(secured)
    assert p.check_mail(secured, parse_mail("FROM:<a@b.com> REQUIRETLS")) is None


def test_connector_max_message_size_lowers_the_listener_limit_rfc1870() -> None:
    """An inbound connector's ``max_message_size`` lowers the listener's limit for its clients (never raises it):
    advertised in SIZE once the connector is known, checked at MAIL SIZE= and across BDAT chunks (552 5.3.4)."""
    doc = {**DOC, "inbound_connector": [{**DOC["inbound_connector"][0], "max_message_size": 1000}]}
    doc["inbound_connector"].append({"name": "big", "sender_ips": ["10.3.0.0/16"], "max_message_size": 10**12})
    config = build_config(doc, check_files=False)
    p = ReceivePolicy(config, config.listener[0], tls_available=True)
    exo = state("10.1.2.3", p, tls=TLS)
    assert exo.connector is not None and exo.connector.name == "exo"
    assert "SIZE 1000" in p.ehlo_lines(exo)
    assert p.check_mail(exo, parse_mail("FROM:<a@b.com> SIZE=1001")) is R.TOO_BIG
    assert p.check_mail(exo, parse_mail("FROM:<a@b.com> SIZE=1000")) is None
    exo.envelope = Envelope(mail_from=Address("a", "b.com"), rcpt_tos=(Address("u", "example.org"),))
    assert p.check_bdat(exo, 1000) is None and p.check_bdat(exo, 1001) is R.TOO_BIG
    anonymous = state("192.0.2.7", p)
    assert f"SIZE {config.server.max_message_size}" in p.ehlo_lines(anonymous)
    big = state("10.3.0.1", p)  # a connector cannot raise the listener's limit
    assert f"SIZE {config.server.max_message_size}" in p.ehlo_lines(big)


@pytest.mark.parametrize(
    ("reply", "label"),
    [
        (Reply(554, "5.7.1", "Relay access denied"), "relay"),
        (Reply(550, "5.7.1", "Sender refused"), "sender_restriction"),
        (R.NEED_TLS, "tls_required"),
        (R.TOO_BIG, "size"),
        (R.BARE_LF_DATA, "smuggling"),
        (R.PLUGIN_ERROR, "plugin"),
        (Reply(550, "5.1.2", "No route"), "no_route"),
        (Reply(550, "5.1.1", "No such user"), "policy"),
        (Reply(451, "4.7.1", "Later"), "tempfail"),
    ],
)
def test_reject_reason_labels_are_bounded(reply: Reply, label: str) -> None:
    assert reject_reason(reply) == label
