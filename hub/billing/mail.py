"""E-mail of a statement to the supplier through the hub's SMTP server (``[alerts.smtp]``, the same
server and sending approach as alert e-mails): HTML body, plain-text alternative, PDF attached.
``smtplib`` runs in a worker thread, off the event loop, and is retried with a doubling wait;
a refused login, sender or recipient is final."""

from __future__ import annotations

import asyncio
import smtplib
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from hub.alerts.rules import SmtpConfig
from hub.mail import PermanentMailError, send_message
from protocol.logs import get_logger

log = get_logger("hub.billing.mail")


class _Permanent(Exception):
    """A failure another attempt cannot fix."""


@dataclass(frozen=True)
class SendResult:
    """How sending ended."""

    ok: bool
    attempts: int
    error: str = ""


def build_message(document: dict[str, Any], html: str, pdf: bytes, sender: str, recipient: str) -> EmailMessage:
    """The e-mail: subject with the number, text and HTML bodies, ``<number>.pdf`` attached."""
    d = document
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = f"Statement {d['number']}: {d['total']} {d['currency']} ({d['since'][:10]} to {d['until'][:10]})"
    msg["X-Twin-Statement"] = d["number"]
    msg.set_content(f"Statement {d['number']}\nPeriod {d['since']} to {d['until']}\nNet {d['net']} "
                    f"{d['currency']}\nVAT {d['vat_total']} {d['currency']}\nTotal {d['total']} {d['currency']}\n"
                    f"The statement is attached as PDF.\n")
    msg.add_alternative(html, subtype="html")
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename=f"{d['number']}.pdf")
    return msg


def _smtp_send(smtp: SmtpConfig, msg: EmailMessage) -> None:
    try:
        send_message(smtp, msg)
    except PermanentMailError as exc:
        raise _Permanent(str(exc)) from exc


async def send(smtp: SmtpConfig, msg: EmailMessage, attempts: int, retry_s: float) -> SendResult:
    """Send ``msg``, trying up to ``attempts`` times; never raises for SMTP or network errors."""
    delay = retry_s
    error = ""
    for attempt in range(1, attempts + 1):
        try:
            await asyncio.to_thread(_smtp_send, smtp, msg)
            log.info("statement_sent", statement=msg["X-Twin-Statement"], to=msg["To"], attempts=attempt)
            return SendResult(True, attempt)
        except _Permanent as exc:
            error = str(exc)
            log.error("statement_send_failed", statement=msg["X-Twin-Statement"], attempts=attempt, error=error)
            return SendResult(False, attempt, error)
        except (OSError, smtplib.SMTPException) as exc:
            error = f"{type(exc).__name__}: {exc}"
        if attempt < attempts:
            log.warning("statement_send_retry", statement=msg["X-Twin-Statement"], attempt=attempt,
                        retry_in_s=delay, error=error)
            await asyncio.sleep(delay)
            delay *= 2
    log.error("statement_send_failed", statement=msg["X-Twin-Statement"], attempts=attempts, error=error)
    return SendResult(False, attempts, error)
