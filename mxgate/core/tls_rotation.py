"""Server certificates that rotate: checking a certificate/key pair before it serves (:func:`pair_problem`) and
:class:`RotatingServerContext`, which swaps in replaced files while the listener runs. Part of
:mod:`mxgate.core.tls`, which re-exports these names."""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mxgate.core.tls_contexts import _REQUESTED_SNI, StrPath, _server_leaf_context
from mxgate.core.tls_names import normalize_dns_name

__all__ = ["RotatingServerContext", "ServedCertificates", "leaf_certificate", "not_after", "pair_problem"]


def pair_problem(cert_file: StrPath, key_file: StrPath) -> str | None:
    """Why this certificate chain and key cannot serve (unreadable, not PEM, key not matching), or None.

    Exactly what a server context does with them (``load_cert_chain``), so a pair that passes here loads at start.
    """
    data: dict[str, bytes] = {}
    for what, path in (("certificate", cert_file), ("key", key_file)):
        try:
            with open(path, "rb") as f:
                data[what] = f.read()
        except OSError as exc:
            return f"{os.fspath(path)}: cannot read the {what}: {(exc.strerror or str(exc)).lower()}"
    try:
        x509.load_pem_x509_certificates(data["certificate"])
    except ValueError:
        return f"{os.fspath(cert_file)}: not a PEM certificate chain"
    try:
        serialization.load_pem_private_key(data["key"], password=None)
    except (ValueError, TypeError):
        return f"{os.fspath(key_file)}: not a PEM private key (or one protected by a passphrase)"
    except Exception:  # an unsupported key type: let OpenSSL below judge it
        pass
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        reason = (exc.reason or str(exc)).lower().replace("_", " ")
        if "key values mismatch" in reason:
            return f"{os.fspath(key_file)}: the key does not match the certificate in {os.fspath(cert_file)}"
        return f"{os.fspath(cert_file)} / {os.fspath(key_file)}: not a PEM certificate chain and key ({reason})"
    except OSError as exc:
        return f"{os.fspath(cert_file)}: {(exc.strerror or str(exc)).lower()}"
    return None


