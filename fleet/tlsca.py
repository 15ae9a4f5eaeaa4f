"""A private certificate authority for the broker's and the hub's TLS (tests and small fleets).

The tests make a throw-away CA in a temp dir for every run; operators without a company PKI can
keep one on an offline machine and issue the broker's, the hub's and (optionally) each gateway's
certificate from it (docs/security.md, "TLS")::

    python -m fleet.tlsca /etc/twin/pki --host broker.example.net --host hub.example.net
    python -m fleet.tlsca /etc/twin/pki --client gw-1

The first run creates ``ca.pem`` and ``ca.key`` in the directory; later runs reuse them, so the
gateways keep trusting the same ``ca.pem``. Private keys are written mode 0600.
Keys are ECDSA P-256: small, fast on a Raspberry Pi, accepted by Mosquitto, OpenSSL and browsers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
"""Names a server certificate carries by default, so the same certificate works on the machine itself."""

_FILE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "digital-twin"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        """The certificate, PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """The private key, unencrypted PKCS#8 PEM (the broker and uvicorn read it at start without a prompt)."""
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write the certificate (0644) and the key (0600)."""
        write_file(cert_path, self.cert_pem, private=False)
        write_file(key_path, self.key_pem, private=True)


def write_file(path: Path, data: bytes, *, private: bool) -> None:
    """Write ``data`` to ``path``; a private file is created 0600 and never readable by others, even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    try:
        os.fchmod(fd, 0o600 if private else 0o644)  # the umask may have taken bits away; or an old file had more
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class CertAuthority:
    """A self-signed CA that issues server and client certificates."""

    def __init__(self, issued: Issued) -> None:
        self.issued = issued

    @property
    def cert(self) -> x509.Certificate:
        """The CA certificate (what clients trust: ``ca.pem``)."""
        return self.issued.cert

    @classmethod
    def create(cls, common_name: str = "digital-twin private CA", days: int = 3650) -> CertAuthority:
        """A new CA key and self-signed certificate valid for ``days``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = (x509.CertificateBuilder()
                .subject_name(_name(common_name)).issuer_name(_name(common_name))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                # path_length=0: this CA signs end-entity certificates only, never another CA.
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return cls(Issued(cert, key))

    @classmethod
    def load(cls, directory: Path) -> CertAuthority:
        """The CA kept in ``directory`` (``ca.pem``, ``ca.key``)."""
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{directory / 'ca.key'}: not an EC key made by fleet.tlsca")
        return cls(Issued(cert, key))

    def save(self, directory: Path) -> None:
        """Write ``ca.pem`` (for every client) and ``ca.key`` (0600; keep it off the servers)."""
        self.issued.write(directory / "ca.pem", directory / "ca.key")

    def _issue(self, common_name: str, days: int, usage: x509.ObjectIdentifier,
               hosts: list[str] | None = None) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        builder = (x509.CertificateBuilder()
                   .subject_name(_name(common_name)).issuer_name(self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.issued.key.public_key()),
                                  critical=False))
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        return Issued(builder.sign(self.issued.key, hashes.SHA256()), key)

    def issue_server(self, hosts: list[str], *, loopback: bool = True, days: int = 825) -> Issued:
        """A server certificate for ``hosts`` (DNS names or IP addresses; clients check these names),
        plus localhost, 127.0.0.1 and ::1 unless ``loopback`` is false."""
        names = list(dict.fromkeys([*hosts, *(LOOPBACK_HOSTS if loopback else ())]))
        if not names:
            raise ValueError("a server certificate needs at least one host name or address")
        return self._issue(names[0], days, ExtendedKeyUsageOID.SERVER_AUTH, names)

    def issue_client(self, common_name: str, *, days: int = 825) -> Issued:
        """A client certificate (e.g. one per gateway, for a broker with ``require_certificate true``)."""
        return self._issue(common_name, days, ExtendedKeyUsageOID.CLIENT_AUTH)


def main(argv: list[str] | None = None) -> int:
    """``python -m fleet.tlsca DIR --host NAME ... --client NAME ...``"""
    p = argparse.ArgumentParser(prog="python -m fleet.tlsca", description=(
        "Create a private CA in DIR (or reuse the one there) and issue certificates from it. "
        "Give ca.pem to every client; keep ca.key away from the servers."))
    p.add_argument("dir", type=Path, help="directory of ca.pem/ca.key and the issued files")
    p.add_argument("--host", action="append", default=[],
                   help="DNS name or IP address the server is reached by (repeat); issues <first host>.pem/.key")
    p.add_argument("--name", help="file name of the server certificate (default: the first --host)")
    p.add_argument("--no-loopback", action="store_true", help="leave localhost, 127.0.0.1 and ::1 out of the SANs")
    p.add_argument("--client", action="append", default=[],
                   help="issue a client certificate with this common name (repeat): client-<name>.pem/.key")
    p.add_argument("--days", type=int, default=825, help="validity of issued certificates (default 825)")
    p.add_argument("--ca-days", type=int, default=3650, help="validity of a new CA (default 3650)")
    args = p.parse_args(argv)
    if not args.host and not args.client and (args.dir / "ca.pem").exists():
        p.error("nothing to do: give --host and/or --client")
    for n in [args.name, *args.client]:
        if n is not None and not _FILE_NAME.match(n):
            p.error(f"{n!r}: use letters, digits, '.', '_' and '-' only (it becomes a file name)")
    d: Path = args.dir
    if (d / "ca.pem").exists():
        ca = CertAuthority.load(d)
        print(f"using the CA in {d / 'ca.pem'}")
    else:
        ca = CertAuthority.create(days=args.ca_days)
        ca.save(d)
        print(f"created {d / 'ca.pem'} (give it to every client) and {d / 'ca.key'} (keep it secret)")
    if args.host:
        name = args.name or args.host[0]
        if not _FILE_NAME.match(name):
            p.error(f"{name!r} cannot be a file name; give --name")
        server = ca.issue_server(args.host, loopback=not args.no_loopback, days=args.days)
        server.write(d / f"{name}.pem", d / f"{name}.key")
        sans = server.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        print(f"issued {d / (name + '.pem')} and {d / (name + '.key')} for {', '.join(str(n.value) for n in sans)}")
    for client in args.client:
        issued = ca.issue_client(client, days=args.days)
        issued.write(d / f"client-{client}.pem", d / f"client-{client}.key")
        print(f"issued {d / f'client-{client}.pem'} and {d / f'client-{client}.key'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
