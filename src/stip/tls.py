"""TLS 1.3 for every link stip opens, on the standard library's `ssl`.

    fp = tls.self_signed("s1.crt", "s1.key")                 # "sha256:…", what users pin
    ctx = tls.server_context("s1.crt", "s1.key")            # a server: TLS 1.3 only
    trust = tls.Trust(pin=fp)                               # or Trust(ca="ca.pem")
    sock = tls.connect("10.0.0.5", 7001, trust)             # verified before a byte is sent
    httpx.Client(verify=tls.httpx_verify("https://10.0.0.5:8000", trust))

A peer is trusted by a pinned certificate fingerprint (SHA-256 over the DER certificate,
as `openssl x509 -fingerprint -sha256` prints it) or by a CA file with host-name checks.
Plain TCP is allowed only on loopback, or when the caller says ``insecure`` outright
(`plain_allowed`): a tool that promises privacy does not leave its links open by accident.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .errors import StipError

PIN_PREFIX = "sha256:"


class TrustError(StipError, ConnectionError):
    """The peer is not the one P3 trusts: a pin mismatch, an unknown CA, a bad host name."""


def fingerprint(cert: bytes | str | Path) -> str:
    """``sha256:<hex>`` of a certificate given as DER bytes, PEM text/bytes, or a PEM file."""
    if isinstance(cert, Path) or (isinstance(cert, str) and "-----BEGIN" not in cert):
        cert = Path(cert).read_text()
    if isinstance(cert, bytes) and b"-----BEGIN" in cert:
        cert = cert.decode()
    der = ssl.PEM_cert_to_DER_cert(cert) if isinstance(cert, str) else cert
    return PIN_PREFIX + hashlib.sha256(der).hexdigest()


def parse_pin(pin: str) -> str:
    """Normalise ``sha256:AB:CD:…`` or bare hex to ``sha256:abcd…``; ValueError otherwise."""
    body = pin.strip().lower().removeprefix(PIN_PREFIX).replace(":", "")
    if len(body) != 64 or any(c not in "0123456789abcdef" for c in body):
        raise ValueError("a pin is sha256: followed by 64 hex digits (stip tls-cert prints one)")
    return PIN_PREFIX + body


@dataclass(frozen=True)
class Trust:
    """Whom P3 trusts at the other end of one link: a pinned fingerprint, or a CA file."""

    pin: str | None = None
    ca: str | Path | None = None

    def __post_init__(self):
        if (self.pin is None) == (self.ca is None):
            raise ValueError("trust a peer by a pin or by a CA file, exactly one")
        if self.pin is not None:
            object.__setattr__(self, "pin", parse_pin(self.pin))
        elif not Path(self.ca).is_file():
            raise ValueError(f"CA file {self.ca} does not exist")

    def context(self, host: str | None = None) -> ssl.SSLContext:
        """A TLS 1.3 client context. With a pin, the chain is checked by `check` after the
        handshake (before any byte is sent); with a CA, by OpenSSL, host name included."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        if self.pin is not None:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx.load_verify_locations(cafile=str(self.ca))
        return ctx

    def check(self, sock: ssl.SSLSocket, where: str) -> None:
        if self.pin is None:
            return
        der = sock.getpeercert(binary_form=True)
        got = fingerprint(der) if der else "no certificate"
        if got != self.pin:
            raise TrustError(f"{where} presented certificate {got[:23]}…, not the pinned {self.pin[:23]}…: refusing to send anything")


def server_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """TLS 1.3 only; the certificate and its key as PEM files."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"cannot load the TLS certificate {cert} with key {key}: {getattr(e, 'strerror', None) or e}") from None
    return ctx


def connect(host: str, port: int, trust: Trust | None, timeout: float) -> socket.socket:
    """A TCP connection, wrapped in TLS and verified when ``trust`` is given."""
    raw = socket.create_connection((host, port), timeout=timeout)
    if trust is None:
        return raw
    sock = None
    try:
        sock = trust.context().wrap_socket(raw, server_hostname=host)  # SNI; names checked only with a CA
        trust.check(sock, f"{host}:{port}")
    except ssl.SSLCertVerificationError as e:
        raw.close()
        raise TrustError(f"{host}:{port}: certificate not trusted ({e.verify_message})") from None
    except BaseException:
        (raw if sock is None else sock).close()  # wrap_socket took over raw's descriptor
        raise
    return sock


def httpx_verify(url: str, trust: Trust | None) -> ssl.SSLContext | bool:
    """What to pass as httpx's ``verify`` for ``url``. A pin is enforced on every connection:
    the pinned certificate, fetched once and checked, becomes the only trust anchor."""
    if trust is None:
        return True
    if trust.pin is None:
        return trust.context()
    parts = urlsplit(url)
    if parts.scheme != "https":
        raise ValueError(f"{url}: a pin needs an https:// URL")
    with connect(parts.hostname, parts.port or 443, trust, timeout=10.0) as sock:
        der = sock.getpeercert(binary_form=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # the pin names the certificate itself
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a leaf pinned as its own anchor
    ctx.load_verify_locations(cadata=ssl.DER_cert_to_PEM_cert(der))
    return ctx


def is_loopback(host: str | None) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address((host or "").strip("[]")).is_loopback
    except ValueError:
        return False


def plain_allowed(host: str, insecure: bool, what: str) -> None:
    """Plain TCP only on loopback or under an explicit ``insecure``; ValueError otherwise."""
    if not insecure and not is_loopback(host):
        raise ValueError(f"{what} at {host} without TLS: give a pin or a CA (or --insecure, on a network you trust)")


def self_signed(cert_path: str | Path, key_path: str | Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
                days: int = 825) -> str:  # fmt: skip
    """Write a fresh self-signed certificate (ECDSA P-256) and its key (mode 0600); return
    its fingerprint, the pin P3 uses."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "stip")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = Path(key_path), Path(cert_path)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file that exists already
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(pem)
    return fingerprint(pem)
