"""Structured logs: one JSON line per request (method, path, status, duration, client), and a
filter that scrubs secrets from every record. Tokens, cookies, Authorization values and passwords
must never reach a log line, whoever wrote it."""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any
from urllib.parse import parse_qsl, urlencode

SENSITIVE_KEYS = frozenset(
    {
        "token",
        "access_token",
        "accesstoken",
        "refresh_token",
        "refreshtoken",
        "password",
        "newpassword",
        "secret",
        "authorization",
        "cookie",
        "set-cookie",
        "ide_token",
        "api_key",
        "apikey",
        "signature",
        "stripe-signature",
    }
)
REDACTED = "[redacted]"

_SECRET_PATTERNS = [
    re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"),  # JWTs
    re.compile(r"(?i)(bearer\s+)[^\s\"',]+"),
    re.compile(r"(?i)((?:password|secret|token|cookie|authorization)[\"']?\s*[:=]\s*[\"']?)[^\s\"'&,}]+"),
]

access_log = logging.getLogger("zlh.access")


def scrub(text: str) -> str:
    """Remove anything that looks like a credential from free text."""
    text = _SECRET_PATTERNS[0].sub(REDACTED, text)
    for pattern in _SECRET_PATTERNS[1:]:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


def redact_query(query: str) -> str:
    if not query:
        return ""
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode([(k, REDACTED if k.lower() in SENSITIVE_KEYS else v) for k, v in pairs])


class ScrubSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ScrubSecrets())
    logging.Formatter.converter = __import__("time").gmtime
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def log_request(
    method: str, path: str, query: str, status: int, duration: float, client: str | None, route: str,
    peer: str | None = None,
) -> None:
    access_log.info(
        "request",
        extra={
            "fields": {
                "method": method,
                "path": scrub(path),
                "query": redact_query(query),
                "status": status,
                "durationMs": round(duration * 1000, 2),
                "client": client,
                **({"peer": peer} if peer and peer != client else {}),
                "route": route,
            }
        },
    )
