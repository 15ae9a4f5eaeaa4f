"""Sending one e-mail through the hub's SMTP server (``[alerts.smtp]``), for alerts and statements.

Blocking (smtplib): callers run it in a worker thread and own the retry policy, because an alert
and a statement retry differently. :class:`PermanentMailError` tells them when retrying is useless.
"""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage

from hub.alerts.rules import SmtpConfig


class PermanentMailError(Exception):
    """The server refused for good (login, sender or every recipient): retrying cannot help."""


def send_message(smtp: SmtpConfig, msg: EmailMessage) -> dict[str, tuple[int, bytes]]:
    """Deliver ``msg``; returns the recipients the server refused (the others got it).

    Raises :class:`PermanentMailError` for refusals and ``OSError``/``smtplib.SMTPException`` for
    what a later attempt may get past (connection refused, timeouts, 4xx answers).
    """
    client: smtplib.SMTP
    if smtp.ssl:
        client = smtplib.SMTP_SSL(smtp.host, smtp.port, timeout=smtp.timeout_s, context=ssl.create_default_context())
    else:
        client = smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout_s)
    with client:
        if smtp.starttls and not smtp.ssl:
            client.starttls(context=ssl.create_default_context())
        if smtp.username:
            try:
                client.login(smtp.username, smtp.password.get_secret_value() if smtp.password else "")
            except smtplib.SMTPAuthenticationError as exc:
                raise PermanentMailError(f"SMTP login refused: {exc.smtp_code}") from exc
        try:
            refused: dict[str, tuple[int, bytes]] = client.send_message(msg)
        except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused) as exc:
            raise PermanentMailError(f"SMTP refused: {exc}") from exc
        return refused
