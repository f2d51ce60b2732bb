"""`fedpriv certs`: the certificates and keys a deployment needs, and the server's checks on them.

Two different things are made here, because Flower uses two different mechanisms:

- TLS (the connection is encrypted and the client knows it talks to the real server): a private CA and a
  server certificate for the host names clients dial, both PEM X.509. Clients only need the CA certificate.
- SuperNode authentication (the server knows which data owners may join): one EC key pair per client in
  OpenSSH format, which is what `flower-supernode --auth-supernode-private-key` reads and
  `flwr supernode register` accepts. The server is given only the public halves.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common import ConfigError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
CLIENT_KEYS = "client-keys"
# P-384 is the curve Flower's docs use for SuperNode keys; `flwr supernode register` takes any NIST curve.
CURVE = ec.SECP384R1
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class CertError(ConfigError):
    """A certificate or key that cannot be used; the message names the file and how to make a good one."""


def client_name(index: int) -> str:
    """The name of client `index`: its key files here, and the data file `fedpriv split` writes for it."""
    return f"client-{index}"


@dataclass(frozen=True)
class CertFiles:
    """Where everything lives in a certificate folder made by `fedpriv certs`."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.root / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.root / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.root / SERVER_KEY

    @property
    def client_keys(self) -> Path:
        return self.root / CLIENT_KEYS

    def client_private_key(self, name: str) -> Path:
        return self.client_keys / f"{name}.key"

    def client_public_key(self, name: str) -> Path:
        return self.client_keys / f"{name}.pub"

    def public_keys(self) -> list[Path]:
        return sorted(self.client_keys.glob("*.pub")) if self.client_keys.is_dir() else []


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Private keys are created owner-only from the start, never world-readable for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _check_hosts(hosts: Sequence[str]) -> list[str]:
    cleaned = [h.strip() for h in hosts if h.strip()]
    if not cleaned:
        raise CertError("--hosts is empty; give the names clients dial, e.g. --hosts localhost 127.0.0.1")
    for host in cleaned:
        if host in WILDCARD_HOSTS or any(c in host for c in " /:@") and not _is_ip(host):
            raise CertError(f"host {host!r} cannot go in a certificate; give a DNS name or an IP address "
                            "that clients dial, e.g. --hosts server.example.org 10.0.0.5")
    return cleaned


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def issue_server_cert(files: CertFiles, hosts: Sequence[str], not_before: dt.datetime,
                      not_after: dt.datetime) -> None:
    """A server certificate for `hosts`, signed by the CA in `files` (kept separate so tests can make an
    expired one)."""
    ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    key = ec.generate_private_key(CURVE())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(files.server_key, _pem_key(key), private=True)
    _write(files.server_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)


