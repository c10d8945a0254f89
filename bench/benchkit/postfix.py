"""A Postfix instance of our own, from a temporary directory, torn down afterwards.

``postfix -c DIR start`` with a config directory holding a main.cf and a minimal master.cf (smtpd on a free
loopback port plus the services a relay needs); queue and data directories under the same temporary directory
(so on the same disk as mxgate's state), ``maillog_file`` there too (postlogd), no syslog needed. Durability is
Postfix's default (cleanup fsyncs the queue file before smtpd answers 250). Mail for every domain goes to
``relayhost = [127.0.0.1]:SINKPORT``.

Stopping is ``postfix -c DIR stop``; whatever is left in the process group afterwards is killed. The
orchestrator also registers the stop with atexit and runs it from ``finally``.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchkit.procs import ProcGroup, free_port, wait_port

POSTFIX = "/usr/sbin/postfix"

# name type private unpriv chroot wakeup maxproc command
_MASTER_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
tlsproxy  unix  -       -       n       -       0       tlsproxy
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
showq     unix  n       -       n       -       -       showq
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def available() -> bool:
    return os.access(POSTFIX, os.X_OK) and os.geteuid() == 0


class PostfixInstance:
    """A relay-only Postfix on 127.0.0.1:``port``.

    :param relay_port: the sink's port (``relayhost = [127.0.0.1]:relay_port``); ``None`` delivers by MX/DNS.
    :param tls_cert: offer STARTTLS inbound with this chain/key; ``smtp_tls`` sets the outbound TLS level.
    :param smtpd_maxproc: smtpd process limit (Postfix's default is 100); the idle scenario raises it.
    :param extra: more main.cf settings.
    """

    def __init__(
        self,
        group: ProcGroup,
        *,
        relay_port: int | None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        smtp_tls: str | None = None,
        smtpd_maxproc: int | None = None,
        extra: dict[str, str] | None = None,
        workdir: Path | None = None,
        dane_nexthop: str | None = None,
        resolver: str | None = None,
    ) -> None:
        self.group = group
        self.relay_port = relay_port
        self.tls_cert, self.tls_key, self.smtp_tls = tls_cert, tls_key, smtp_tls
        self.smtpd_maxproc = smtpd_maxproc
        self.dane_nexthop = dane_nexthop  # "domain:port": MX lookup, DANE-verified TLS (relay_port unused)
        self.resolver = resolver  # an address on port 53 that Postfix's libc resolver is to use
        self.extra = dict(extra or {})
        self.dir = Path(tempfile.mkdtemp(prefix="mxbench-postfix-", dir=workdir))
        self.conf = self.dir / "conf"
        self.host = "127.0.0.1"
        self.port = 0
        self.started = False

    def main_cf(self) -> dict[str, str]:
        d = self.dir
        main = {
            "compatibility_level": "3.7",
            "queue_directory": str(d / "spool"),
            "data_directory": str(d / "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": "postfix.bench.test",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "maillog_file": str(d / "maillog"),
            "maillog_file_prefixes": str(d),
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "message_size_limit": "104857600",
        }
        if self.relay_port is not None:
            main["relayhost"] = f"[127.0.0.1]:{self.relay_port}"
            main["disable_dns_lookups"] = "yes"  # the relay host is an address; no DNS on the hot path
        if self.dane_nexthop:
            main.update(
                relayhost=self.dane_nexthop,  # no brackets: MX lookup for the domain, then this port
                smtp_dns_support_level="dnssec",
                smtp_tls_security_level="dane",
                smtp_host_lookup="dns",
                smtp_tls_loglevel="1",  # one line per connection: "Verified TLS connection established"
            )
        if self.tls_cert:
            main.update(
                smtpd_tls_cert_file=self.tls_cert,
                smtpd_tls_key_file=str(self.tls_key),
                smtpd_tls_security_level="may",
            )
        if self.smtp_tls:
            main["smtp_tls_security_level"] = self.smtp_tls
        if self.smtpd_maxproc:
            main["default_process_limit"] = str(max(100, self.smtpd_maxproc))
        main.update(self.extra)
        return main

    def write_config(self) -> None:
        self.conf.mkdir(parents=True)
        for sub in ("spool", "data"):
            (self.dir / sub).mkdir()
        os.chmod(self.dir, 0o755)
        pf = pwd.getpwnam("postfix")
        os.chown(self.dir / "data", pf.pw_uid, grp.getgrnam("postfix").gr_gid)
        main = "\n".join(f"{k} = {v}" for k, v in self.main_cf().items()) + "\n"
        (self.conf / "main.cf").write_text(main)
        maxproc = str(self.smtpd_maxproc) if self.smtpd_maxproc else "-"
        smtpd = f"{self.host}:{self.port} inet n - n - {maxproc} smtpd\n"
        (self.conf / "master.cf").write_text(smtpd + _MASTER_SERVICES)

    def start(self) -> PostfixInstance:
        self.port = free_port()
        self.write_config()
        cmd = [POSTFIX, "-c", str(self.conf), "start"]
        if self.resolver:
            # libc reads /etc/resolv.conf (port 53 only): give this Postfix its own, in a private mount
            # namespace that its daemons inherit; the machine's resolver configuration is not touched
            resolv = self.dir / "resolv.conf"
            resolv.write_text(f"nameserver {self.resolver}\noptions edns0 trust-ad\n")
            script = f'mount --bind "{resolv}" /etc/resolv.conf && exec "$@"'
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *cmd]
        res = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=self.group.join,  # master and all its children are charged to the group
            check=False,
        )
        self.started = True
        pid = self.master_pid()
        if pid:
            self.group.add_root(pid)
        if res.returncode != 0 or not wait_port(self.host, self.port, 15.0):
            raise RuntimeError(f"postfix did not start (rc={res.returncode}): {res.stderr}\n{self.log_tail()}")
        return self

    def master_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.dir / "spool" / "pid" / "master.pid").read_text().split()[0])
        return None

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.dir / "maillog").read_text(errors="replace").splitlines()[-lines:])
        return ""

    def queue_empty(self) -> bool:
        spool = self.dir / "spool"
        for sub in ("incoming", "active", "deferred", "maildrop"):
            for _root, _dirs, files in os.walk(spool / sub):
                if files:
                    return False
        return True

    def stop(self) -> None:
        """``postfix -c DIR stop``, then kill leftovers and remove the directory. Idempotent."""
        if self.started:
            self.started = False
            with contextlib.suppress(Exception):
                subprocess.run([POSTFIX, "-c", str(self.conf), "stop"], capture_output=True, timeout=30, check=False)
            deadline = time.monotonic() + 10.0
            while self.group.pids() and time.monotonic() < deadline:
                time.sleep(0.1)
            self.group.kill_all()
        shutil.rmtree(self.dir, ignore_errors=True)
