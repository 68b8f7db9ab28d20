"""Outgoing mail. The embedded default delivers into a directory (one RFC 822 file per message, like a
maildir `new/`), which an operator reads or a relay picks up; SMTP is a deployment concern outside
this gateway. Message bodies can carry one-time links: they go to the mailbox, never to a log."""

from __future__ import annotations

import os
import secrets
from email.message import EmailMessage
from pathlib import Path

import trio

from storage.clock import utcnow


class Mailer:
    def __init__(self, outbox: Path) -> None:
        self.outbox = outbox

    async def send(self, to: str, subject: str, body: str) -> Path:
        message = EmailMessage()
        message["To"] = to
        message["From"] = "ZLH <no-reply@zlh.local>"
        message["Subject"] = subject
        message["Date"] = utcnow().strftime("%a, %d %b %Y %H:%M:%S +0000")
        message.set_content(body)
        name = f"{utcnow().strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(6)}.eml"

        def write() -> Path:
            self.outbox.mkdir(parents=True, exist_ok=True)
            path = self.outbox / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(bytes(message))
            return path

        return await trio.to_thread.run_sync(write)
