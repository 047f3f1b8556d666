"""An SMTP submission server for tests: aiosmtpd with STARTTLS required, a recording handler.

aiosmtpd is a test-only dependency. The certificate is self-signed, made here with `cryptography`
for 127.0.0.1, so the client really verifies it (given the cert as its CA file).
"""

from __future__ import annotations

import asyncio
import datetime
import email
import ipaddress
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.policy import default
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "smtp.crt", directory / "smtp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


class Recorder:
    """Records each message with the envelope, whether the session was TLS, and who logged in."""

    def __init__(self, users: dict[str, str] | None = None) -> None:
        self.messages: list[dict[str, Any]] = []
        self.users = users or {}
        self.reply: str | None = None
        """Answer DATA with this instead of 250 (e.g. '451 4.3.0 try later')."""

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        if self.reply:
            return self.reply
        self.messages.append(
            {
                "mail_from": envelope.mail_from,
                "rcpt_tos": list(envelope.rcpt_tos),
                "tls": session.ssl is not None,
                "login": session.auth_data.login.decode() if session.authenticated else None,
                "message": email.message_from_bytes(envelope.content, policy=default),
            }
        )
        return "250 2.0.0 OK"

    def authenticate(
        self, server: SMTP, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        if isinstance(data, LoginPassword) and self.users.get(data.login.decode()) == data.password.decode():
            return AuthResult(success=True, auth_data=data)
        return AuthResult(success=False, handled=False)


@asynccontextmanager
async def smtp_server(recorder: Recorder, cert: Path, key: Path) -> AsyncIterator[int]:
    """Serve on 127.0.0.1:<free port> with STARTTLS required; yield the port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(
            recorder,
            hostname="127.0.0.1",
            tls_context=context,
            require_starttls=True,
            authenticator=recorder.authenticate,
            auth_require_tls=True,
        ),
        "127.0.0.1",
        0,
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()
