"""The migration channel's security (version 2): TLS 1.3 with mutual authentication.

Two ways to authenticate, one TLS channel (protocol/migration-channel.md says why each is
sound):

- **certificates**: each side presents a certificate and key and verifies the other's
  against a CA file; the sender checks the receiver's name (the host it connects to, or
  the name it is told), the receiver may pin the sender's name.
- **token**: both sides hold the same secret (a file of at least 16 bytes, readable only
  by its owner). The receiver makes a fresh self-signed certificate for each listen; the
  sender accepts any certificate in the handshake, and then, inside the TLS channel and
  before anything else, both sides prove that they know the token with an HMAC over the
  receiver's certificate fingerprint and a fresh nonce from each side.

Bulk data cannot go from a VMM straight into a userspace TLS connection: ``_relay``
copies it between a pipe to the VMM and the TLS connection.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
import ssl
import stat
import tempfile
from dataclasses import dataclass
from typing import Any

from vmipc.errors import VmipcError

#: the shortest token accepted (bytes of the file, surrounding whitespace stripped)
MIN_TOKEN_BYTES = 16
#: the largest token file read
MAX_TOKEN_BYTES = 4096
NONCE_BYTES = 32
#: what each side's HMAC is over, besides the fingerprint and the nonces (a proof made
#: for one direction is never valid for the other)
_SENDER_LABEL = b"vmipc migration channel 2: sender proof"
_RECEIVER_LABEL = b"vmipc migration channel 2: receiver proof"


class ControlError(VmipcError):
    """The other side broke the control exchange, or refused a step (one line)."""


class Refused(ControlError):
    """The other side answered ``{ok: false}``: it refused the step (and says why)."""


class AuthenticationError(VmipcError):
    """The peer did not authenticate (bad certificate, wrong token, not TLS...)."""


class CredentialsError(VmipcError):
    """The credentials given cannot be used (missing file, loose permissions...)."""


@dataclass(frozen=True)
class Credentials:
    """How one side authenticates: certificate files, or a token (exactly one)."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    #: the peer's expected name: for the sender, the receiver's certificate name (default
    #: the host connected to); for the receiver, the sender's (default: any the CA signed)
    peer_name: str | None = None
    token: bytes | None = None

    @property
    def mode(self) -> str:
        return "token" if self.token is not None else "certificates"


def read_token(path: str) -> bytes:
    """The token in ``path``: a regular file of the caller's (or root's), readable by nobody
    else, with at least MIN_TOKEN_BYTES bytes once surrounding whitespace is stripped."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise CredentialsError(f"cannot open the token file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CredentialsError(f"the token file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise CredentialsError(
                f"the token file {path} is readable by others (mode {info.st_mode & 0o777:o}):"
                " chmod 600 it"
            )
        if info.st_uid not in (os.geteuid(), 0):
            raise CredentialsError(f"the token file {path} belongs to uid {info.st_uid}")
        token = file.read(MAX_TOKEN_BYTES + 1).strip()
    if len(token) > MAX_TOKEN_BYTES:
        raise CredentialsError(f"the token file {path} is over {MAX_TOKEN_BYTES} bytes")
    if len(token) < MIN_TOKEN_BYTES:
        raise CredentialsError(
            f"the token in {path} is shorter than {MIN_TOKEN_BYTES} bytes "
            "(make one with: head -c 32 /dev/urandom | base64 > FILE)"
        )
    return token


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (a name is resolved)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos
    )


# --- contexts -------------------------------------------------------------------------------


def _base_context(purpose: int) -> ssl.SSLContext:
    server = purpose == ssl.PROTOCOL_TLS_SERVER
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    if server:
        context.options |= ssl.OP_NO_TICKET  # one connection, no resumption wanted
    return context


def _load_certificates(context: ssl.SSLContext, creds: Credentials) -> None:
    if not (creds.cert and creds.key and creds.ca):
        raise CredentialsError("certificates need --tls-cert, --tls-key and --tls-ca")
    try:
        context.load_cert_chain(creds.cert, creds.key)
        context.load_verify_locations(cafile=creds.ca)
    except (OSError, ssl.SSLError) as exc:
        raise CredentialsError(f"cannot load the TLS credentials: {exc}") from None


def client_context(creds: Credentials) -> ssl.SSLContext:
    """The sender's context: verifies the receiver against the CA (certificates), or
    accepts any certificate because the token proof follows (token)."""
    context = _base_context(ssl.PROTOCOL_TLS_CLIENT)
    if creds.token is not None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the token proof binds the certificate instead
    else:
        _load_certificates(context, creds)
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def server_context(creds: Credentials) -> tuple[ssl.SSLContext, bytes | None]:
    """The receiver's context: requires and verifies the sender's certificate
    (certificates), or presents a fresh self-signed certificate (token; then also the
    SHA-256 fingerprint of that certificate, which the token proofs bind)."""
    context = _base_context(ssl.PROTOCOL_TLS_SERVER)
    if creds.token is not None:
        return context, _load_ephemeral_certificate(context)
    _load_certificates(context, creds)
    context.verify_mode = ssl.CERT_REQUIRED
    return context, None


def _load_ephemeral_certificate(context: ssl.SSLContext) -> bytes:
    """A fresh P-256 key and a self-signed certificate for it, loaded into ``context``
    (ssl loads keys only from files: a private temporary directory, removed at once)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmipc receive (ephemeral)")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    directory = tempfile.mkdtemp(prefix="vmipc-tls-")  # mode 0700
    try:
        cert_path = os.path.join(directory, "cert.pem")
        key_path = os.path.join(directory, "key.pem")
        with open(cert_path, "wb") as file:
            file.write(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        context.load_cert_chain(cert_path, key_path)
        return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
    finally:
        for path in ("cert.pem", "key.pem"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, path))
        os.rmdir(directory)


