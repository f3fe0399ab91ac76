"""Which proxied paths reach amoCRM: judged on the raw request path, before anything is sent.

nginx picks its location from the decoded path but forwards the raw one, and aiohttp decodes `match_info`;
so the proxy judges the very bytes it will forward. A path that could name another path after one more
decoding (an encoded `/`, `\\` or `.`, an encoded control character), or after normalisation (a `.` or `..`
segment, a backslash), is refused outright, never cleaned up. Of the clean paths, only those under the
configured API prefixes (`AMO_PROXY_PATHS`, amoCRM's `/api/v4/` by default) are forwarded: the proxy holds
the account's token, and must not lend it to `oauth2/access_token` or anything else on the account host.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import unquote

from amo_gateway.errors import BadRequest, Forbidden
from amo_gateway.settings import PREFIX

ROOT = f"{PREFIX}/proxy/"
ACCOUNTS_ROOT = f"{PREFIX}/accounts/"  # `{ACCOUNTS_ROOT}{id or subdomain}/proxy/…`: the per-account base URL
_SELECTOR = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # an account id or a DNS label, raw
# %2f `/`, %5c `\`, %2e `.`, and %00-%1f, %7f (control characters), in any case.
_ENCODED_TRICK = re.compile(r"%(?:2f|5c|2e|[01][0-9a-f]|7f)", re.IGNORECASE)
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x21-\x7e]")  # controls, spaces and raw non-ASCII never belong in a target


def forwarded_target(raw_path: str, prefixes: Sequence[str]) -> str:
    """`/api/v4/leads?limit=50` from the raw request path and query, with `account=` dropped."""
    return proxied(raw_path, prefixes)[0]


def proxied(raw_path: str, prefixes: Sequence[str]) -> tuple[str, str | None]:
    """The target to forward, and the account the path names (`…/accounts/{account}/proxy/…`) or None.

    Both roots, `{prefix}/proxy/` and `{prefix}/accounts/{account}/proxy/`, pass the same checks: BadRequest
    `bad_proxy_path` (400) for a path that is not plainly what it says (the account segment included), and
    Forbidden `path_not_proxied` (403) for a plain path outside `prefixes`.
    """
    path, _, query = raw_path.partition("?")
    rest, account = _after_root(path)
    target = "/" + rest
    refuse_disguised(target)
    if not any(target.startswith(prefix) for prefix in prefixes):
        raise Forbidden("the proxy forwards only amoCRM's API (" + ", ".join(prefixes) + "); not this path",
                        code="path_not_proxied")
    kept = [p for p in query.split("&") if p and unquote(p.partition("=")[0]) != "account"]
    return target + ("?" + "&".join(kept) if kept else ""), account


def _after_root(path: str) -> tuple[str, str | None]:
    """The raw path after its proxy root, and the account a per-account root names."""
    if path.startswith(ROOT):
        return path[len(ROOT):], None
    if path.startswith(ACCOUNTS_ROOT):
        account, _, rest = path[len(ACCOUNTS_ROOT):].partition("/")
        if rest.startswith("proxy/") and _SELECTOR.fullmatch(account):
            return rest[len("proxy/"):], account
    raise BadRequest("the proxied path must follow /proxy/ or /accounts/{id or subdomain}/proxy/ literally",
                     code="bad_proxy_path")


def refuse_disguised(path: str) -> None:
    """BadRequest unless the raw path is printable ASCII without encoded separators, dots or dot segments."""
    if _ENCODED_TRICK.search(path) or _NOT_PRINTABLE_ASCII.search(path) or "\\" in path:
        raise BadRequest("the proxied path may not hold an encoded /, \\ or ., a backslash, a space or a "
                         "control character", code="bad_proxy_path")
    if any(segment in (".", "..") for segment in path.split("/")):
        raise BadRequest("the proxied path may not hold . or .. segments", code="bad_proxy_path")
