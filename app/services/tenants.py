"""Tenants and API keys. Keys are random 256-bit tokens; only their SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.models import ApiKey, Tenant, utcnow

KEY_PREFIX = "dk_"


def hash_key(key: str) -> str:
    # A fast hash is right here: the keys are high-entropy random tokens, not passwords.
    return hashlib.sha256(key.encode()).hexdigest()


def ensure_tenant(session: Session, *, name: str) -> Tenant:
    """The tenant called `name`, created if new. Safe when several processes ensure the same
    tenant at once (every `api --workers N` process ensures DISTILLERY_API_KEY's tenant at
    start-up): the loser of the race rolls back its savepoint and reads the winner's row."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is not None:
        return tenant
    try:
        with session.begin_nested():
            tenant = Tenant(name=name)
            session.add(tenant)
    except IntegrityError:
        tenant = session.scalar(select(Tenant).where(Tenant.name == name))
        if tenant is None:
            raise
    return tenant


def create_key(session: Session, *, tenant_name: str, key: str | None = None) -> str:
    """Create (or register a given) key for the tenant; returns the key in clear, once."""
    tenant = ensure_tenant(session, name=tenant_name)
    key = key or KEY_PREFIX + secrets.token_urlsafe(32)
    digest = hash_key(key)
    existing = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    if existing is None:
        try:
            with session.begin_nested():  # the same key registered by a concurrent start-up
                session.add(ApiKey(tenant_id=tenant.id, prefix=key[:10], key_hash=digest))
        except IntegrityError:
            existing = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
            if existing is None:
                raise
    if existing is not None and existing.tenant_id != tenant.id:
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


def tenant_has_keys(session: Session, *, tenant_name: str) -> bool:
    return (
        session.scalar(
            select(ApiKey.id)
            .join(Tenant, Tenant.id == ApiKey.tenant_id)
            .where(Tenant.name == tenant_name)
            .limit(1)
        )
        is not None
    )
