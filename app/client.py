"""Kept so that scripts written against `from app.client import Client` still work: the
client moved to the thin package, `from distillery import Client` (docs/cli.md)."""

from distillery.client import (  # noqa: F401
    DEFAULT_URL,
    ApiError,
    AsyncClient,
    Client,
    DownloadError,
    Event,
    WaitTimeout,
    default_key,
)
