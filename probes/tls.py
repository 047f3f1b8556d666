"""TLS probes: does the handshake succeed, for the right name, with a certificate that lasts?

An expired or wrong certificate takes a shop down as surely as a dead server, and an expiring one
is an outage with a date on it. A run connects, does the handshake with verification and hostname
checking on (as every browser does), and reads the leaf certificate's expiry.

Outcomes, and how the detector is meant to read them:

- handshake fails verification (expired, not yet valid, wrong name, untrusted CA): a hard
  failure; the reason says which, e.g. "certificate expired 3 days ago" or "hostname mismatch:
  certificate is for other.example, not shop.example". Working that out needs the certificate the
  verification refused, so a second, unverified handshake fetches it (only on this path).
- handshake succeeds but `days_remaining` fails `expect.days_remaining` (default `{ge: 14}`): the
  result is a failure with `details["degraded"] = True`. The site works today; the detector is
  to treat it as DEGRADED, never DOWN, whatever the probe's `impact`.
- otherwise it passes. `details` always has `degraded` (bool) and, when a certificate was seen,
  `days_remaining` (whole days, negative once expired) and `not_after` (ISO 8601, UTC).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import math
import os
import ssl
import time
from typing import Any

from probes.base import Check, ProbeResult, prober_error_of, single_step
from probes.models import TlsExpect as TlsExpect  # re-exported: the config models live in probes/models.py
from probes.models import TlsProbe
from probes.resolve import RESOLVE_SHARE, first_address, literal
from probes.tcp import close_quietly, describe_os_error

#: OpenSSL verify codes we explain in words (X509_V_ERR_*).
_NOT_YET_VALID, _EXPIRED, _HOSTNAME_MISMATCH, _IP_MISMATCH = 9, 10, 62, 64
_UNTRUSTED = {18, 19, 20, 21}  # self-signed, self-signed in chain, no local issuer, leaf only


@functools.lru_cache(maxsize=32)
def _context(ca_file: str | None, _mtime: int) -> ssl.SSLContext:
    """Contexts are costly to build (the system CA store is parsed); reuse them until the file changes."""
    return ssl.create_default_context(cafile=ca_file)


def context_for(ca_file: str | None) -> ssl.SSLContext:
    mtime = os.stat(ca_file).st_mtime_ns if ca_file else 0
    return _context(ca_file, mtime)


def _ago(seconds: float) -> str:
    days = seconds / 86400
    if days >= 1:
        n = math.floor(days)
        return f"{n} day{'s' if n != 1 else ''}"
    hours = max(1, round(seconds / 3600))
    return f"{hours} hour{'s' if hours != 1 else ''}"


async def _unverified_der(host: str, port: int, sni: str, within: float) -> bytes | None:
    """The leaf certificate as DER, fetched without verification, to explain why verification failed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(max(within, 0.05)):
            _, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=sni)
            try:
                obj = writer.get_extra_info("ssl_object")
                return obj.getpeercert(binary_form=True) if obj is not None else None
            finally:
                await close_quietly(writer)
    except (TimeoutError, OSError, ssl.SSLError):
        return None


def _describe_cert(der: bytes) -> tuple[dt.datetime, dt.datetime, list[str]] | None:
    """(not_before, not_after, names) of a DER certificate; None if it cannot be read."""
    try:
        from cryptography import x509
        from cryptography.x509.oid import NameOID
    except ImportError:  # pragma: no cover - cryptography is a dependency; degrade to OpenSSL's words
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
        names: list[str] = []
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names += san.get_values_for_type(x509.DNSName)
            names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        except x509.ExtensionNotFound:
            pass
        if not names:
            names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        return cert.not_valid_before_utc, cert.not_valid_after_utc, names
    except ValueError:
        return None


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _explain(
    cfg: TlsProbe, sni: str, exc: ssl.SSLCertVerificationError, within: float, details: dict[str, Any]
) -> str:
    """Why verification failed, in words that say what to renew or fix."""
    code = getattr(exc, "verify_code", None)
    message = getattr(exc, "verify_message", None) or str(exc)
    der = await _unverified_der(cfg.host, cfg.port, sni, within)
    cert = _describe_cert(der) if der else None
    if cert is None:
        if code in _UNTRUSTED:
            return f"certificate not trusted: {message} (private or self-signed CA? set ca_file)"
        return f"certificate verification failed: {message}"
    not_before, not_after, names = cert
    now = dt.datetime.now(dt.UTC)
    details["not_after"] = _iso(not_after)
    details["days_remaining"] = math.floor((not_after - now).total_seconds() / 86400)
    problems: list[str] = []
    if now > not_after:
        problems.append(
            f"certificate expired {_ago((now - not_after).total_seconds())} ago (not_after {_iso(not_after)})"
        )
    elif now < not_before:
        problems.append(
            f"certificate is not valid before {_iso(not_before)} (is this machine's clock right?)"
        )
    if code in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
        problems.append(f"hostname mismatch: certificate is for {', '.join(names) or 'no name'}, not {sni}")
    if not problems:
        hint = " (private or self-signed CA? set ca_file)" if code in _UNTRUSTED else ""
        problems.append(f"certificate not trusted: {message}{hint}")
    return "; ".join(problems)


