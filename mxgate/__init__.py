"""mxgate: an SMTP gateway with Exchange-style connectors and transport agents.

This module is the plugin author's API; everything else is internal and may change. It exports every type a hook
passes or returns (``Runtime``, ``QueuedMessage``, ``AttemptContext``, ``AuthResult``...),
the verdicts, the outcome and policy types, ``ConfigError`` (what a plugin's setting validation raises), and the
command helpers ``add_config_arg`` / ``load_from_args`` for ``mxgate_lifecycle_register_commands``.
"""

from mxgate._version import __version__
from mxgate.core.auth import AuthResult
from mxgate.core.callout import CalloutResult, CalloutVerdict
from mxgate.core.commands import add_config_arg, load_from_args
from mxgate.core.delivery import AttemptContext
from mxgate.core.errors import ConfigError, ConfigProblem, MxgateError
from mxgate.core.files import private_file
from mxgate.core.hookspecs import hookimpl
from mxgate.core.metadata import MessageHeaders, MessageMeta
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

__all__ = [
    "Accept",
    "Address",
    "AttemptContext",
    "AuthResult",
    "CalloutResult",
    "CalloutVerdict",
    "ConfigError",
    "ConfigProblem",
    "ConfigRegistry",
    "ConnectorSetting",
    "DeliveryReport",
    "Destination",
    "Disconnect",
    "DsnNotify",
    "DsnRet",
    "Envelope",
    "HostPolicy",
    "IncomingMessage",
    "MessageHeaders",
    "MessageMeta",
    "MessageOptions",
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
    "ReverseDnsStatus",
    "Route",
    "Runtime",
    "Session",
    "Stash",
    "StashKey",
    "TempFail",
    "TlsLevel",
    "TlsOutcome",
    "TlsPolicy",
    "TlsRptResult",
    "Verdict",
    "__version__",
    "add_config_arg",
    "hookimpl",
    "load_from_args",
    "private_file",
    "setting",
]