def peer_names(tls: ssl.SSLSocket) -> list[str]:
    """The DNS names and IP addresses of the peer's (verified) certificate, and its CN."""
    cert: dict[str, Any] = dict(tls.getpeercert() or {})
    names: list[str] = []
    for pair in cert.get("subjectAltName", ()):
        if pair[0] in ("DNS", "IP Address"):
            names.append(str(pair[1]))
    for rdn in cert.get("subject", ()):
        for attribute in rdn:
            if attribute[0] == "commonName":
                names.append(str(attribute[1]))
    return names


def check_peer_name(tls: ssl.SSLSocket, expected: str | None) -> None:
    if expected is None:
        return
    names = peer_names(tls)
    if expected not in names:
        shown = ", ".join(names[:4])[:200]
        raise AuthenticationError(
            f"the peer's certificate is for {shown or 'no name'}, not {expected}"
        )


# --- the token proof ------------------------------------------------------------------------


def receiver_fingerprint(tls: ssl.SSLSocket) -> bytes:
    """Sender: SHA-256 of the receiver's certificate (DER), as seen in the handshake."""
    der = tls.getpeercert(binary_form=True)
    if not der:
        raise AuthenticationError("the receiver presented no certificate")
    return hashlib.sha256(der).digest()


def proof(
    token: bytes, label: bytes, fingerprint: bytes, receiver_nonce: bytes, sender_nonce: bytes
) -> bytes:
    message = b"\0".join((label, fingerprint, receiver_nonce, sender_nonce))
    return hmac.new(token, message, hashlib.sha256).digest()


def sender_proof(
    token: bytes, fingerprint: bytes, receiver_nonce: bytes, sender_nonce: bytes
) -> bytes:
    return proof(token, _SENDER_LABEL, fingerprint, receiver_nonce, sender_nonce)


def receiver_proof(
    token: bytes, fingerprint: bytes, receiver_nonce: bytes, sender_nonce: bytes
) -> bytes:
    return proof(token, _RECEIVER_LABEL, fingerprint, receiver_nonce, sender_nonce)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def same(a: object, b: bytes) -> bool:
    return isinstance(a, bytes) and hmac.compare_digest(a, b)


# --- sockets --------------------------------------------------------------------------------


def hard_shutdown(sock: socket.socket) -> None:
    """Shut the TCP connection under ``sock`` down (a TLS socket too, without touching its
    TLS state, which another thread may be using): blocked reads and writes return."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
