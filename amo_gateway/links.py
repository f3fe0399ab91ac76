"""Links that lead back through the gateway: amoCRM's absolute hrefs on the account host, moved under the caller's base.

amoCRM's HAL answers carry `_links.*.href` such as `https://demo.amocrm.ru/api/v4/leads?page=2&limit=50`.
A client that follows one would leave the gateway: skip the rate budget and send its gateway bearer to amoCRM.
So in a JSON or HAL+JSON answer, every `href` string that names the account host (by any of its names) and a
path the proxy forwards is rewritten to the same path and query under the URL the caller used:

- `…/accounts/{account}/proxy/api/v4/leads?page=2&limit=50` when the caller used the per-account base URL;
- `…/proxy/api/v4/leads?page=2&limit=50&account={account id}` when it used the plain proxy (the link then
  works without the caller's X-Amo-Account header too).

Scheme and host are the request's, as resolved through trusted proxies (forwarded.py). Only `href` values are
touched, never other strings (a note quoting a URL), and the rest of the body stays byte for byte as amoCRM
wrote it: the links are found by one regular-expression pass over the JSON text, not by parsing and
re-serialising it (several times cheaper, and no reformatting). Escaped slashes (`https:\\/\\/…`, as PHP
writes them) are understood. Bodies over REWRITE_CAP and content codings other than gzip and deflate pass
through untouched.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field

REWRITE_CAP = 2 * 1024 * 1024  # a page of 250 leads with contacts is well under this; larger answers stream untouched
JSON_TYPES = ("application/json", "application/hal+json")
# `"href": "http…"`: the key, then one whole JSON string (escapes included) that starts like a URL; the string
# part is written unrolled (runs of plain characters between escapes), which `re` scans far faster than `(a|b)*`.
_HREF = re.compile(rb'(?P<key>"href"\s*:\s*)"(?P<url>https?:[^"\\]*(?:\\.[^"\\]*)*)"')


@functools.lru_cache(maxsize=256)
def rewriter(hosts: frozenset[str], prefixes: tuple[str, ...], base: str, extra: str = "",
             cap: int = REWRITE_CAP) -> LinkRewriter:
    """The rewriter for one account and caller base URL, built once (its patterns cost more than a rewrite)."""
    return LinkRewriter(hosts, prefixes, base, extra, cap)


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
    _hosts: tuple[bytes, ...] = field(init=False, repr=False, compare=False)
    _any_case: re.Pattern[bytes] = field(init=False, repr=False, compare=False)
    _origins: tuple[bytes, ...] = field(init=False, repr=False, compare=False)
    _prefixes: tuple[bytes, ...] = field(init=False, repr=False, compare=False)
    _base: bytes = field(init=False, repr=False, compare=False)
    _extra: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Bytes forms for the fast path (one href of each of a page's entities): `http(s)://host` for every name,
        # the prefixes, and base and extra as they read inside a JSON string.
        object.__setattr__(self, "_hosts", tuple(host.encode() for host in self.hosts))
        object.__setattr__(self, "_any_case", re.compile(b"|".join(map(re.escape, self._hosts)), re.IGNORECASE))
        object.__setattr__(self, "_origins", tuple(f"{scheme}://{host}".encode()
                                                   for host in self.hosts for scheme in ("https", "http")))
        object.__setattr__(self, "_prefixes", tuple(prefix.encode() for prefix in self.prefixes))
        object.__setattr__(self, "_base", json.dumps(self.base, ensure_ascii=False)[1:-1].encode())
        object.__setattr__(self, "_extra", json.dumps(self.extra, ensure_ascii=False)[1:-1].encode())

    def rewrite(self, body: bytes) -> bytes | None:
        """The body with its links rewritten, or None when it holds no link to rewrite."""
        if not any(host in body for host in self._hosts) and not self._any_case.search(body):
            return None  # the common miss: a few substring scans, then one case-blind one (hosts ignore case)
        moved = _HREF.sub(self._replace, body)
        return None if moved == body else moved

    def _replace(self, match: re.Match[bytes]) -> bytes:
        """One `"href": "<url>"` pair: rewritten when the URL is the account's, else as it was."""
        raw = match.group("url")
        fast = self._fast(raw)
        if fast is not None:
            return match.group("key") + fast if fast else match.group(0)
        try:
            # Most hrefs hold no escape at all: decode them directly; JSON's rules undo \\/, \\u0026 and the rest.
            href = raw.decode() if b"\\" not in raw else json.loads(b'"' + raw + b'"')
        except ValueError:  # not UTF-8, or not a valid JSON string after all
            return match.group(0)
        moved = self.moved(href) if isinstance(href, str) else None
        if moved is None:
            return match.group(0)
        return match.group("key") + json.dumps(moved, ensure_ascii=False).encode()

    def _fast(self, raw: bytes) -> bytes | None:
        """The common href (plain ASCII, no escape, the host as written in `hosts`) moved without decoding it:
        the new JSON string, or b"" when it stays as it is; None hands it to the general path (`moved`)."""
        if b"\\" in raw or not raw.isascii():
            return None
        for origin in self._origins:
            if raw.startswith(origin) and raw[len(origin):len(origin) + 1] == b"/":
                path, _, query = raw[len(origin):].partition(b"#")[0].partition(b"?")
                if not path.startswith(self._prefixes):
                    return b""
                query = b"&".join(q for q in (query, self._extra) if q)
                return b'"' + self._base + path + (b"?" + query if query else b"") + b'"'
        return None

    def moved(self, href: str) -> str | None:
        """The gateway URL for an absolute href on the account host under a proxied path, else None."""
        scheme, sep, rest = href.partition("://")
        if not sep or scheme not in ("http", "https"):
            return None
        netloc, slash, tail = rest.partition("/")
        path, _, query = (slash + tail).partition("#")[0].partition("?")
        if netloc.lower() not in self.hosts or not path.startswith(self.prefixes):
            return None
        query = "&".join(q for q in (query, self.extra) if q)
        return self.base + path + ("?" + query if query else "")
