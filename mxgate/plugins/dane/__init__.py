"""Built-in agent: DANE for SMTP (RFC 7672, RFC 7671, RFC 6698), outbound and inbound.

Outbound, per destination (hook ``mxgate_delivery_resolve_tls_policy``), every MX or smart host is examined on
its own (RFC 7672 §2.2.3):

* TLSA is looked up at ``_<port>._tcp.<base>`` only when the host's address records are DNSSEC-secure, judged
  per address RRset: a lookup that failed without a DNSSEC verdict (a dropped AAAA query) never makes the host
  insecure; when every address lookup failed the host is skipped for this attempt. The
  base domain is the CNAME-expanded host name when the (secure) address lookup went through CNAMEs; when that
  name yields no secure TLSA records (insecure records, or a secure or insecure denial) the initial name is tried
  (RFC 7672 §2.2.2, §2.2.3, RFC 7671 §7). An insecure MX RRset does not stop this: the host's own secure
  TLSA records are used, but the nexthop domain is then no reference identifier and a match is "trusted" rather
  than "verified" (RFC 7672 §2.2.1, as Postfix labels it).
* A secure, non-empty TLSA RRset with usable records: TLS is mandatory and authenticated; SNI is the base
  domain. Records exist but none is usable (usages 0/1, unknown parameters, digests of the wrong length): TLS is
  still mandatory, unauthenticated (§3.1.3). Secure or insecure denial, or insecure records: no DANE for that
  host: DANE has no opinion on it (``HostPolicy.applies = False``) and the core lets the next policy decide it
  (MTA-STS under enforce, else the connector). A bogus or failed TLSA lookup: the host is unusable (next MX, or
  defer).
* ``dane = "mandatory"`` on the connector: a host without usable TLSA is unusable (TLS-RPT ``dane-required``),
  and so is a destination whose MX RRset is not DNSSEC-secure (RFC 7672 §2.2.1: a forged MX could name the
  attacker's own host with his own signed TLSA).
* The start-up self-test (``runtime.stash[DNSSEC_SELF_TEST]``, run by :mod:`mxgate.plugins.dnssec`) said the
  resolver does not validate: opportunistic DANE is off, mandatory DANE defers (``dnssec-invalid``). Before it
  finished, the AD bit of each answer decides.

Verification (hook ``mxgate_delivery_on_tls_verify``, only for policies whose ``source`` is ``"dane"``) runs on
the chain the peer actually presented, on every connection (there is no session cache that could skip it):

* DANE-EE (3): the leaf certificate (selector 0) or its SubjectPublicKeyInfo (selector 1) matches; no name and no
  date checks (RFC 7671 §5.1).
* DANE-TA (2): a certificate of the presented chain above the leaf matches (or, for ``2 1 0``, the top of the
  chain is signed by the published key; for ``2 0 0``, by the published certificate, RFC 7671 §5.2); the chain
  is then validated up to it (dates included) with ``cryptography.x509.verification`` under RFC 5280 rules, not
  the WebPKI profile (keyUsage checked only where present, key identifiers optional), and the leaf must carry a
  reference identifier (RFC 7672 §3.2: DNS-ID SANs, the CN only without them, wildcards only as the whole
  left-most label).
* Digest agility (RFC 7671 §9): per usage and selector only the strongest digest present counts (SHA2-512 over
  SHA2-256); full data (matching type 0) is always used.

Failures always defer. The retry schedule's final DSN uses :data:`DANE_STATUS` (enhanced codes after Exchange
Online's 5.7.321-5.7.325, extended for the other RFC 8460 result types).

Inbound: ``mxgate dane tlsa`` prints the record to publish for a certificate, ``mxgate dane check-inbound HOST``
checks that the published TLSA matches the certificate served, and warns when a next certificate is not yet
published. ``mxgate dane explain DOMAIN [--connect]`` shows the per-MX view (posttls-finger's job).

The package, by concern: :mod:`~mxgate.plugins.dane.records` (TLSA records, pure),
:mod:`~mxgate.plugins.dane.verify` (a presented chain against the records, pure),
:mod:`~mxgate.plugins.dane.examine` (what the DNS says per host), :mod:`~mxgate.plugins.dane.policy` (the DANE
opinion per host and destination), :mod:`~mxgate.plugins.dane.plugin` (the hooks),
:mod:`~mxgate.plugins.dane.inbound` (our own TLSA, the STARTTLS probe) and :mod:`~mxgate.plugins.dane.commands`
(``mxgate dane ...``). Like a third party's plugin, it imports only the public API :mod:`mxgate`.
"""

from __future__ import annotations

from mxgate.plugins.dane.commands import explain_dane, format_explain
from mxgate.plugins.dane.examine import HostDane, HostState, examine_host
from mxgate.plugins.dane.inbound import Probe, check_inbound, preflight_own_tlsa, starttls_probe, tlsa_for_file
from mxgate.plugins.dane.plugin import ANALYSIS_REUSE_MAX, ANALYSIS_REUSE_SECONDS, DanePlugin
from mxgate.plugins.dane.policy import (
    DANE_MODE,
    DANE_PRECEDENCE,
    DANE_STATUS,
    DaneAnalysis,
    DaneMode,
    analyse,
    dane_status,
    host_policy,
)
from mxgate.plugins.dane.records import (
    Matching,
    Selector,
    Tlsa,
    Usage,
    association_data,
    effective_records,
    make_tlsa,
    record_matches,
)
from mxgate.plugins.dane.verify import DaneCheck, verify_chain

__all__ = [
    "ANALYSIS_REUSE_MAX",
    "ANALYSIS_REUSE_SECONDS",
    "DANE_MODE",
    "DANE_PRECEDENCE",
    "DANE_STATUS",
    "DaneAnalysis",
    "DaneCheck",
    "DaneMode",
    "DanePlugin",
    "HostDane",
    "HostState",
    "Matching",
    "Probe",
    "Selector",
    "Tlsa",
    "Usage",
    "analyse",
    "association_data",
    "check_inbound",
    "dane_status",
    "effective_records",
    "examine_host",
    "explain_dane",
    "format_explain",
    "host_policy",
    "make_tlsa",
    "preflight_own_tlsa",
    "record_matches",
    "starttls_probe",
    "tlsa_for_file",
    "verify_chain",
]
