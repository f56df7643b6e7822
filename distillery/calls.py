"""One API request as data (`Call`): built once, sent by the sync or the async client."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    """The API answered with an error: `status`, `code` (e.g. invalid_spec) and `message`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API request and how to read its answer; each client only sends it."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    kwargs: dict[str, Any] = field(default_factory=dict)


def parse_model(model: type[M]) -> Callable[[httpx.Response], M]:
    return lambda r: model.model_validate(r.json())
