"""Structured logging: JSON lines for journald, a readable console on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure_logging(level: str = "info", fmt: str = "auto", *, node_id: str | None = None,
                      line_id: str | None = None, stream: TextIO | None = None) -> None:
    """Set up structlog; every line carries the node and line IDs."""
    out = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    ids = {k: v for k, v in (("node_id", node_id), ("line_id", line_id)) if v}
    if ids:
        def add_ids(_: object, __: str, event: structlog.typing.EventDict
                    ) -> structlog.typing.EventDict:
            for k, v in ids.items():
                event.setdefault(k, v)
            return event
        processors.append(add_ids)
    if use_json:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=out.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
