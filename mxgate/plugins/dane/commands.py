"""``mxgate dane ...``: ``tlsa`` (the record to publish), ``check-inbound`` (does what we publish cover what we
serve), ``explain`` (the per-MX DANE view, posttls-finger's job). Built on the public command helpers and a
command :class:`Runtime`; ``explain`` decides through the hooks delivery calls."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Final

from cryptography import x509

from mxgate import (
    Address,
    Destination,
    NextHop,
    OutboundConnector,
    QueuedMessage,
    QueuedRecipient,
    RecipientStatus,
    Runtime,
    add_config_arg,
    command_runtime,
    load_from_args,
)
from mxgate.plugins.dane.examine import HostState
from mxgate.plugins.dane.inbound import check_inbound, starttls_probe, tlsa_for_file
from mxgate.plugins.dane.policy import DaneMode, analyse
from mxgate.plugins.dane.records import make_tlsa
from mxgate.plugins.dane.verify import verify_chain

__all__ = ["cmd_check_inbound", "cmd_explain", "cmd_tlsa", "explain_dane", "format_explain", "register_commands"]

#: The queue id routing hooks see for ``mxgate dane explain`` (its message is not in the queue).
EXPLAIN_QUEUE_ID: Final = "dane-explain"


def register_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``mxgate dane tlsa | check-inbound | explain``."""
    p = subparsers.add_parser("dane", help="DANE (RFC 7672): TLSA records to publish, inbound checks, per-MX view")
    sub = p.add_subparsers(dest="dane_command", metavar="ACTION", required=True)

    t = sub.add_parser("tlsa", help="print the TLSA record to publish for a certificate")
    t.add_argument("--cert", required=True, metavar="FILE", help="PEM certificate or chain (leaf first)")
    t.add_argument("--usage", type=int, default=3, choices=(2, 3), help="3 DANE-EE (default) or 2 DANE-TA")
    t.add_argument("--selector", type=int, default=1, choices=(0, 1), help="0 certificate, 1 public key (default)")
    t.add_argument("--matching", type=int, default=1, choices=(0, 1, 2), help="0 full, 1 SHA2-256, 2 SHA2-512")
    t.add_argument("--host", help="print a whole RR for _PORT._tcp.HOST")
    t.add_argument("--port", type=int, default=25)
    t.set_defaults(func=cmd_tlsa)

    c = sub.add_parser("check-inbound", help="does our published TLSA match the certificate we serve?")
    c.add_argument("host", help="our MX host name (the TLSA base domain)")
    c.add_argument("--port", type=int, default=25)
    c.add_argument("--address", help="connect here instead of the host's addresses")
    c.add_argument("--cert", metavar="FILE", help="the certificate we mean to serve (default: listener tls_cert)")
    c.add_argument(
        "--next-cert", metavar="FILE", action="append", default=[], help="next certificate (rollover); repeatable"
    )
    c.add_argument("--json", action="store_true")
    add_config_arg(c)
    c.set_defaults(func=cmd_check_inbound)

    e = sub.add_parser("explain", help="per MX: TLSA records, usability, effective DANE policy (--connect: TLS)")
    e.add_argument("domain")
    e.add_argument("--connect", action="store_true", help="handshake with each MX: chain and matching record")
    e.add_argument("--port", type=int, help="SMTP port (default: the routing connector's mx_port)")
    e.add_argument("--json", action="store_true")
    add_config_arg(e)
    e.set_defaults(func=cmd_explain)


def cmd_tlsa(args: argparse.Namespace) -> int:
    try:
        rec = tlsa_for_file(args.cert, args.usage, args.selector, args.matching)
    except (OSError, ValueError) as exc:
        print(f"mxgate: {exc}", file=sys.stderr)
        return 1
    if args.host:
        print(f"_{args.port}._tcp.{args.host.rstrip('.')}. IN TLSA {rec.text}")
    else:
        print(rec.text)
    return 0


def _configured_cert(config: Any) -> str | None:
    for listener in config.listener:
        if listener.tls_cert:
            return str(config.path(listener.tls_cert))
    return None


