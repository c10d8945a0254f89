"""Our own side of DANE: the TLSA record to publish for a certificate, whether the published records cover what
we serve (``mxgate dane check-inbound``, ``mxgate check``), and the STARTTLS probe the commands use.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from mxgate import DnssecStatus, Resolver, Runtime, SmtpClient, SmtpClientError, SmtpReply, client_context, peer_chain
from mxgate.plugins.dane.examine import address_list
from mxgate.plugins.dane.records import Tlsa, Usage, effective_records, make_tlsa, record_matches, records_of
from mxgate.plugins.dane.verify import verify_chain

__all__ = ["Probe", "check_inbound", "load_certs", "preflight_own_tlsa", "starttls_probe", "tlsa_for_file"]


@dataclass(frozen=True, slots=True)
class Probe:
    """What one STARTTLS handshake showed (no verification here)."""

    address: str
    port: int
    sni: str | None
    banner: str = ""
    starttls: bool = False
    tls_version: str | None = None
    cipher: str | None = None
    chain: tuple[x509.Certificate, ...] = field(default=(), repr=False)
    error: str | None = None


def _last_line(reply: SmtpReply | None) -> str:
    """A reply's last line as the server sent it (``"220 mx.example.org ESMTP"``)."""
    if reply is None:
        return ""
    return f"{reply.code} {reply.lines[-1]}" if reply.lines else str(reply.code)


async def starttls_probe(
    address: str, port: int, *, sni: str | None, helo: str = "mxgate.invalid", timeout: float = 10.0
) -> Probe:
    """Connect, EHLO, STARTTLS with ``sni`` (the core's :class:`SmtpClient`, as delivery), and take the presented
    chain (no verification here: the caller judges it)."""
    client: SmtpClient | None = None
    probe = Probe(address, port, sni)
    try:
        async with asyncio.timeout(timeout):
            client = await SmtpClient.connect(address, port, timeout=timeout)
            banner = _last_line(client.banner)
            probe = Probe(address, port, sni, banner=banner)
            await client.ehlo(helo)
            if not client.supports("STARTTLS"):
                return Probe(address, port, sni, banner=banner, error="STARTTLS not offered")
            reply = await client.starttls(client_context(verify=False), sni)
            if reply.code != 220:
                return Probe(address, port, sni, banner, True, error=f"STARTTLS refused: {_last_line(reply)}")
            obj = client.ssl_object
            if obj is None:
                return Probe(address, port, sni, banner, True, error="no TLS object after the handshake")
            cipher = obj.cipher()
            return Probe(
                address, port, sni, banner, True, obj.version(), cipher[0] if cipher else None, peer_chain(obj)
            )
    except (SmtpClientError, OSError, TimeoutError) as exc:
        return Probe(address, port, sni, probe.banner, probe.starttls, error=f"{type(exc).__name__}: {exc}")
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.quit(timeout=2.0), 3)  # QUIT politely, at most 2 s
            if not client.closed:
                client.abort()


def load_certs(path: str) -> list[x509.Certificate]:
    data = Path(path).read_bytes()
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = [x509.load_der_x509_certificate(data)]
    if not certs:
        raise ValueError(f"{path}: no certificate")
    return certs


def tlsa_for_file(path: str, usage: int, selector: int, mtype: int) -> Tlsa:
    """The record for a PEM file: DANE-EE publishes the leaf (the first certificate), DANE-TA the last one of the
    chain (the issuing CA the server must then also present)."""
    certs = load_certs(path)
    if usage == Usage.DANE_TA:
        if len(certs) < 2:
            raise ValueError(f"{path}: DANE-TA (usage 2) needs the chain with its CA certificate, found only a leaf")
        return make_tlsa(certs[-1], usage, selector, mtype)
    return make_tlsa(certs[0], usage, selector, mtype)


def _covers(records: Sequence[Tlsa], certs: Sequence[x509.Certificate]) -> Tlsa | None:
    """The first record a certificate file (leaf first, then its chain) would satisfy, ignoring names."""
    for rec in records:
        if rec.usage == Usage.DANE_EE and certs and record_matches(rec, certs[0]):
            return rec
        if rec.usage == Usage.DANE_TA and any(record_matches(rec, c) for c in certs[1:]):
            return rec
    return None


