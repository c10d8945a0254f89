"""The client's reverse DNS decision (FCrDNS) without a resolver: PTR and forward answers in, verdict out."""

from __future__ import annotations

import dns.rdata
import dns.rdataclass
import dns.rdatatype

from mxgate.core.dns_answers import AnswerKind, DnsAnswer, DnssecStatus
from mxgate.core.model import ReverseDnsStatus
from mxgate.core.smtp.rdns import MAX_PTR_NAMES, ReverseDns, confirm, ptr_names, reverse_query
from mxgate.core.smtp.transaction import received_header


def answer(
    name: str, rdtype: str, *values: str, kind: AnswerKind = AnswerKind.ANSWER, status: str = "insecure"
) -> DnsAnswer:
    records = tuple(dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), v) for v in values)
    return DnsAnswer(name, rdtype, kind, DnssecStatus(status), records, 300, name, ())


PTR_NAME = "1.0.0.127.in-addr.arpa"


def test_forward_confirmed_name_is_verified() -> None:
    ptr = answer(PTR_NAME, "PTR", "Other.Example.", "Client.Example.")
    forward = {
        "other.example": answer("other.example", "A", "127.0.0.9"),
        "client.example": answer("client.example", "A", "127.0.0.5", "127.0.0.1"),
    }
    assert confirm("127.0.0.1", ptr, forward) == ReverseDns(ReverseDnsStatus.VERIFIED, "client.example")


def test_ptr_that_does_not_point_back_is_unverified() -> None:
    ptr = answer(PTR_NAME, "PTR", "mail.bank.example.")
    forward = {"mail.bank.example": answer("mail.bank.example", "A", "192.0.2.1")}
    assert confirm("127.0.0.1", ptr, forward) == ReverseDns(ReverseDnsStatus.UNVERIFIED)
    nx = {"mail.bank.example": answer("mail.bank.example", "A", kind=AnswerKind.NXDOMAIN)}
    assert confirm("127.0.0.1", ptr, nx).status is ReverseDnsStatus.UNVERIFIED


def test_no_ptr_and_failures() -> None:
    assert confirm("127.0.0.1", answer(PTR_NAME, "PTR", kind=AnswerKind.NXDOMAIN), {}).status is ReverseDnsStatus.NONE
    assert confirm("127.0.0.1", answer(PTR_NAME, "PTR", kind=AnswerKind.NODATA), {}).status is ReverseDnsStatus.NONE
    err = answer(PTR_NAME, "PTR", kind=AnswerKind.ERROR, status="indeterminate")
    assert confirm("127.0.0.1", err, {}) == ReverseDns.failed()
    bogus = answer(PTR_NAME, "PTR", "client.example.", status="bogus")
    assert confirm("127.0.0.1", bogus, {}).status is ReverseDnsStatus.FAILED
    # a forward lookup that failed (never "does not point back")
    ptr = answer(PTR_NAME, "PTR", "client.example.")
    failed = {"client.example": answer("client.example", "A", kind=AnswerKind.ERROR, status="indeterminate")}
    assert confirm("127.0.0.1", ptr, failed).status is ReverseDnsStatus.FAILED


def test_ipv6_and_bounded_ptr_names() -> None:
    ptr = answer("x.ip6.arpa", "PTR", "v6.example.")
    assert (
        confirm("2001:db8::1", ptr, {"v6.example": answer("v6.example", "AAAA", "2001:DB8:0::1")}).name == "v6.example"
    )
    many = answer(PTR_NAME, "PTR", *(f"n{i}.example." for i in range(MAX_PTR_NAMES + 5)))
    assert len(ptr_names(many)) == MAX_PTR_NAMES


def test_received_header_names_only_a_verified_client() -> None:
    from datetime import UTC, datetime

    def header(name: str | None, ip: str = "192.0.2.1") -> bytes:
        return received_header(
            helo="helo.example", ip=ip, hostname="mx.example", esmtp=True, tls=None, auth=False, ident="1",
            recipients=(), when=datetime(2026, 1, 1, tzinfo=UTC), reverse_dns=name,
        )  # fmt: skip

    assert header("client.example").startswith(b"Received: from helo.example (client.example [192.0.2.1])\r\n")
    assert header(None).startswith(b"Received: from helo.example (unknown [192.0.2.1])\r\n")
    assert header(None, "2001:db8::1").startswith(b"Received: from helo.example (unknown [IPv6:2001:db8::1])\r\n")
    assert header("a(b).example").startswith(b"Received: from helo.example (a?b?.example [192.0.2.1])")


def test_reverse_query_names_the_ptr_and_the_forward_type() -> None:
    assert reverse_query("192.0.2.7") == ("192.0.2.7", "7.2.0.192.in-addr.arpa.", "A")
    assert reverse_query("::ffff:192.0.2.7") == ("192.0.2.7", "7.2.0.192.in-addr.arpa.", "A")  # IPv4-mapped
    ip, name, rdtype = reverse_query("2001:db8::5") or ("", "", "")
    assert ip == "2001:db8::5" and rdtype == "AAAA"
    assert name == "5." + "0." * 23 + "8.b.d.0.1.0.0.2.ip6.arpa."
    assert reverse_query("not an address") is None
    assert reverse_query("192.0.2.7") == reverse_query("192.0.2.7")  # (remembered)
