"""The ``[plugins.tlsrpt]`` section: every key with its type, default, description and check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mxgate import check_hostname, check_optional_hostport, check_positive, setting

__all__ = ["TlsRptConfig"]


def _check_non_negative(value: Any) -> str | None:
    return None if value >= 0 else "expected a number of 0 or more"


def _check_optional_hostname(value: Any) -> str | None:
    return None if not value else check_hostname(value)


@dataclass(frozen=True, slots=True)
class TlsRptConfig:
    enabled: bool = setting(True, desc="Collect TLS outcomes and send reports.")
    organization_name: str = setting("", desc="organization-name in reports we send; default: the submitter.")
    contact_info: str = setting("", desc="contact-info in reports we send (a mailbox or URL); default: the From.")
    submitter: str = setting(
        "", desc="Submitter domain (TLS-Report-Submitter); default: server.hostname.", check=_check_optional_hostname
    )
    mail_from: str = setting(
        "", desc="From and envelope sender of mailed reports; default: tlsrpt-noreply@<submitter>."
    )
    dkim_selector: str = setting("", desc="DKIM selector for mailed reports (publish the key with s=tlsrpt).")
    dkim_domain: str = setting("", desc="DKIM d= domain; default: the submitter.")
    dkim_key_file: str = setting("", desc="RSA private key (PEM) for DKIM; without it no report is mailed.")
    send_window_hours: float = setting(
        4.0,
        desc="Reports go out after a random delay of up to this many hours past midnight UTC.",
        check=_check_non_negative,
    )
    flush_interval: float = setting(
        5.0,
        desc="Seconds between writes of the counts to disk (a crash loses at most this much).",
        check=check_positive,
    )
    retention_days: int = setting(
        30, desc="Days counts, sent reports and received reports are kept.", check=check_positive
    )
    https_ca_file: str = setting("", desc="CA bundle for HTTPS report endpoints; default: the system store.")
    receive_mailbox: str = setting("", desc="Our rua mailbox: reports mailed to it are parsed and kept.")
    receive_deliver: bool = setting(True, desc="Still deliver report mails to receive_mailbox (false: drop them).")
    receive_require_dkim: bool = setting(
        True, desc="Keep mailed reports only with a valid DKIM signature (RFC 8460 5.3)."
    )
    receive_listen: str = setting(
        "", desc='HTTPS endpoint for reports, "host:port"; unset: off.', check=check_optional_hostport
    )
    receive_cert: str = setting("", desc="Certificate chain (PEM) of the HTTPS endpoint.")
    receive_key: str = setting("", desc="Private key (PEM) of the HTTPS endpoint.")
    receive_max_bytes: int = setting(
        1048576,
        desc="Largest report accepted, in bytes, as sent and once decompressed (HTTPS: 413 beyond).",
        check=check_positive,
    )
    receive_max_policies: int = setting(
        100, desc="Most policies in one received report; more: refused (HTTPS: 413).", check=check_positive
    )
    receive_max_failure_details: int = setting(
        1000,
        desc="Most failure-details in one received report, all policies together; more: refused (HTTPS: 413).",
        check=check_positive,
    )
    receive_reports_per_hour: int = setting(
        60,
        desc="POSTs one client address may make to the HTTPS endpoint per hour (in bursts of as many); more: "
        "429 with Retry-After.",
        check=check_positive,
    )
    receive_store_limit: int = setting(
        268435456,
        desc="Size in bytes of the TLS-RPT store (tlsrpt.sqlite3 and its WAL) past which received reports are "
        "refused (HTTPS: 507) until retention makes room; our own counts are still kept.",
        check=check_positive,
    )
    receive_retention_days: int = setting(
        30, desc="Days received reports (their counts) are kept.", check=check_positive
    )