async def check_inbound(
    resolver: Resolver,
    host: str,
    port: int,
    *,
    address: str | None = None,
    cert_file: str | None = None,
    next_certs: Sequence[str] = (),
    now: datetime | None = None,
) -> dict[str, Any]:
    """What ``mxgate dane check-inbound`` reports: ``ok``, ``errors``, ``warnings`` and the details."""
    host = host.lower().rstrip(".")
    when = now or datetime.now(UTC)
    errors: list[str] = []
    warnings: list[str] = []
    owner = f"_{port}._tcp.{host}"
    answer = await resolver.resolve(owner, "TLSA")
    records = records_of(answer)
    usable, unusable = effective_records(records)
    if answer.is_failure:
        errors.append(f"TLSA lookup {owner} failed ({answer.status}): {answer.error}")
    elif not answer.exists:
        errors.append(f"no TLSA records at {owner} ({answer.kind}, {answer.status})")
    elif answer.status is not DnssecStatus.SECURE:
        errors.append(f"TLSA records at {owner} are {answer.status}: senders ignore them (sign the zone)")
    elif not usable:
        errors.append(f"no usable TLSA record at {owner} (senders then only require unauthenticated TLS)")
    for rec, why in unusable:
        warnings.append(f"record {rec.params} set aside: {why}")
    addresses = (address,) if address else await address_list(resolver, host)
    if not addresses:
        errors.append(f"{host} has no address records")
    served: list[dict[str, Any]] = []
    leaf: x509.Certificate | None = None
    for addr in addresses:
        probe = await starttls_probe(addr, port, sni=host)
        entry: dict[str, Any] = {"address": addr, "error": probe.error, "tls": probe.tls_version}
        if probe.error is None and probe.chain:
            check = verify_chain(probe.chain, usable, (host,), when)
            leaf = leaf or probe.chain[0]
            entry.update(
                subject=probe.chain[0].subject.rfc4514_string(),
                matches=check.ok,
                matched=check.matched.params if check.matched and check.ok else None,
                result_type=str(check.result_type) if check.result_type else None,
                detail=check.detail,
                tlsa_3_1_1=make_tlsa(probe.chain[0]).text,
            )
            if not check.ok and records:
                errors.append(f"{addr}: the served certificate does not match the TLSA records: {check.detail}")
        else:
            errors.append(f"{addr}: {probe.error or 'no certificate presented'}")
        served.append(entry)
    if cert_file:
        try:
            configured = load_certs(cert_file)
        except (OSError, ValueError) as exc:
            errors.append(f"{cert_file}: {exc}")
        else:
            if leaf is not None and configured[0] != leaf:
                warnings.append(f"the served certificate is not the one in {cert_file} (not reloaded yet?)")
            if _covers(usable, configured) is None:
                errors.append(f"{cert_file} is not covered by any usable TLSA record at {owner}")
    pending: list[dict[str, str]] = []
    for path in next_certs:
        try:
            certs = load_certs(path)
        except (OSError, ValueError) as exc:
            errors.append(f"{path}: {exc}")
            continue
        if _covers(usable, certs) is None:
            template = usable[0] if usable else Tlsa(3, 1, 1, b"")
            usage = template.usage if template.usage == Usage.DANE_EE or len(certs) > 1 else Usage.DANE_EE
            target = certs[0] if usage == Usage.DANE_EE else certs[-1]
            rec = make_tlsa(target, usage, template.selector, template.mtype)
            warnings.append(
                f"next certificate {path} is NOT published yet: add `{owner}. IN TLSA {rec.text}` and wait at "
                f"least twice the TLSA TTL ({answer.ttl}s) before switching"
            )
            pending.append({"file": path, "record": rec.text})
    return {
        "host": host,
        "port": port,
        "tlsa_name": owner,
        "tlsa_status": str(answer.status),
        "tlsa_kind": str(answer.kind),
        "records": [{"record": r.text, "usable": r in usable} for r in records],
        "served": served,
        "next_certificates_unpublished": pending,
        "errors": errors,
        "warnings": warnings,
        "ok": not errors,
    }


async def preflight_own_tlsa(runtime: Runtime) -> list[str]:
    """``mxgate check``: where our MX (``server.hostname``) publishes TLSA records for a listener's port, they are
    signed, usable, and cover the certificate that listener serves (its files). No records: nothing to check."""
    config, resolver = runtime.config, runtime.resolver
    if resolver is None:
        return []
    host = config.server.hostname.lower().rstrip(".")
    problems: list[str] = []
    for lc in config.listener:
        if not lc.tls_cert:
            continue
        owner = f"_{lc.port}._tcp.{host}"
        answer = await resolver.resolve(owner, "TLSA")
        if answer.is_failure:
            problems.append(f"TLSA {owner}: lookup failed ({answer.status}): {answer.error}")
            continue
        if not answer.exists:
            continue
        if answer.status is not DnssecStatus.SECURE:
            problems.append(f"TLSA {owner} is {answer.status}: senders ignore it (sign the zone)")
            continue
        usable, _unusable = effective_records(records_of(answer))
        cert_file = str(config.path(lc.tls_cert))
        try:
            certs = load_certs(cert_file)
        except (OSError, ValueError):
            continue  # the core's certificate check names this file
        if not usable:
            problems.append(f"TLSA {owner}: no usable record (senders then only require unauthenticated TLS)")
        elif _covers(usable, certs) is None:
            problems.append(
                f"TLSA {owner} does not cover {cert_file}, which listener {lc.name} serves: DANE senders will defer; "
                f"publish `{owner}. IN TLSA {make_tlsa(certs[0]).text}` (or serve the published key)"
            )
    return problems