def cmd_check_inbound(args: argparse.Namespace) -> int:
    config, plugins = load_from_args(args)

    async def run() -> dict[str, Any]:
        async with command_runtime(config, plugins) as runtime:
            assert runtime.resolver is not None
            return await check_inbound(
                runtime.resolver,
                args.host,
                args.port,
                address=args.address,
                cert_file=args.cert or _configured_cert(config),
                next_certs=args.next_cert,
            )

    report = asyncio.run(run())
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"TLSA {report['tlsa_name']}: {report['tlsa_kind']}, {report['tlsa_status']}")
        for r in report["records"]:
            print(f"  {'usable  ' if r['usable'] else 'UNUSABLE'} {r['record']}")
        for s in report["served"]:
            state = "matches" if s.get("matches") else "DOES NOT MATCH"
            print(f"  {s['address']}: {s.get('subject', '-')} {state} {s.get('matched') or ''}".rstrip())
        for w in report["warnings"]:
            print(f"warning: {w}")
        for e in report["errors"]:
            print(f"error: {e}")
        print("OK" if report["ok"] else "FAILED")
    return 0 if report["ok"] else 1


def _cert_view(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_after": f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
        "3 1 1": make_tlsa(cert).data.hex(),
        "2 0 1": make_tlsa(cert, 2, 0, 1).data.hex(),
    }


async def _connector(runtime: Runtime, domain: str) -> OutboundConnector | None:
    """The outbound connector routing decides for ``domain`` (``resolve_route``, as for a queued message)."""
    now = runtime.clock()
    rcpt = Address("postmaster", domain)
    probe = QueuedMessage(
        id=EXPLAIN_QUEUE_ID,
        sender="",
        recipients=(QueuedRecipient(str(rcpt), RecipientStatus.QUEUED, 0, None, None, now),),
        received_at=now,
        size=0,
        message_id=None,
        held=False,
    )
    route = await runtime.hooks.resolve_route(probe, rcpt)
    return runtime.config.outbound(route.connector) if route is not None else None


async def explain_dane(
    runtime: Runtime, domain: str, *, port: int | None = None, connect: bool = False
) -> dict[str, Any]:
    """The per-MX DANE view of ``domain`` (and, with ``connect``, what each MX presents): the connector from
    ``resolve_route`` and the next hop from ``resolve_next_hop``, the hooks delivery calls, then the analysis the
    DANE hook makes (with a fresh resolver self-test)."""
    resolver, config = runtime.resolver, runtime.config
    assert resolver is not None
    domain = domain.lower().rstrip(".")
    connector = await _connector(runtime, domain)
    mode = DaneMode.of(connector) if connector is not None else DaneMode.OPPORTUNISTIC
    base = connector or OutboundConnector(name="-", recipient_domains=("*",), use_mx=True)
    destination = Destination(replace(base, mx_port=port) if port else base, domain)
    next_hop = await runtime.hooks.resolve_next_hop(destination)
    if next_hop is None:
        next_hop = NextHop(destination, (), "error", error="no plugin resolved the next hop")
    test = await resolver.self_test(config.dns.self_test_secure, config.dns.self_test_bogus)
    effective = mode if mode is not DaneMode.NONE else DaneMode.OPPORTUNISTIC  # show what DANE would do
    analysis = await analyse(resolver, destination, next_hop, mode=effective, self_test=test)
    policy = analysis.policy
    hosts: list[dict[str, Any]] = []
    for hop, hd in zip(next_hop.hosts, analysis.hosts, strict=False):
        hp = policy.for_host(hd.host) if policy is not None else None
        view: dict[str, Any] = {
            "host": hd.host,
            "preference": hop.preference,
            "addresses": list(hop.addresses),
            "state": str(hd.state),
            "tlsa_name": hd.tlsa_name,
            "tlsa_status": hd.tlsa_status,
            "records": [
                {
                    "record": r.text,
                    "usable": r in hd.usable,
                    "why": dict((x.text, w) for x, w in hd.unusable).get(r.text),
                }
                for r in hd.records
            ],
            "policy": {
                "level": hp.level.name if hp else "connector",
                "usable": hp.usable if hp else True,
                "failure": str(hp.failure) if hp and hp.failure else None,
                "sni": hp.sni if hp else None,
                "reference_ids": list(hd.reference_ids) if hd.state is HostState.DANE else [],
                "label": hd.label if hd.state is HostState.DANE else None,
            },
            "detail": hd.detail,
        }
        if connect and hp is not None and hp.usable and hd.state in (HostState.DANE, HostState.NO_USABLE):
            sessions = []
            for addr in hop.addresses:
                probe = await starttls_probe(addr, hd.port, sni=hp.sni or hd.host)
                session: dict[str, Any] = {
                    "address": addr,
                    "sni": probe.sni,
                    "tls": probe.tls_version,
                    "cipher": probe.cipher,
                    "error": probe.error,
                }
                session["chain"] = [_cert_view(c) for c in probe.chain]
                if probe.chain and hd.state is HostState.DANE:
                    check = verify_chain(probe.chain, hd.usable, hd.reference_ids, datetime.now(UTC))
                    session.update(
                        verified=check.ok,
                        label=hd.label if check.ok else "untrusted",
                        matched=check.matched.params if check.matched else None,
                        matched_record=check.matched.text if check.matched else None,
                        result_type=str(check.result_type) if check.result_type else None,
                        detail=check.detail,
                    )
                sessions.append(session)
            view["sessions"] = sessions
        hosts.append(view)
    return {
        "domain": domain,
        "connector": connector.name if connector is not None else None,
        "dane": str(mode),
        "next_hop": next_hop.kind,
        "mx_secure": next_hop.mx_secure,
        "mx_error": next_hop.error,
        "self_test": {"validating": test.validating, "detail": test.detail},
        "applies": policy is not None and policy.applies,
        "policy_failure": str(policy.failure) if policy is not None and policy.failure else None,
        "detail": analysis.detail,
        "hosts": hosts,
    }