async def run(name: str, cfg: TlsProbe) -> ProbeResult:
    """One verified handshake and an expiry check, bounded by cfg.timeout; never raises.

    See the module docstring for `details["degraded"]`: fewer days than `expect.days_remaining`
    on an otherwise valid certificate is a failure the detector treats as degraded only.
    """
    started_at = time.time()
    t0 = time.perf_counter()
    sni = cfg.server_name or cfg.host
    request = f"TLS {cfg.host}:{cfg.port}" + (f" (SNI {sni})" if sni != cfg.host else "")
    details: dict[str, Any] = {"degraded": False}
    try:
        ctx = context_for(cfg.ca_file)
    except (OSError, ssl.SSLError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        return single_step(name, started_at, t0, request, error=f"cannot load ca_file {cfg.ca_file}: {why}")
    stage = "connecting"
    writer: asyncio.StreamWriter | None = None
    try:
        try:
            async with asyncio.timeout(cfg.timeout):
                host = (
                    cfg.host
                    if literal(cfg.host)
                    else await first_address(cfg.host, cfg.port, cfg.timeout * RESOLVE_SHARE)
                )
                _, writer = await asyncio.open_connection(host, cfg.port)
                details["connect_seconds"] = round(time.perf_counter() - t0, 6)
                stage = "in the TLS handshake"
                await writer.start_tls(ctx, server_hostname=sni)
                peer = writer.get_extra_info("peercert") or {}
                obj = writer.get_extra_info("ssl_object")
                details["tls_version"] = obj.version() if obj is not None else None
        except BaseException:
            if writer is not None:
                writer.transport.abort()  # failed or out of time: no polite close
            raise
        took = time.perf_counter() - t0
        await close_quietly(writer)  # outside the deadline: a slow close must not fail a good handshake
    except ssl.SSLCertVerificationError as exc:
        left = cfg.timeout - (time.perf_counter() - t0)
        why = await _explain(cfg, sni, exc, left, details)
        return single_step(name, started_at, t0, request, error=why, details=details)
    except ssl.SSLError as exc:
        why = exc.reason or str(exc)
        return single_step(
            name, started_at, t0, request, error=f"TLS handshake failed: {why}", details=details
        )
    except TimeoutError:
        return single_step(
            name, started_at, t0, request, error=f"timed out after {cfg.timeout:g}s {stage}", details=details
        )
    except OSError as exc:
        where = "" if stage == "connecting" else f" {stage}"
        msg = describe_os_error(exc, cfg.host, cfg.port) + where
        return single_step(
            name, started_at, t0, request, error=msg, details=details, prober_error=prober_error_of(exc)
        )
    if "notAfter" not in peer:
        return single_step(
            name, started_at, t0, request, error="the server sent no certificate to check", details=details
        )
    not_after = dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(peer["notAfter"]), dt.UTC)
    days = math.floor((not_after - dt.datetime.now(dt.UTC)).total_seconds() / 86400)
    details["days_remaining"] = days
    details["not_after"] = _iso(not_after)
    bound = cfg.expect.days_remaining
    check = Check(
        "days_remaining", bound.holds(days), bound.describe(), f"{days} (not_after {_iso(not_after)})"
    )
    details["degraded"] = not check.ok  # valid today, expiring soon: degraded, never down
    return single_step(name, started_at, t0, request, (check,), details=details, latency=took)
