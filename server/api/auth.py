"""Optional API keys: `Authorization: Key <key>`, as fal clients send it.

With no keys configured every request is accepted (a local install); fal clients still send
whatever FAL_KEY holds, which is then ignored. `Bearer <key>` is accepted too, for tools that only
know bearer tokens. Keys are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from server.api.errors import RequestError
from server.services import ServicesDep

AUTH_SCHEMES = ("key", "bearer")


def presented_key(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("authorization", "").strip().partition(" ")
    return credentials.strip() if scheme.lower() in AUTH_SCHEMES and credentials.strip() else None


def is_known_key(key: str | None, keys: frozenset[str]) -> bool:
    return key is not None and any(hmac.compare_digest(key.encode(), known.encode()) for known in keys)


def key_owner(request: Request, services: ServicesDep) -> str | None:
    """Who a request acts for: a digest of its API key when keys are configured (jobs belong to the key that
    submitted them; the key itself is never stored), None on an open server."""
    key = presented_key(request)
    if not services.settings.api_keys or key is None:
        return None
    return hashlib.sha256(key.encode()).hexdigest()[:32]


OwnerDep = Annotated[str | None, Depends(key_owner)]


def require_api_key(request: Request, services: ServicesDep) -> None:
    """Dependency of every API route that starts or reads work (not of /files, health or docs)."""
    keys = services.settings.api_keys
    if not keys:
        return
    key = presented_key(request)
    if not is_known_key(key, keys):
        reason = "no API key was sent" if key is None else "the API key is not valid"
        raise RequestError(401, f"Unauthorized: {reason}; send `Authorization: Key <key>`", "unauthorized",
                           {"WWW-Authenticate": "Key"})
