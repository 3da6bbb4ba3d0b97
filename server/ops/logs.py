"""Log output of the server: JSON (one object per line, for collectors) or text (for a terminal).

A request's line carries its fields under ``extra={"request": {...}}`` (see gateway.py); JSON puts them at the
top level of the object, text appends them as ``key=value``. Neither format ever sees a key or, unless
HUBSERVE_LOG_PROMPTS is on, a prompt: the gateway does not put them in the record.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any

from server.settings import LogFormat


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "request", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "request", None)
        if isinstance(fields, dict):
            pairs = (f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in fields.items() if v is not None)
            text += " " + " ".join(pairs)
        return text


def configure_logging(fmt: LogFormat, level: str) -> None:
    """Send every logger (ours, uvicorn's) to stderr in ``fmt``; auto is text on a terminal, else JSON."""
    if fmt is LogFormat.AUTO:
        fmt = LogFormat.TEXT if sys.stderr.isatty() else LogFormat.JSON
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt is LogFormat.JSON else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per engine call: noise
    logging.getLogger("uvicorn.access").disabled = True  # the gateway logs one richer line per request
