"""A throw-away PKI for the TLS tests: a CA, a server certificate for 127.0.0.1/localhost, a client
certificate, and a second ("rogue") CA with a client certificate of its own that nobody trusts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fleet.tlsca import CertAuthority


@dataclass(frozen=True)
class Pki:
    """File paths of a throw-away PKI (all PEM; keys 0600)."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_client_cert: Path
    rogue_client_key: Path


def make_pki(directory: Path) -> Pki:
    """Create the CA and certificates in ``directory``."""
    ca = CertAuthority.create("twin test CA", days=2)
    ca.save(directory)
    ca.issue_server(["127.0.0.1"], days=2).write(directory / "server.pem", directory / "server.key")
    ca.issue_client("gw-test", days=2).write(directory / "client.pem", directory / "client.key")
    rogue = CertAuthority.create("rogue CA", days=2)
    rogue.save(directory / "rogue")
    rogue.issue_client("gw-test", days=2).write(directory / "rogue" / "client.pem", directory / "rogue" / "client.key")
    return Pki(directory, directory / "ca.pem", directory / "server.pem", directory / "server.key",
               directory / "client.pem", directory / "client.key", directory / "rogue" / "ca.pem",
               directory / "rogue" / "client.pem", directory / "rogue" / "client.key")