def _make_ca(files: CertFiles, days: int) -> None:
    key = ec.generate_private_key(CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpriv deployment CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock differences between hosts
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(files.ca_key, _pem_key(key), private=True)
    _write(files.ca_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)


def make_client_keys(files: CertFiles, name: str) -> tuple[Path, Path]:
    """An OpenSSH EC key pair for SuperNode authentication; returns (private, public)."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(files.client_private_key(name), private, private=True)
    _write(files.client_public_key(name), public + f" {name}\n".encode(), private=False)
    return files.client_private_key(name), files.client_public_key(name)


def create_certs(out: str | Path, hosts: Sequence[str], clients: int, days: int = 365,
                 overwrite: bool = False) -> CertFiles:
    """A CA, a server certificate for `hosts` and `clients` client key pairs in `out`."""
    files = CertFiles(Path(out).expanduser().resolve())
    hosts = _check_hosts(hosts)
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 0:
        raise CertError(f"--clients {clients!r} is not allowed; give the number of client key pairs, >= 0")
    if not isinstance(days, int) or days < 1:
        raise CertError(f"--days {days!r} is not allowed; give how long the certificates stay valid, >= 1")
    existing = [p for p in (files.ca_cert, files.ca_key, files.server_cert, files.server_key) if p.exists()]
    if existing and not overwrite:
        raise CertError(f"{existing[0]} already exists; choose another --out, or pass --force to replace "
                        "(clients then need the new ca.crt)")
    _make_ca(files, days)
    now = _now()
    issue_server_cert(files, hosts, now - dt.timedelta(minutes=5), now + dt.timedelta(days=days))
    for i in range(clients):
        make_client_keys(files, client_name(i))
    return files


# ---- checks the server runs before it starts ---------------------------------------------------------------

def _load_cert(path: Path, fix: str) -> x509.Certificate:
    if not path.is_file():
        raise CertError(f"{path} is missing; {fix}")
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise CertError(f"{path} is not a PEM certificate; {fix}") from None


def check_validity(cert: x509.Certificate, path: Path, fix: str) -> None:
    now = _now()
    if cert.not_valid_after_utc < now:
        raise CertError(f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; {fix}")
    if cert.not_valid_before_utc > now:
        raise CertError(f"{path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check "
                        f"this machine's clock, or {fix}")


def cert_hosts(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + \
           [str(v) for v in san.get_values_for_type(x509.IPAddress)]


def check_server_certs(certs_dir: str | Path, host: str) -> CertFiles:
    """Everything `flower-superlink` needs for TLS exists, is in date, fits together and covers `host`."""
    files = CertFiles(Path(certs_dir).expanduser().resolve())
    fix = f"create certificates with `fedpriv certs --out {files.root} --hosts {host or 'HOST'}`"
    if not files.root.is_dir():
        raise CertError(f"certificate folder {files.root} does not exist; {fix}")
    ca = _load_cert(files.ca_cert, fix)
    cert = _load_cert(files.server_cert, fix)
    for c, p in ((ca, files.ca_cert), (cert, files.server_cert)):
        check_validity(c, p, fix)
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise CertError(f"{files.server_cert} was not issued by {files.ca_cert} ({type(exc).__name__}); "
                        f"{fix}") from None
    if not files.server_key.is_file():
        raise CertError(f"{files.server_key} is missing; {fix}")
    try:
        key = serialization.load_pem_private_key(files.server_key.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise CertError(f"{files.server_key} is not an unencrypted PEM private key; {fix}") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, pub) != \
            cert.public_key().public_bytes(serialization.Encoding.DER, pub):
        raise CertError(f"{files.server_key} does not match {files.server_cert}; use the key made with that "
                        f"certificate, or {fix}")
    hosts = cert_hosts(cert)
    if host not in WILDCARD_HOSTS and host not in hosts:
        raise CertError(f"{files.server_cert} is for {', '.join(hosts) or 'no host'}, not {host!r}; clients "
                        f"dialling {host} would refuse it; {fix}")
    return files


def check_public_key(path: Path) -> None:
    """A SuperNode public key `flwr supernode register` accepts: OpenSSH, EC on a NIST curve."""
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, OSError, UnsupportedAlgorithm) as exc:
        raise CertError(f"{path} is not an OpenSSH public key ({type(exc).__name__}); make client keys with "
                        "`fedpriv certs --clients N`") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        kind = type(key).__name__.replace("PublicKey", "")
        raise CertError(f"{path} is a {kind} key; SuperNode authentication "
                        "needs an EC key (ecdsa-sha2-nistp384), as `fedpriv certs --clients N` makes")


# ---- the command -------------------------------------------------------------------------------------------

def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("certs", help="create TLS certificates and client keys for a deployment",
                              description="Create a CA, a server certificate for the given host names and "
                                          "client key pairs for SuperNode authentication.")
    p.add_argument("--out", required=True, help="folder for the certificates and keys")
    p.add_argument("--hosts", nargs="+", default=["localhost", "127.0.0.1"],
                   help="DNS names and IP addresses clients use to reach the server "
                        "(default: localhost 127.0.0.1)")
    p.add_argument("--clients", type=int, default=0,
                   help="client key pairs to create: client-0, client-1, ...")
    p.add_argument("--days", type=int, default=365, help="validity of the certificates in days")
    p.add_argument("--force", action="store_true", help="replace certificates already in --out")
    p.set_defaults(func=run_certs)


def run_certs(args: argparse.Namespace) -> int:
    from common.paths import output_dir

    output_dir(args.out, "--out")
    files = create_certs(args.out, args.hosts, args.clients, args.days, overwrite=args.force)
    rel = files.root
    print(f"certificates for {', '.join(_check_hosts(args.hosts))}, valid {args.days} days, in {rel}:")
    print(f"  {CA_CERT:<22} CA certificate: clients verify the server with it (copy to every client)")
    print(f"  {CA_KEY:<22} CA private key: signs server certificates; keep it offline, give it to no one")
    print(f"  {SERVER_CERT:<22} server TLS certificate (stays on the server)")
    print(f"  {SERVER_KEY:<22} server TLS private key (stays on the server)")
    for i in range(args.clients):
        name = client_name(i)
        print(f"  {CLIENT_KEYS}/{name}.key   {name}'s SuperNode authentication private key: "
              f"give it to {name} only")
        print(f"  {CLIENT_KEYS}/{name}.pub   {name}'s public key: the server admits only clients whose "
              ".pub is here")
    print(f"server: fedpriv server --certs {rel} ...   "
          f"(reads ca.crt, server.crt, server.key, {CLIENT_KEYS}/*.pub)")
    if args.clients:
        print(f"client: fedpriv client --certs {rel} --client-id {client_name(0)} ...   "
              f"(reads ca.crt and {CLIENT_KEYS}/{client_name(0)}.key)")
    return 0
