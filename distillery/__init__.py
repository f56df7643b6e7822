"""Distillery's client: `from distillery import Client` (or AsyncClient).

`pip install distillery` brings this package and the client half of the `distillery` command
(httpx, httpx-sse, pydantic, click, rich; no torch). The service and the worker come with the
extras: `distillery[server]`, `distillery[worker]`, `distillery[all]`.

Names load on first use: the pipeline imports distillery.states and distillery.gates, and
must not pay for httpx to do so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"
__all__ = [
    "ApiError",
    "AsyncClient",
    "Client",
    "DownloadError",
    "Event",
    "JobStatus",
    "StageStatus",
    "WaitTimeout",
]

if TYPE_CHECKING:
    from distillery.client import (
        ApiError,
        AsyncClient,
        Client,
        DownloadError,
        Event,
        WaitTimeout,
    )
    from distillery.states import JobStatus, StageStatus


def __getattr__(name: str) -> Any:
    if name in ("JobStatus", "StageStatus"):
        from distillery import states

        return getattr(states, name)
    if name in __all__:
        from distillery import client

        return getattr(client, name)
    raise AttributeError(f"module 'distillery' has no attribute {name!r}")
