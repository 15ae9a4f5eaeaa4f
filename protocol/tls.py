"""TLS client settings shared by the edge agent and the hub: the ``[mqtt]`` options and the SSL context.

Both connect to the broker the same way, so the options (``tls``, ``ca_file``, ``client_cert``,
``client_key``, ``tls_insecure``) and their checks live here once (docs/security.md, "TLS").
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Self

from pydantic import BaseModel, model_validator

MIN_TLS = ssl.TLSVersion.TLSv1_2
"""Oldest protocol version either side accepts (TLS 1.0 and 1.1 are deprecated by RFC 8996)."""


def client_context(ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None,
                   *, check_hostname: bool = True) -> ssl.SSLContext:
    """An SSL context that verifies the server against ``ca_file`` (default: the system's trust
    store), optionally presents a client certificate, and speaks TLS 1.2 or newer.

    ``check_hostname=False`` still verifies the chain, only not the name in the certificate.
    Reads the files (blocking, small): build it once, not per connection attempt.
    Raises ``OSError`` for an unreadable file and ``ssl.SSLError`` for one that is not PEM.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = MIN_TLS
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    ctx.check_hostname = check_hostname
    return ctx


class TlsClientOptions(BaseModel):
    """The TLS options of an ``[mqtt]`` section (mixed into the edge's and the hub's)."""

    tls: bool = False
    """Connect with TLS (the broker's TLS listener, usually port 8883)."""
    ca_file: Path | None = None
    """PEM file of the CA(s) the broker's certificate must be signed by; unset: the system's trust store."""
    client_cert: Path | None = None
    """PEM client certificate, for a broker that asks for one (``require_certificate true``)."""
    client_key: Path | None = None
    """Private key of ``client_cert`` (PEM, unencrypted; keep it mode 0600)."""
    tls_insecure: bool = False
    """Skip the check that the broker's certificate names ``host`` (the chain is still verified).
    Only for a broker reached by an address its certificate does not list."""

    @model_validator(mode="after")
    def _tls_options_consistent(self) -> Self:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together: set both or neither")
        if not self.tls:
            used = [k for k in ("ca_file", "client_cert", "client_key") if getattr(self, k) is not None]
            if self.tls_insecure:
                used.append("tls_insecure")
            if used:
                raise ValueError(f"{', '.join(used)} only apply with tls = true")
        return self

    def tls_context(self) -> ssl.SSLContext | None:
        """The SSL context for the broker connection, or None without ``tls``."""
        if not self.tls:
            return None
        return client_context(self.ca_file, self.client_cert, self.client_key, check_hostname=not self.tls_insecure)

    def tls_problems(self, base_dir: Path | None) -> tuple[dict[str, Path], list[tuple[str, str]]]:
        """Resolve relative file options against ``base_dir`` and check them: returns the resolved
        paths by key and ``(key, message)`` problems (missing file, not PEM), for the loaders to
        report with the file's line."""
        resolved: dict[str, Path] = {}
        for key in ("ca_file", "client_cert", "client_key"):
            value: Path | None = getattr(self, key)
            if value is not None:
                resolved[key] = value if value.is_absolute() or base_dir is None else base_dir / value
        problems = [(k, f"no such file: {p}") for k, p in resolved.items() if not p.is_file()]
        if problems or not self.tls:
            return resolved, problems
        try:
            ctx = ssl.create_default_context(cafile=str(resolved["ca_file"])) if "ca_file" in resolved else None
            del ctx
        except (ssl.SSLError, OSError) as exc:
            problems.append(("ca_file", f"not a usable PEM CA file ({resolved['ca_file']}): {exc}"))
        if "client_cert" in resolved:
            try:
                ssl.create_default_context().load_cert_chain(str(resolved["client_cert"]), str(resolved["client_key"]))
            except (ssl.SSLError, OSError) as exc:
                problems.append(("client_cert", f"certificate and key do not load together "
                                                f"({resolved['client_cert']}, {resolved['client_key']}): {exc}"))
        return resolved, problems
