"""Email over SMTP submission with STARTTLS: multipart/alternative (plain text + simple HTML).

The stored payload names the audience (customers, internal, executives) and holds the text; the
recipients come from the config at send time (someone removed from a list gets no more mail) and
so do the SMTP credentials. `Message-ID` is derived from the outbox key, so a resend after a lost
reply carries the same id and mail clients and archives recognise it as the same message.
Replies: 4xx and 421/450/451/452 are Transient (retry later), other 5xx Permanent.
"""

from __future__ import annotations

import hashlib
import html
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any, Literal

from controller.config import Email
from controller.notify.common import check_event, headline, human_time, next_update, public_status, secret
from controller.notify.outbox import Channel, Permanent, Transient

Audience = Literal["customers", "internal", "executives"]
AUDIENCES = ("customers", "internal", "executives")
TRANSIENT_5XX = {421, 450, 451, 452}  # 45x are 4xx anyway; 421 "service not available" too


def message(incident: dict[str, Any], event: str, audience: Audience) -> dict[str, Any]:
    check_event(event)
    if audience not in AUDIENCES:
        raise ValueError(f"audience must be one of {AUDIENCES}, not {audience!r}")
    status = public_status(incident, event)
    rows = [
        ("Service", incident["service"]),
        ("Severity", incident["severity"]),
        ("Status", status),
        ("Started", human_time(incident["started_at"])),
        ("Incident", incident["id"]),
    ]
    upcoming = next_update(incident)
    if upcoming and event != "resolved":
        rows.append(("Next update", upcoming))
    body = incident.get("message") or incident["title"]
    subject = f"[{incident['severity'].upper()}] {headline(incident, event)}"
    text = body + "\n\n" + "\n".join(f"{k}: {v}" for k, v in rows) + "\n"
    table = "".join(
        f"<tr><th align='left'>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    page = (
        "<!DOCTYPE html><html><body>"
        f"<h2>{html.escape(headline(incident, event))}</h2>"
        f"<p>{html.escape(body)}</p><table>{table}</table>"
        "</body></html>"
    )
    return {
        "audience": audience,
        "incident_id": incident["id"],
        "subject": subject,
        "text": text,
        "html": page,
    }


def message_id(key: str, sender: str) -> str:
    domain = sender.rsplit("@", 1)[-1]
    return f"<{hashlib.sha256(key.encode()).hexdigest()[:32]}@{domain}>"


def build(cfg: Email, payload: dict[str, Any], key: str) -> EmailMessage:
    to = getattr(cfg.to, payload["audience"])
    msg = EmailMessage()
    msg["From"] = cfg.from_
    msg["To"] = ", ".join(to)
    msg["Subject"] = payload["subject"]
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = message_id(key, cfg.from_)
    thread = f"<{payload['incident_id']}@{cfg.from_.rsplit('@', 1)[-1]}>"
    msg["References"] = thread  # one thread per incident in mail clients
    msg["X-Continuity-Key"] = key
    msg.set_content(payload["text"])
    msg.add_alternative(payload["html"], subtype="html")
    return msg


def _classify(code: int, text: str) -> Exception:
    if 400 <= code < 500 or code in TRANSIENT_5XX:
        return Transient(f"SMTP {code}: {text}")
    return Permanent(f"SMTP {code}: {text}")


def send(cfg: Email, payload: dict[str, Any], key: str) -> None:
    """Blocking: the dispatcher runs it in a thread."""
    to = getattr(cfg.to, payload["audience"])
    if not to:
        raise Permanent(f"no recipients configured for audience {payload['audience']!r}")
    msg = build(cfg, payload, key)
    context = ssl.create_default_context(cafile=cfg.ca_file)
    try:
        with smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout) as smtp:
            if cfg.starttls:
                smtp.starttls(context=context)  # raises SMTPNotSupportedError if not offered
            if cfg.username_env and cfg.password_env:
                smtp.login(secret(cfg.username_env), secret(cfg.password_env))
            refused = smtp.send_message(msg, from_addr=cfg.from_, to_addrs=to)
    except smtplib.SMTPRecipientsRefused as exc:  # every recipient refused
        codes = [code for code, _ in exc.recipients.values()]
        worst = min(codes) if all(c >= 500 and c not in TRANSIENT_5XX for c in codes) else 451
        raise _classify(worst, f"all recipients refused: {exc.recipients}") from None
    except smtplib.SMTPResponseException as exc:
        err = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else str(exc)
        raise _classify(exc.smtp_code, err) from None
    except smtplib.SMTPNotSupportedError as exc:
        raise Permanent(f"SMTP server does not offer STARTTLS: {exc}") from None
    except ssl.SSLCertVerificationError as exc:
        raise Permanent(f"SMTP server certificate not trusted: {exc}") from None
    except (smtplib.SMTPException, OSError) as exc:
        raise Transient(f"SMTP connection failed: {type(exc).__name__}: {exc}") from None
    if refused:
        # Some recipients got it: resending would duplicate it for them. Recorded, not retried.
        raise Permanent(f"delivered, but these recipients were refused: {refused}")


def channel(cfg: Email, name: str = "email") -> Channel:
    return Channel(
        name,
        send=lambda payload, key: send(cfg, payload, key),
        timeout=cfg.timeout,
        rate_per_minute=cfg.rate_per_minute,
    )