def leaf_certificate(cert_file: StrPath) -> x509.Certificate:
    """The first certificate of a PEM chain file (raises OSError or ValueError)."""
    with open(cert_file, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def not_after(cert: x509.Certificate) -> datetime:
    return cert.not_valid_after_utc


FileStamp = tuple[tuple[int, int, int, int] | None, ...]


def _stamp(paths: Sequence[StrPath]) -> FileStamp:
    out: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class ServedCertificates:
    """One consistent set of a listener's certificates: the default context and leaf, and the SNI ones."""

    default: ssl.SSLContext
    leaf: x509.Certificate
    by_name: Mapping[str, ssl.SSLContext]
    leaves: Mapping[str, x509.Certificate]  # "" (the default) and every SNI name -> leaf certificate


@dataclass(frozen=True, slots=True)
class _Target:
    """The files a :class:`RotatingServerContext` serves from."""

    pairs: tuple[tuple[str, StrPath, StrPath], ...]  # ("" for the default | SNI name, cert, key)
    client_ca_file: StrPath | None
    request_client_cert: bool

    @classmethod
    def of(
        cls,
        cert_file: StrPath,
        key_file: StrPath,
        sni: Mapping[str, tuple[StrPath, StrPath]] | None,
        client_ca_file: StrPath | None,
        request_client_cert: bool,
    ) -> _Target:
        pairs = [("", cert_file, key_file)]
        pairs += [(normalize_dns_name(name) or name.lower(), c, k) for name, (c, k) in (sni or {}).items()]
        return cls(tuple(pairs), client_ca_file, request_client_cert)

    @property
    def files(self) -> list[StrPath]:
        out: list[StrPath] = [p for _, c, k in self.pairs for p in (c, k)]
        return out if self.client_ca_file is None else [*out, self.client_ca_file]

    def build(self) -> ServedCertificates:
        contexts: dict[str, ssl.SSLContext] = {}
        leaves: dict[str, x509.Certificate] = {}
        for name, cert, key in self.pairs:
            contexts[name] = _server_leaf_context(cert, key, self.client_ca_file, self.request_client_cert)
            leaves[name] = leaf_certificate(cert)
        default = contexts.pop("")
        return ServedCertificates(default, leaves[""], contexts, leaves)


class RotatingServerContext:
    """A listener's server context whose certificate and key files may be replaced while it runs (ACME renewals,
    DANE key rollovers), with no restart.

    :attr:`context` is what the listener hands to every handshake; it never changes. Its server-name callback,
    which OpenSSL calls in every handshake (with or without SNI), moves the connection to the context of the
    current :class:`ServedCertificates` — the default or the one for the SNI name. :meth:`refresh` rebuilds the
    whole set from the files when any of them changed and swaps it in at once, only if every pair loads (each
    ``load_cert_chain`` checks that the key matches its certificate): while an ACME client has written the new
    certificate but not yet the new key, the old pair keeps serving, and the next refresh after the key arrives
    takes both. Handshakes in progress keep the context they started with.
    """

    def __init__(
        self,
        cert_file: StrPath,
        key_file: StrPath,
        *,
        sni: Mapping[str, tuple[StrPath, StrPath]] | None = None,
        client_ca_file: StrPath | None = None,
        request_client_cert: bool = False,
    ) -> None:
        self._target = _Target.of(cert_file, key_file, sni, client_ca_file, request_client_cert)
        self._stamp = _stamp(self._target.files)
        self._failed: FileStamp | None = None
        self.current = self._target.build()  # errors at start are the caller's
        self.context = _server_leaf_context(cert_file, key_file, client_ca_file, request_client_cert)
        self.context.sni_callback = self._pick

    def prepare(
        self,
        cert_file: StrPath,
        key_file: StrPath,
        *,
        sni: Mapping[str, tuple[StrPath, StrPath]] | None = None,
        client_ca_file: StrPath | None = None,
        request_client_cert: bool = False,
    ) -> Callable[[], None]:
        """Load other files (a reloaded configuration) now; returns what switches to them. Raises (OSError,
        ValueError, ssl.SSLError) when they do not load: nothing changed then."""
        target = _Target.of(cert_file, key_file, sni, client_ca_file, request_client_cert)
        stamp = _stamp(target.files)
        fresh = target.build()

        def adopt() -> None:
            self._target, self._stamp, self._failed, self.current = target, stamp, None, fresh

        return adopt

    def _pick(self, ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        current = self.current
        chosen = None
        if server_name is not None:
            name = server_name.rstrip(".").lower()
            with contextlib.suppress(TypeError):  # not weak-referenceable: just not recorded
                _REQUESTED_SNI[ssl_object] = name
            chosen = current.by_name.get(name)
            if chosen is None and "." in name:
                chosen = current.by_name.get("*." + name.split(".", 1)[1])
        ssl_object.context = chosen or current.default
        return None

    def refresh(self) -> str | None:
        """Reload when the files changed. Returns None when nothing changed or the new set serves now; else why
        the new files were refused (the previous set keeps serving; the same files are not tried again)."""
        stamp = _stamp(self._target.files)
        if stamp == self._stamp or stamp == self._failed:
            return None
        try:
            fresh = self._target.build()
        except (OSError, ValueError, ssl.SSLError) as exc:
            self._failed = stamp
            return _load_error(exc)
        self.current, self._stamp, self._failed = fresh, stamp, None
        return None


def _load_error(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or str(exc)).lower().replace("_", " ")
        if "key values mismatch" in reason:
            return "the key does not match its certificate"
        return f"not a PEM certificate chain and key ({reason})"
    if isinstance(exc, OSError):
        return f"{exc.filename or ''}: {(exc.strerror or str(exc)).lower()}".lstrip(": ")
    return str(exc)
