"""``mxgate explain DOMAIN``: what mxgate would see and decide for a destination.

Without options: per MX (or smart) host, which mechanism governs it (DANE, MTA-STS, the connector) and why,
computed by the code delivery runs (:mod:`mxgate.core.delivery.explain`); ``--connect`` tests each handshake.
``--dns`` prints the MX RRset with its status, each host's address records with theirs, and the resolver
self-test (the known-secure name must validate, the known-bogus one must fail). The DANE agent's own detail
(TLSA records, usability, the presented chain) is ``mxgate dane explain``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict, dataclass, replace
from typing import Any

import dns.rdtypes.ANY.MX

from mxgate.connectors.outbound import select_outbound
from mxgate.core.commands import load_from_args
from mxgate.core.config import Config
from mxgate.core.delivery.explain import destination_for, explain_destination, format_transport
from mxgate.core.dns import Resolver, resolver_from_config
from mxgate.core.dns_answers import AnswerKind, DnsAnswer, SelfTestResult
from mxgate.core.runtime import Runtime


@dataclass(frozen=True, slots=True)
class AddressView:
    rdtype: str
    kind: str
    status: str
    addresses: tuple[str, ...]
    error: str | None


@dataclass(frozen=True, slots=True)
class HostView:
    name: str
    preference: int
    addresses: tuple[AddressView, ...]


@dataclass(frozen=True, slots=True)
class DnsExplanation:
    domain: str
    resolvers: tuple[str, ...]
    ad_trusted: bool
    mx_kind: str
    mx_status: str
    mx_error: str | None
    null_mx: bool
    implicit_mx: bool
    hosts: tuple[HostView, ...]
    self_test: SelfTestResult | None


def _address_view(answer: DnsAnswer) -> AddressView:
    return AddressView(
        answer.rdtype,
        str(answer.kind),
        str(answer.status),
        tuple(r.to_text() for r in answer.records),
        answer.error,
    )


async def explain_dns(resolver: Resolver, config: Config, domain: str, *, self_test: bool = True) -> DnsExplanation:
    mx = await resolver.resolve(domain, "MX")
    hosts: list[tuple[str, int]] = []
    implicit = False
    if mx.kind is AnswerKind.ANSWER and not mx.is_null_mx:
        records = sorted(
            (r for r in mx.records if isinstance(r, dns.rdtypes.ANY.MX.MX)),
            key=lambda r: (r.preference, r.exchange.to_text()),
        )
        hosts = [(r.exchange.to_text(omit_final_dot=True), r.preference) for r in records]
    elif mx.kind is AnswerKind.NODATA:
        implicit, hosts = True, [(domain, 0)]  # RFC 5321 5.1: the domain itself, only when MX is NODATA
    views = []
    for host, pref in hosts:
        found = await resolver.host_addresses(host)
        views.append(HostView(host, pref, (_address_view(found.a), _address_view(found.aaaa))))
    test = None
    if self_test:
        test = await resolver.self_test(config.dns.self_test_secure, config.dns.self_test_bogus)
    return DnsExplanation(
        domain=domain,
        resolvers=tuple(str(e) for e in resolver.endpoints),
        ad_trusted=resolver.trusts_ad,
        mx_kind=str(mx.kind),
        mx_status=str(mx.status),
        mx_error=mx.error,
        null_mx=mx.is_null_mx,
        implicit_mx=implicit,
        hosts=tuple(views),
        self_test=test,
    )


def format_dns(ex: DnsExplanation) -> str:
    lines = [f"resolvers: {', '.join(ex.resolvers)} (AD bit {'trusted' if ex.ad_trusted else 'NOT trusted'})"]
    if ex.self_test is not None:
        t = ex.self_test
        verdict = "validating" if t.validating else "NOT validating (DANE unavailable)"
        lines.append(
            f"self-test: {verdict}: {t.secure_name} {t.secure_status}, {t.bogus_name} {t.bogus_status}"
            + (f" ({t.detail})" if t.detail else "")
        )
    mx_line = f"MX {ex.domain}: {ex.mx_kind}, {ex.mx_status}"
    if ex.mx_error:
        mx_line += f" ({ex.mx_error})"
    if ex.null_mx:
        mx_line += " - null MX (RFC 7505): the domain accepts no mail"
    if ex.implicit_mx:
        mx_line += " - implicit MX: the domain's own addresses"
    lines.append(mx_line)
    for host in ex.hosts:
        lines.append(f"  {host.preference:>5} {host.name}")
        for addr in host.addresses:
            shown = " ".join(addr.addresses) or "-"
            extra = f" ({addr.error})" if addr.error else ""
            lines.append(f"        {addr.rdtype:<4} {addr.kind:<8} {addr.status:<13} {shown}{extra}")
    return "\n".join(lines)


def cmd_explain(args: argparse.Namespace) -> int:
    if not args.dns:
        return cmd_explain_transport(args)
    config, _plugins = load_from_args(args)
    resolver = resolver_from_config(config.dns)
    ex = asyncio.run(explain_dns(resolver, config, args.domain.rstrip("."), self_test=not args.no_self_test))
    if args.json:
        print(json.dumps(_jsonable(asdict(ex)), indent=2))
    else:
        print(format_dns(ex))
    failed = ex.mx_kind == "error" or (ex.self_test is not None and not ex.self_test.validating)
    return 1 if failed else 0


def cmd_explain_transport(args: argparse.Namespace) -> int:
    """Per MX (or smart) host: which mechanism governs it and why, from the code delivery runs; ``--connect``
    tests each handshake. Exit 1 when the destination would be deferred or no host is usable (or a test failed)."""
    config, plugins = load_from_args(args)
    domain = args.domain.lower().rstrip(".")
    if args.connector:
        connector = config.outbound(args.connector)
        if connector is None:
            print(f"mxgate: no outbound connector {args.connector!r}")
            return 1
    else:
        connector = select_outbound(config.outbound_connector, domain)
        if connector is None:
            print(f"mxgate: no outbound connector routes {domain}")
            return 1
    if args.port is not None:
        connector = replace(connector, mx_port=args.port, port=args.port)
        config = replace(config, outbound_connector=tuple(
            connector if c.name == connector.name else c for c in config.outbound_connector
        ))  # fmt: skip

    async def run() -> int:
        runtime = Runtime.create(config, plugins)
        runtime.resolver = resolver_from_config(config.dns)
        await runtime.hooks.on_startup(runtime)
        try:
            ex = await explain_destination(runtime, destination_for(connector, domain), connect=args.connect)
        finally:
            for task in runtime.tasks:
                task.cancel()
            await asyncio.gather(*runtime.tasks, return_exceptions=True)
            await runtime.hooks.on_shutdown(runtime)
            runtime.tracking.close()
        print(json.dumps(_jsonable(asdict(ex)), indent=2) if args.json else format_transport(ex))
        usable = [h for h in ex.hosts if h.usable]
        failed = ex.destination_failure is not None or not usable or ex.next_hop == "error"
        failed = failed or any(not s.ok for h in ex.hosts for s in h.sessions)
        return 1 if failed else 0

    return asyncio.run(run())


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, int | float | str | bool | type(None)) else str(value)


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "explain",
        help="per MX or smart host: which TLS policy governs it and why (--connect: test each handshake;"
        " --dns: records and DNSSEC status)",
    )
    p.add_argument("domain")
    p.add_argument("--dns", action="store_true", help="MX and address records with DNSSEC status, self-test")
    p.add_argument("--no-self-test", action="store_true", help="skip the resolver self-test (--dns)")
    p.add_argument(
        "--connect", action="store_true", help="connect to each host as delivery would, up to the ready session"
    )
    p.add_argument("--connector", metavar="NAME", help="explain through this outbound connector (default: routing)")
    p.add_argument("--port", type=int, help="SMTP port (default: the connector's mx_port or port)")
    p.add_argument("--json", action="store_true")
    p.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS)
    p.set_defaults(func=cmd_explain)
