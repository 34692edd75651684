"""Log set-up for the service's own loggers: plain text by default, one JSON object per line with LOG_JSON."""

from __future__ import annotations

import logging

from pythonjsonlogger.json import JsonFormatter

SERVICE_LOGGERS = ("service", "batching", "classification")


def configure_logging(level: str, json_lines: bool) -> None:
    """Give the service's loggers one stderr handler; uvicorn and gunicorn keep their own."""
    handler = logging.StreamHandler()
    if json_lines:
        handler.setFormatter(JsonFormatter("{asctime}{levelname}{name}{message}", style="{",
                                           rename_fields={"asctime": "time", "levelname": "level", "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in SERVICE_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