def format_explain(ex: dict[str, Any]) -> str:
    lines = [
        f"{ex['domain']}: connector {ex['connector'] or '-'}, dane = {ex['dane']}, next hop {ex['next_hop']}"
        f" (MX RRset {'secure' if ex['mx_secure'] else 'NOT secure'})",
        f"resolver self-test: {'validating' if ex['self_test']['validating'] else 'NOT validating'}",
        f"DANE policy: {'applies' if ex['applies'] else 'does not apply'}"
        + (f", fails: {ex['policy_failure']}" if ex["policy_failure"] else ""),
    ]
    if ex["mx_error"]:
        lines.append(f"  {ex['mx_error']}")
    for h in ex["hosts"]:
        pol = h["policy"]
        lines.append(f"  {h['preference']:>5} {h['host']} [{', '.join(h['addresses']) or '-'}]: {h['state']}")
        if h["tlsa_name"]:
            lines.append(f"        TLSA {h['tlsa_name']} ({h['tlsa_status']})")
        for r in h["records"]:
            why = f"  ({r['why']})" if r["why"] else ""
            lines.append(f"          {'usable  ' if r['usable'] else 'unusable'} {r['record']}{why}")
        effect = "SKIPPED" if not pol["usable"] else f"TLS level {pol['level']}"
        lines.append(
            f"        policy: {effect}"
            + (f" ({pol['failure']})" if pol["failure"] else "")
            + (f", SNI {pol['sni']}" if pol["sni"] else "")
            + (f", names {', '.join(pol['reference_ids'])}" if pol["reference_ids"] else "")
        )
        lines.append(f"        {h['detail']}")
        for s in h.get("sessions", []):
            lines.append(f"        connect {s['address']} SNI {s['sni']}: {s['error'] or s['tls'] + ' ' + s['cipher']}")
            for depth, c in enumerate(s["chain"]):
                lines.append(f"          {depth} s:{c['subject']} i:{c['issuer']} until {c['not_after']}")
                lines.append(f"            3 1 1 {c['3 1 1']}")
            if "verified" in s:
                by = f" by {s['matched_record']}" if s["matched_record"] else ""
                rtype = f" ({s['result_type']})" if s["result_type"] else ""
                lines.append(f"          => {s['label']}{by}{rtype}: {s['detail']}")
    return "\n".join(lines)


def cmd_explain(args: argparse.Namespace) -> int:
    config, plugins = load_from_args(args)

    async def run() -> dict[str, Any]:
        async with command_runtime(config, plugins) as runtime:
            return await explain_dane(runtime, args.domain, port=args.port, connect=args.connect)

    ex = asyncio.run(run())
    print(json.dumps(ex, indent=2) if args.json else format_explain(ex))
    sessions = [s for h in ex["hosts"] for s in h.get("sessions", [])]
    failed = ex["policy_failure"] is not None or any(s.get("verified") is False for s in sessions)
    return 1 if failed else 0
