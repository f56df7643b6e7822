"""Per-tenant quotas on what one API process holds at once: requests in flight and open
event streams. Checked on the event loop before a request takes a thread, so a tenant over
its quota gets a fast 429 and never queues ahead of the others."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Literal

from app.core.errors import QuotaExceeded
from app.services.tenants import hash_key

Kind = Literal["requests", "streams"]
SETTING: dict[Kind, str] = {"requests": "TENANT_MAX_REQUESTS", "streams": "TENANT_MAX_STREAMS"}
MAX_KNOWN_KEYS = 10_000


class Admission:
    """Counts per (kind, tenant). Used from the event loop only: no lock needed.

    Before a request is authenticated its tenant is not known yet; the key's last known
    tenant is charged (a new key is charged on its own until it authenticates), and the slot
    moves to the tenant once the database says whose key it is. The map from key to tenant
    only chooses whom to charge: it never lets a request in."""

    def __init__(self, limit_of: Callable[[Kind], int]) -> None:
        self.limit_of = limit_of  # read per request: a test may change a setting live
        self.counts: Counter[tuple[Kind, str]] = Counter()
        self.owners: dict[str, str] = {}

    @asynccontextmanager
    async def slot(self, kind: Kind, key: str) -> AsyncIterator[Slot]:
        digest = hash_key(key)
        slot = Slot(self, kind, digest)
        slot.take(self.owners.get(digest, "key:" + digest))
        try:
            yield slot
        finally:
            slot.release()


class Slot:
    def __init__(self, admission: Admission, kind: Kind, digest: str) -> None:
        self.admission, self.kind, self.digest = admission, kind, digest
        self.bucket: str | None = None

    def take(self, bucket: str) -> None:
        limit = self.admission.limit_of(self.kind)
        counts = self.admission.counts
        if limit and counts[(self.kind, bucket)] >= limit:
            what = "requests in flight" if self.kind == "requests" else "open event streams"
            raise QuotaExceeded(
                f"this tenant already has {limit} {what}, its limit ({SETTING[self.kind]}); "
                "retry when one has finished",
                headers={"Retry-After": "1"},
            )
        counts[(self.kind, bucket)] += 1
        self.bucket = bucket

    def owner_is(self, tenant_id: str) -> None:
        owners = self.admission.owners
        if len(owners) >= MAX_KNOWN_KEYS and self.digest not in owners:
            owners.clear()  # only whom to charge first is forgotten
        owners[self.digest] = tenant_id
        if self.bucket != tenant_id:
            self.release()
            self.take(tenant_id)

    def release(self) -> None:
        if self.bucket is not None:
            counts = self.admission.counts
            counts[(self.kind, self.bucket)] -= 1
            if counts[(self.kind, self.bucket)] <= 0:
                del counts[(self.kind, self.bucket)]
            self.bucket = None
