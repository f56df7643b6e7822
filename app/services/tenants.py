"""Tenants and API keys. Keys are random 256-bit tokens; only their SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.db import insert_if_absent
from app.models import ApiKey, Tenant, new_id, utcnow

KEY_PREFIX = "dk_"


def hash_key(key: str) -> str:
    # A fast hash is right here: the keys are high-entropy random tokens, not passwords.
    return hashlib.sha256(key.encode()).hexdigest()


def ensure_tenant(session: Session, *, name: str) -> Tenant:
    """The tenant called `name`, created if new. Safe when several processes ensure the same
    tenant at once (every `api --workers N` process ensures DISTILLERY_API_KEY's tenant at
    start-up, and two of them once died on the duplicate)."""
    insert_if_absent(session, Tenant, {"id": new_id("ten"), "name": name}, ["name"])
    return session.scalars(select(Tenant).where(Tenant.name == name)).one()


def create_key(session: Session, *, tenant_name: str, key: str | None = None) -> str:
    """Create (or register a given) key for the tenant; returns the key in clear, once."""
    tenant = ensure_tenant(session, name=tenant_name)
    key = key or KEY_PREFIX + secrets.token_urlsafe(32)
    digest = hash_key(key)
    values = {"id": new_id("key"), "tenant_id": tenant.id, "prefix": key[:10], "key_hash": digest}
    insert_if_absent(session, ApiKey, values, ["key_hash"])
    owner = session.scalar(select(ApiKey.tenant_id).where(ApiKey.key_hash == digest))
    if owner != tenant.id:
        raise ValueError("that key already belongs to another tenant")
    return key


def revoke_key(session: Session, *, key: str) -> bool:
    result = session.execute(
        update(ApiKey)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return result.rowcount > 0


def authenticate(session: Session, *, key: str) -> Tenant | None:
    return session.scalar(
        select(Tenant)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )
