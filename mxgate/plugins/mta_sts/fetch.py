"""Fetching (RFC 8461 section 3.3): the ``_mta-sts`` TXT record and the policy over HTTPS.

Both go through mxgate's resolver, injected as small lookup functions (:data:`TxtLookup`, :data:`AddressLookup`)
so the engine and the fetcher are tested without DNS.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

import httpx

from mxgate import DnssecStatus, Resolver, TlsRptResult, __version__
from mxgate.plugins.mta_sts.policy import (
    MAX_POLICY_BYTES,
    WELL_KNOWN_PATH,
    RecordLookup,
    RecordStatus,
    StsPolicy,
    StsSyntaxError,
    is_text_plain,
    parse_policy,
    select_record,
)

__all__ = [
    "AddressLookup",
    "FetchResult",
    "FetchStatus",
    "PolicyFetcher",
    "TxtLookup",
    "resolver_addresses",
    "resolver_txt",
]

MAX_ADDRESSES = 4  # policy host addresses tried per fetch


class FetchStatus(StrEnum):
    """Outcome of one fetch; also the ``result`` label of the ``sts_fetch`` event."""

    OK = "ok"
    FETCH_ERROR = "fetch_error"  # sts-policy-fetch-error: DNS, connect, timeout, non-200, redirect
    INVALID = "invalid"  # sts-policy-invalid: not text/plain, too large, not a valid policy
    WEBPKI_INVALID = "webpki_invalid"  # sts-webpki-invalid: the policy host's certificate

    @property
    def result_type(self) -> TlsRptResult | None:
        return _RESULT_TYPES.get(self)


_RESULT_TYPES = {
    FetchStatus.FETCH_ERROR: TlsRptResult.STS_POLICY_FETCH_ERROR,
    FetchStatus.INVALID: TlsRptResult.STS_POLICY_INVALID,
    FetchStatus.WEBPKI_INVALID: TlsRptResult.STS_WEBPKI_INVALID,
}


@dataclass(frozen=True, slots=True)
class FetchResult:
    status: FetchStatus
    policy: StsPolicy | None = None
    detail: str = ""
    skipped: bool = False  # not attempted: the same id failed less than five minutes ago
    shared: bool = False  # another caller's fetch, awaited (its caller reports it)

    @property
    def ok(self) -> bool:
        return self.status is FetchStatus.OK


class _TryNextAddress(Exception):
    """Connecting to one address failed (refused, unreachable): the next address may work."""


AddressLookup = Callable[[str], Awaitable[tuple[tuple[str, ...], str]]]


def resolver_addresses(get_resolver: Callable[[], Resolver]) -> AddressLookup:
    """Policy host -> (addresses, error) through mxgate's resolver (``Resolver.host_addresses``: AAAA, then A, as
    delivery dials them)."""

    async def lookup(host: str) -> tuple[tuple[str, ...], str]:
        found = await get_resolver().host_addresses(host)
        if found.addresses:
            return found.addresses, ""
        return (), found.error or f"{host} has no address records"

    return lookup


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


class PolicyFetcher:
    """Fetches ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` with httpx: the policy host is resolved
    through mxgate's resolver and dialled by address, with SNI and ``Host`` set to ``mta-sts.<domain>``; OpenSSL
    verifies chain and name against ``ssl_context``'s anchors during the handshake."""

    def __init__(
        self,
        *,
        addresses: AddressLookup,
        ssl_context: ssl.SSLContext,
        port: int = 443,
        timeout: float = 10.0,
        max_bytes: int = MAX_POLICY_BYTES,
    ) -> None:
        self._addresses = addresses
        self._ssl = ssl_context
        self.port = port
        self.timeout = timeout
        self.max_bytes = max_bytes

    async def fetch(self, domain: str) -> FetchResult:
        host = f"mta-sts.{domain}"
        try:
            async with asyncio.timeout(self.timeout):
                addresses, error = await self._addresses(host)
                if not addresses:
                    return FetchResult(FetchStatus.FETCH_ERROR, detail=f"cannot resolve {host}: {error}")
                last = ""
                for address in addresses[:MAX_ADDRESSES]:
                    try:
                        return await self._fetch_from(address, host)
                    except _TryNextAddress as exc:
                        last = str(exc)
                return FetchResult(FetchStatus.FETCH_ERROR, detail=last)
        except TimeoutError:
            return FetchResult(FetchStatus.FETCH_ERROR, detail=f"{host}: no complete answer within {self.timeout:g}s")

    async def _fetch_from(self, address: str, host: str) -> FetchResult:
        url = httpx.URL(scheme="https", host=address, port=self.port, path=WELL_KNOWN_PATH)
        host_header = host if self.port == 443 else f"{host}:{self.port}"
        headers = {
            "Host": host_header,
            "Accept": "text/plain",
            "Accept-Encoding": "identity",  # the byte cap applies to what we read, never to a decompressed bomb
            "User-Agent": f"mxgate/{__version__} (MTA-STS)",
        }
        where = f"{host} [{address}]:{self.port}"
        client = httpx.AsyncClient(
            verify=self._ssl, follow_redirects=False, trust_env=False, timeout=httpx.Timeout(self.timeout)
        )
        try:
            async with client, client.stream("GET", url, headers=headers, extensions={"sni_hostname": host}) as resp:
                if resp.is_redirect:
                    target = resp.headers.get("location", "?")[:120]
                    return FetchResult(
                        FetchStatus.FETCH_ERROR, detail=f"{where}: HTTP {resp.status_code} redirect to {target} refused"
                    )
                if resp.status_code != 200:
                    return FetchResult(FetchStatus.FETCH_ERROR, detail=f"{where}: HTTP {resp.status_code}")
                content_type = resp.headers.get("content-type")
                if not is_text_plain(content_type):
                    return FetchResult(
                        FetchStatus.INVALID, detail=f"{where}: media type {content_type!r}, not text/plain"
                    )
                encoding = resp.headers.get("content-encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    return FetchResult(FetchStatus.INVALID, detail=f"{where}: content-encoding {encoding!r}")
                declared = resp.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                    return FetchResult(FetchStatus.INVALID, detail=f"{where}: {declared} bytes > {self.max_bytes}")
                body = bytearray()
                async for chunk in resp.aiter_raw():
                    body += chunk
                    if len(body) > self.max_bytes:
                        return FetchResult(FetchStatus.INVALID, detail=f"{where}: policy larger than {self.max_bytes}")
        except httpx.TimeoutException as exc:
            return FetchResult(FetchStatus.FETCH_ERROR, detail=f"{where}: timeout ({type(exc).__name__})")
        except httpx.HTTPError as exc:
            return self._transport_error(exc, where)
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            return FetchResult(FetchStatus.INVALID, detail=f"{where}: policy is not UTF-8")
        try:
            return FetchResult(FetchStatus.OK, parse_policy(text), detail=f"{where}: ok")
        except StsSyntaxError as exc:
            return FetchResult(FetchStatus.INVALID, detail=f"{where}: {exc}")

    @staticmethod
    def _transport_error(exc: httpx.HTTPError, where: str) -> FetchResult:
        chain = _cause_chain(exc)
        for cause in chain:
            if isinstance(cause, ssl.SSLCertVerificationError):
                reason = cause.verify_message or cause.reason or str(cause)
                return FetchResult(FetchStatus.WEBPKI_INVALID, detail=f"{where}: certificate: {reason}")
        for cause in chain:
            if isinstance(cause, ssl.SSLError):
                return FetchResult(FetchStatus.FETCH_ERROR, detail=f"{where}: TLS: {cause.reason or cause}")
        if isinstance(exc, httpx.ConnectError):
            raise _TryNextAddress(f"{where}: {exc or type(exc).__name__}")
        return FetchResult(FetchStatus.FETCH_ERROR, detail=f"{where}: {type(exc).__name__}: {exc}")


TxtLookup = Callable[[str, bool], Awaitable[RecordLookup]]


def resolver_txt(get_resolver: Callable[[], Resolver]) -> TxtLookup:
    """``_mta-sts.<domain>`` TXT through mxgate's resolver; the strings of one record are concatenated."""

    async def lookup(domain: str, fresh: bool) -> RecordLookup:
        answer = await get_resolver().resolve(f"_mta-sts.{domain}", "TXT", use_cache=not fresh)
        if answer.status is DnssecStatus.BOGUS:
            return RecordLookup(RecordStatus.BOGUS, detail=f"TXT answer failed DNSSEC validation ({answer.error})")
        if answer.is_failure:
            return RecordLookup(RecordStatus.ERROR, detail=f"TXT lookup failed: {answer.error or answer.status}")
        if not answer.exists:
            return RecordLookup(RecordStatus.NONE, detail=f"no TXT record ({answer.kind})")
        texts = [b"".join(getattr(rd, "strings", ())).decode("utf-8", "replace") for rd in answer.records]
        return select_record(texts)

    return lookup
