"""E-mail for the ShopBot: an SMTP server on 127.0.0.1 (aiosmtpd) that keeps what it receives, and a sender.

`MailServer` is a real SMTP server: the bot's mails travel over a socket through smtplib, and the
demo and the tests read them back from `MailServer.messages` as parsed `email.message.EmailMessage`s.
"""

from __future__ import annotations

import smtplib
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

from aiosmtpd.controller import Controller

from .label_service import free_port


class _Inbox:
    """aiosmtpd handler: parse every message that arrives and keep it."""

    def __init__(self):
        self.messages: list[EmailMessage] = []

    async def handle_DATA(self, server, session, envelope):
        message = BytesParser(policy=policy.default).parsebytes(envelope.content)
        message["X-Envelope-To"] = ", ".join(envelope.rcpt_tos)
        self.messages.append(message)
        return "250 Message accepted for delivery"


class MailServer:
    """An SMTP server on 127.0.0.1:`port` (a free one by default); use as a context manager."""

    def __init__(self, port: int | None = None):
        self.host, self.port = "127.0.0.1", port or free_port()
        self._inbox = _Inbox()
        self._controller = Controller(self._inbox, hostname=self.host, port=self.port)

    @property
    def messages(self) -> list[EmailMessage]:
        return self._inbox.messages

    def start(self) -> MailServer:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> MailServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def send_mail(host: str, port: int, *, sender: str, to: str, subject: str, body: str,
              timeout_s: float = 5.0) -> None:
    """Send one plain-text e-mail through the SMTP server at host:port."""
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = sender, to, subject
    message.set_content(body)
    with smtplib.SMTP(host, port, timeout=timeout_s) as smtp:
        smtp.send_message(message)
