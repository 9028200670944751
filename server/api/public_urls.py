"""The absolute URLs this server hands out: queue URLs of a request, and URLs of stored files.

The Python fal client follows `response_url`/`status_url`/`cancel_url` verbatim, and users open the
video URL in browsers, so they must name the server as the *client* reaches it — which behind a
proxy or a container port mapping is not the address the process listens on. A configured public
URL wins; otherwise each request's `X-Forwarded-Proto`/`X-Forwarded-Host` (set by proxies), else its
`Host` header, gives the base. Workers write results with the base they know (the configured URL,
or the API's own address), so file URLs in results are re-based to the request's base on the way out.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

QUEUE_PREFIX = "/queue"


def request_base_url(request: Request, public_url: str | None) -> str:
    """`scheme://host[:port][/prefix]` without a trailing slash, as the client sees this server."""
    if public_url:
        return public_url.rstrip("/")
    headers = request.headers
    scheme = _first(headers.get("x-forwarded-proto")) or request.url.scheme
    host = _first(headers.get("x-forwarded-host")) or headers.get("host") or request.url.netloc
    prefix = (_first(headers.get("x-forwarded-prefix")) or "").rstrip("/")
    return f"{scheme}://{host}{prefix}"


def _first(value: str | None) -> str | None:
    """The client-side value of a forwarded header (proxies append theirs after a comma)."""
    if not value:
        return None
    return value.split(",", 1)[0].strip() or None


def queue_urls(base_url: str, owner_app: str, request_id: str) -> dict[str, str]:
    """fal's three queue URLs, under owner/app only (never the endpoint path), as the clients expect."""
    response_url = f"{base_url}{QUEUE_PREFIX}/{owner_app}/requests/{request_id}"
    return {"request_id": request_id, "response_url": response_url, "status_url": f"{response_url}/status",
            "cancel_url": f"{response_url}/cancel"}


def rebase_url(url: str, from_base: str, to_base: str) -> str:
    """`url` moved from under `from_base` to under `to_base`; a URL not under `from_base` is returned as is."""
    return to_base + url[len(from_base):] if url.startswith(from_base + "/") else url


def rebase_file_urls(body: Any, stored_base: str, base_url: str) -> Any:
    """`body` with every `url` under `stored_base` moved to `base_url` (a copy)."""
    if stored_base == base_url:
        return body
    if isinstance(body, dict):
        return {key: (rebase_url(value, stored_base, base_url) if key == "url" and isinstance(value, str)
                      else rebase_file_urls(value, stored_base, base_url)) for key, value in body.items()}
    if isinstance(body, list):
        return [rebase_file_urls(item, stored_base, base_url) for item in body]
    return body
