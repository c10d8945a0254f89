"""TLS contexts, peer-chain access and certificate checks (the names; the code is in the ``tls_*`` modules).

This module knows TLS and X.509, not DANE or MTA-STS: those plugins build on it.

- :func:`server_context` / :func:`client_context` build ``ssl.SSLContext`` objects with mxgate's floor
  (TLS >= 1.2, never anonymous or null cipher suites).
- The delivery path verifies peers itself, *after* the handshake, because DANE needs the raw chain the peer
  sent: hence ``client_context(verify=False)`` and :func:`peer_chain`.
- :func:`match_reference_identifiers` is RFC 6125 name matching as RFC 7672 §3.2 narrows it (DANE-TA);
  :func:`verify_webpki` is WebPKI path validation (MTA-STS, ``certificate_validation`` / ``domain_validation``
  connectors) with an injected clock.

Blocking work: :func:`verify_webpki` may read the system trust store (cached afterwards) and does public-key
operations; call it via ``asyncio.to_thread`` on the event loop's behalf.

The code lives by concern in sibling modules; this module re-exports their names, so ``mxgate.core.tls`` stays
the one place to import them from:

- :mod:`mxgate.core.tls_contexts` -- server and client ``SSLContext`` building, SNI, client certificates;
- :mod:`mxgate.core.tls_rotation` -- certificate/key pair checks, :class:`RotatingServerContext`;
- :mod:`mxgate.core.tls_peer` -- :func:`peer_chain`, :func:`describe`, DER forms for TLSA;
- :mod:`mxgate.core.tls_names` -- DNS name normalisation and RFC 6125 matching;
- :mod:`mxgate.core.tls_verify` -- WebPKI and client-certificate path validation.
"""

from __future__ import annotations

from mxgate.core.tls_contexts import (
    CIPHERS_TLS12,
    TlsMode,
    client_context,
    requested_server_name,
    server_context,
)
from mxgate.core.tls_contexts import (
    StrPath as StrPath,
)
from mxgate.core.tls_contexts import (
    ask_for_client_certificate as ask_for_client_certificate,
)
from mxgate.core.tls_names import match_reference_identifiers, normalize_dns_name
from mxgate.core.tls_peer import TlsInfo, cert_der, describe, peer_chain, spki_der
from mxgate.core.tls_rotation import (
    FileStamp as FileStamp,
)
from mxgate.core.tls_rotation import (
    RotatingServerContext as RotatingServerContext,
)
from mxgate.core.tls_rotation import (
    ServedCertificates as ServedCertificates,
)
from mxgate.core.tls_rotation import (
    leaf_certificate as leaf_certificate,
)
from mxgate.core.tls_rotation import (
    not_after as not_after,
)
from mxgate.core.tls_rotation import (
    pair_problem as pair_problem,
)
from mxgate.core.tls_verify import (
    ClientCertificateVerifier,
    VerifyReason,
    VerifyResult,
    system_trust_store_paths,
    verify_client_chain,
    verify_webpki,
)
from mxgate.core.tls_verify import (
    own_subject as own_subject,
)

__all__ = [
    "CIPHERS_TLS12",
    "ClientCertificateVerifier",
    "TlsInfo",
    "TlsMode",
    "VerifyReason",
    "VerifyResult",
    "cert_der",
    "client_context",
    "describe",
    "match_reference_identifiers",
    "normalize_dns_name",
    "peer_chain",
    "requested_server_name",
    "server_context",
    "spki_der",
    "system_trust_store_paths",
    "verify_client_chain",
    "verify_webpki",
]
