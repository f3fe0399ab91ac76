"""Links that lead back through the gateway: amoCRM's absolute hrefs on the account host, moved under the caller's base.

amoCRM's HAL answers carry `_links.*.href` such as `https://demo.amocrm.ru/api/v4/leads?page=2&limit=50`.
A client that follows one would leave the gateway: skip the rate budget and send its gateway bearer to amoCRM.
So in a JSON or HAL+JSON answer, every `href` string that names the account host (by any of its names) and a
path the proxy forwards is rewritten to the same path and query under the URL the caller used:

- `…/accounts/{account}/proxy/api/v4/leads?page=2&limit=50` when the caller used the per-account base URL;
- `…/proxy/api/v4/leads?page=2&limit=50&account={account id}` when it used the plain proxy (the link then
  works without the caller's X-Amo-Account header too).

Scheme and host are the request's, as resolved through trusted proxies (forwarded.py). Only `href` values are
touched, never other strings (a note quoting a URL stays as written). Bodies over REWRITE_CAP, content codings
other than gzip and deflate, and anything that is not valid JSON pass through untouched.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

REWRITE_CAP = 2 * 1024 * 1024  # a page of 250 leads with contacts is well under this; larger answers stream untouched
JSON_TYPES = ("application/json", "application/hal+json")


def is_json(content_type: str | None) -> bool:
    """Whether a Content-Type names JSON or HAL+JSON (parameters such as charset ignored)."""
    return (content_type or "").partition(";")[0].strip().lower() in JSON_TYPES


@dataclass(frozen=True)
class LinkRewriter:
    """Rewrites hrefs on `hosts` (lower-case host[:port]) under `prefixes` to `base` + path (+ `extra` query)."""

    hosts: frozenset[str]
    prefixes: tuple[str, ...]
    base: str
    extra: str = ""  # `account=31920194`, appended to the query of a plain-proxy link
    cap: int = REWRITE_CAP  # larger bodies (decoded, too) are passed on as they came

    def rewrite(self, body: bytes) -> bytes | None:
        """The body with its links rewritten, or None when it is not JSON or holds no link to rewrite."""
        if not any(host.encode() in body for host in self.hosts):  # cheap test before parsing
            return None
        try:
            data = json.loads(body)
        except ValueError:  # includes a body that is not UTF-8
            return None
        if not self._walk(data):
            return None
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()

    def _walk(self, node: Any) -> bool:
        """Rewrite `href` strings in place, depth first; True when any changed."""
        changed = False
        items: Iterable[Any] = ()
        if isinstance(node, dict):
            href = node.get("href")
            if isinstance(href, str) and (moved := self.moved(href)) is not None:
                node["href"], changed = moved, True
            items = node.values()
        elif isinstance(node, list):
            items = node
        for child in items:
            if isinstance(child, dict | list):
                changed = self._walk(child) or changed
        return changed

    def moved(self, href: str) -> str | None:
        """The gateway URL for an absolute href on the account host under a proxied path, else None."""
        try:
            parts = urlsplit(href)
        except ValueError:
            return None
        if parts.scheme not in ("http", "https") or parts.netloc.lower() not in self.hosts:
            return None
        if not any(parts.path.startswith(prefix) for prefix in self.prefixes):
            return None
        query = "&".join(q for q in (parts.query, self.extra) if q)
        return self.base + parts.path + ("?" + query if query else "")
