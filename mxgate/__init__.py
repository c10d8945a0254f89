"""mxgate: an SMTP gateway with Exchange-style connectors and transport agents.

This module is the plugin author's API; everything else is internal and may change. It exports every type a hook
passes or returns (``Runtime``, ``QueuedMessage``, ``AttemptContext``, ``AuthResult``...),
the verdicts, the outcome and policy types, ``ConfigError`` (what a plugin's setting validation raises), and the
command helpers ``add_config_arg`` / ``load_from_args`` for ``mxgate_lifecycle_register_commands``. Beside them, the
services a built-in uses and a third party may too: the DNS resolver (``Resolver``, ``resolver_from_config``,
``DnssecStatus``), TLS contexts and WebPKI checks (``client_context``, ``server_context``, ``verify_webpki``), the
cluster's shared database (``SharedDb``, ``MigrationRegistry``, ``ClusterUnavailable``), setting checks
(``is_hostname``, ``split_hostport``...) and ``escape`` for network text on a terminal.
"""

from mxgate._version import __version__
from mxgate.core.auth import AuthResult
from mxgate.core.callout import CalloutResult, CalloutVerdict
from mxgate.core.checks import check_optional_hostport, is_hostname, split_hostport
from mxgate.core.cluster import ClusterUnavailable, MigrationRegistry, SharedDb
from mxgate.core.commands import add_config_arg, load_from_args
from mxgate.core.config import Config
from mxgate.core.delivery import AttemptContext
from mxgate.core.dns import DnsAnswer, DnssecStatus, Resolver, resolver_from_config
from mxgate.core.errors import ConfigError, ConfigProblem, MxgateError
from mxgate.core.files import private_file
from mxgate.core.hookspecs import hookimpl
from mxgate.core.model import (
    Accept,
    Address,
    Disconnect,
    DsnNotify,
    DsnRet,
    Envelope,
    IncomingMessage,
    RecipientDsn,
    Reject,
    Reply,
    ReverseDnsStatus,
    Session,
    Stash,
    StashKey,
    TempFail,
    Verdict,
)
from mxgate.core.outcomes import (
    DeliveryReport,
    Destination,
    HostPolicy,
    NextHop,
    PeerVerification,
    PolicyType,
    ReportEvent,
    Route,
    TlsLevel,
    TlsOutcome,
    TlsPolicy,
    TlsRptResult,
)
from mxgate.core.queue.store import MessageOptions, QueuedMessage, QueuedRecipient, RecipientStatus
from mxgate.core.runtime import Runtime
from mxgate.core.settings import ConfigRegistry, ConnectorSetting, setting
from mxgate.core.textsafe import escape
from mxgate.core.tls import (
    VerifyReason,
    VerifyResult,
    client_context,
    normalize_dns_name,
    server_context,
    verify_webpki,
)

__all__ = [
    "Accept",
    "Address",
    "AttemptContext",
    "AuthResult",
    "CalloutResult",
    "CalloutVerdict",
    "ClusterUnavailable",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "ConfigRegistry",
    "ConnectorSetting",
    "DeliveryReport",
    "Destination",
    "Disconnect",
    "DnsAnswer",
    "DnssecStatus",
    "DsnNotify",
    "DsnRet",
    "Envelope",
    "HostPolicy",
    "IncomingMessage",
    "MessageOptions",
    "MigrationRegistry",
    "MxgateError",
    "NextHop",
    "PeerVerification",
    "PolicyType",
    "QueuedMessage",
    "QueuedRecipient",
    "RecipientDsn",
    "RecipientStatus",
    "Reject",
    "Reply",
    "ReportEvent",
    "Resolver",
    "ReverseDnsStatus",
    "Route",
    "Runtime",
    "Session",
    "SharedDb",
    "Stash",
    "StashKey",
    "TempFail",
    "TlsLevel",
    "TlsOutcome",
    "TlsPolicy",
    "TlsRptResult",
    "Verdict",
    "VerifyReason",
    "VerifyResult",
    "__version__",
    "add_config_arg",
    "check_optional_hostport",
    "client_context",
    "escape",
    "hookimpl",
    "is_hostname",
    "load_from_args",
    "normalize_dns_name",
    "private_file",
    "resolver_from_config",
    "server_context",
    "setting",
    "split_hostport",
    "verify_webpki",
]
