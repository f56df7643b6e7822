"""Resumable uploads, client side (POST /v1/uploads, docs/service.md#resumable-uploads).

The steps are written once, as a flow of the client's sans-IO core (distillery.core):
`upload_flow` sends its API `Call`s and `SendPart`s through the two sub-flows it is given (the
core's, which retry); `Client` and `AsyncClient` only perform the I/O those yield. An upload
cut off (a dropped connection, a killed CLI) is resumed without sending its finished parts
again: its id is remembered in a small state file keyed by the server, the kind and the file's
sha256, and the server says which parts it holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillery.calls import ApiError, Call, parse_model
from distillery.schemas import DatasetPublic, ModelPublic, UploadPartPublic, UploadPublic

# Files above this go in parts (the one-request upload's server cap is MAX_UPLOAD_BYTES).
RESUMABLE_ABOVE = 64 * 1024**2
PART_BYTES = 16 * 1024**2
MAX_PARTS = 10_000

Progress = Callable[[int, int], None]  # (bytes on the server, bytes in all)
# A sub-flow that sends a Call (or a SendPart) and returns its answer: the core's, with retries.
SendCall = Callable[[Call[Any]], Generator[Any, Any, Any]]
SendBytes = Callable[["SendPart"], Generator[Any, Any, Any]]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class UploadPlan:
    """What to upload: a dataset or a teacher's file and its form fields."""

    kind: str  # dataset | model
    path: Path
    size: int
    sha256: str
    fields: dict[str, str]
    part_bytes: int

    @classmethod
    def of(cls, kind: str, path: str | Path, fields: dict[str, str], part_bytes: int | None):
        path = Path(path)
        size = path.stat().st_size
        chosen = part_bytes or max(PART_BYTES, -(-size // MAX_PARTS))
        return cls(kind, path, size, sha256_file(path), fields, min(chosen, size))

    def body(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "filename": self.path.name,
            "bytes": self.size,
            "sha256": self.sha256,
            "part_bytes": self.part_bytes,
            "fields": self.fields,
        }

    def read(self, number: int, part_bytes: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek((number - 1) * part_bytes)
            return f.read(part_bytes)


@dataclass(frozen=True)
class SendPart:
    """PUT part `number`'s bytes to `url` (a bucket's presigned URL, no API key) or, when it
    is None, to the API's `PUT /v1/uploads/{id}/parts/{n}`."""

    upload_id: str
    number: int
    data: bytes
    url: str | None

    @property
    def api_path(self) -> str:
        return f"/v1/uploads/{self.upload_id}/parts/{self.number}"


class PartUrlExpired(Exception):
    """The bucket refused a presigned part URL (expired): ask the API for fresh ones."""


# --- the requests -----------------------------------------------------------------------------


def create_call(plan: UploadPlan) -> Call[UploadPublic]:
    return Call("POST", "/v1/uploads", parse_model(UploadPublic), {"json": plan.body()})


def get_call(upload_id: str) -> Call[UploadPublic]:
    return Call("GET", f"/v1/uploads/{upload_id}", parse_model(UploadPublic))


def complete_call(upload: UploadPublic) -> Call[Any]:
    model = DatasetPublic if upload.kind == "dataset" else ModelPublic
    # Verifying and inspecting gigabytes takes a while: no read timeout.
    return Call("POST", f"/v1/uploads/{upload.id}/complete", parse_model(model), {"timeout": None})


def abort_call(upload_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/uploads/{upload_id}", lambda _: None)


def part_call(part: SendPart) -> Call[UploadPartPublic]:
    return Call(
        "PUT",
        part.api_path,
        parse_model(UploadPartPublic),
        {"content": part.data, "headers": {"Content-Type": "application/octet-stream"}},
    )


# --- remembered uploads -----------------------------------------------------------------------


def state_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "distillery" / "uploads.json"


def _state_key(server: str, plan: UploadPlan) -> str:
    return f"{server} {plan.kind} {plan.sha256} {plan.size} {plan.part_bytes}"


def _load_state() -> dict[str, str]:
    try:
        state = json.loads(state_file().read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _save_state(state: dict[str, str]) -> None:
    path = state_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".uploads-")
        with os.fdopen(fd, "w") as f:
            json.dump(state, f)
        os.replace(tmp, path)
    except OSError:  # no writable cache: uploads still work, only without resuming later
        pass


def remembered(server: str, plan: UploadPlan) -> str | None:
    return _load_state().get(_state_key(server, plan))


def remember(server: str, plan: UploadPlan, upload_id: str | None) -> None:
    state = _load_state()
    key = _state_key(server, plan)
    if upload_id is None:
        state.pop(key, None)
    else:
        state[key] = upload_id
    _save_state(state)


# --- the steps --------------------------------------------------------------------------------


def _missing(upload: UploadPublic) -> list[int]:
    have = {p.number for p in upload.parts}
    return [n for n in range(1, upload.parts_total + 1) if n not in have]


def _resumable(upload: UploadPublic, plan: UploadPlan) -> bool:
    # completing/completed: `complete` gives its dataset or model (or says it is under way)
    return upload.bytes == plan.size


def _open(server: str, plan: UploadPlan, call: SendCall) -> Generator[Any, Any, UploadPublic]:
    """The upload to continue (remembered and still open) or a new one."""
    known = remembered(server, plan)
    if known is not None:
        try:
            upload = yield from call(get_call(known))
            if _resumable(upload, plan):
                return upload
        except ApiError as e:
            if e.status != 404:
                raise
    upload = yield from call(create_call(plan))
    remember(server, plan, upload.id)
    return upload


def upload_flow(
    server: str,
    plan: UploadPlan,
    on_progress: Progress | None,
    *,
    call: SendCall,
    put: SendBytes,
) -> Generator[Any, Any, Any]:
    """Create (or resume) the upload, send the parts the server lacks, complete it, sending
    each request with `call` and each part with `put`; returns the DatasetPublic or
    ModelPublic."""
    upload = yield from _open(server, plan, call)
    expired = 0
    while upload.status == "open":
        todo = _missing(upload)
        done = plan.size - sum(
            min(upload.part_bytes, plan.size - (n - 1) * upload.part_bytes) for n in todo
        )
        if on_progress is not None:
            on_progress(done, plan.size)
        if not todo:
            break
        for number in todo:
            url = (upload.part_urls or {}).get(number)
            if upload.part_urls is not None and url is None:
                break  # the next batch of presigned URLs comes with the next GET
            data = plan.read(number, upload.part_bytes)
            try:
                yield from put(SendPart(upload.id, number, data, url))
            except PartUrlExpired:
                expired += 1
                if expired > 3:  # fresh URLs refused too: a clock or permission problem
                    raise
                break
            done += len(data)
            if on_progress is not None:
                on_progress(done, plan.size)
        upload = yield from call(get_call(upload.id))
    result = yield from call(complete_call(upload))
    remember(server, plan, None)
    return result
