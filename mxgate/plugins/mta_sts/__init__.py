"""Built-in agent: MTA-STS (RFC 8461), the fallback where DANE is absent.

Outbound: for each destination the recipient domain's ``_mta-sts`` TXT record is looked up; a new ``id`` (or no
cached policy) triggers an HTTPS fetch of ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (WebPKI, SNI, no
redirects, 200 and ``text/plain`` only, 64 KiB, timeouts, no HTTP cache). Policies are cached in the state
directory (``sts-cache.sqlite3``) and refreshed in the background before they expire; a failed fetch leaves the
cached policy in force and is not repeated for the same ``id`` within five minutes. The policy becomes a
:class:`~mxgate.TlsPolicy` of precedence 200: DANE (300) decides where it applies; MX hosts not
matching the policy's ``mx`` patterns are marked unusable (enforce); ``on_tls_verify`` checks the chain against
the WebPKI and the certificate against the MX host actually dialled.

Cluster mode (``[cluster] database``): the cache is also kept in PostgreSQL (schema ``mta_sts``) for every node.
A policy fetched by one node protects all: a node without a policy for a domain asks the cluster's cache before
anything else (so a node that never saw a domain is not open to a first-contact downgrade another node's cache
would stop), and every refresh pass first takes in what other nodes fetched. A background refresh is claimed per
domain for five minutes, so one node fetches per domain per interval. The local SQLite file stays the node's last
known policies: with the database away the node works from it as a single gateway does.

Inbound: optionally serves our own policies on an HTTPS listener; ``mxgate sts record DOMAIN`` prints the TXT
record to publish.

Commands: ``mxgate sts show DOMAIN``, ``sts refresh DOMAIN``, ``sts list``, ``sts record DOMAIN``.

The package, by concern: :mod:`.policy` (the RFC grammar and ``mx`` matching, no I/O), :mod:`.config` (settings),
:mod:`.cache` (local and cluster-shared policy cache), :mod:`.fetch` (TXT record and HTTPS fetch), :mod:`.engine`
(which policy applies, refresh, enforce/testing; the MX certificate check), :mod:`.serve` (our own policies over
HTTPS), :mod:`.plugin` (the hooks), :mod:`.commands` (``mxgate sts``). Every module imports mxgate's public API
(``from mxgate import ...``) and nothing deeper, as a third-party plugin would.
"""

from __future__ import annotations

from mxgate.plugins.mta_sts.cache import (
    CACHE_FILE,
    FETCH_RETRY_AFTER,
    CachedPolicy,
    PolicyCache,
    SharedPolicies,
    SqlitePolicyStore,
)
from mxgate.plugins.mta_sts.config import MTA_STS_MODE, MtaStsConfig, ServedPolicy
from mxgate.plugins.mta_sts.engine import (
    PRECEDENCE,
    StsEngine,
    StsResolution,
    build_tls_policy,
    verify_mx_certificate,
)
from mxgate.plugins.mta_sts.fetch import FetchResult, FetchStatus, PolicyFetcher
from mxgate.plugins.mta_sts.plugin import MtaStsPlugin
from mxgate.plugins.mta_sts.policy import mx_matches
from mxgate.plugins.mta_sts.serve import PolicyServer, served_record

__all__ = [
    "CACHE_FILE",
    "FETCH_RETRY_AFTER",
    "MTA_STS_MODE",
    "PRECEDENCE",
    "CachedPolicy",
    "FetchResult",
    "FetchStatus",
    "MtaStsConfig",
    "MtaStsPlugin",
    "PolicyCache",
    "PolicyFetcher",
    "PolicyServer",
    "ServedPolicy",
    "SharedPolicies",
    "SqlitePolicyStore",
    "StsEngine",
    "StsResolution",
    "build_tls_policy",
    "mx_matches",
    "served_record",
    "verify_mx_certificate",
]
