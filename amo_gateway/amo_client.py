"""amoCRM's HTTP API as the gateway uses it; every answer becomes data or a domain error (errors.py)."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from amo_gateway.errors import (
    UpstreamError,
    UpstreamForbidden,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnauthorized,
    UpstreamUnavailable,
)


class AmoClient:
    """Calls one amoCRM integration's OAuth and API endpoints; holds the client credentials, never logs them."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        client_id: str,
        client_secret: str,
        redirect_uri: str,
        timeout: float,
    ) -> None:
        self._session = session
        self._client_id = client_id
        self._client_secret = client_secret
        self._redirect_uri = redirect_uri
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    def __repr__(self) -> str:
        return f"AmoClient(client_id={self._client_id!r})"

    async def exchange_api_key(self, base_url: str, *, login: str, api_key: str, state: str) -> None:
        """POST /oauth2/exchange_api_key; amoCRM answers 202 and later calls our redirect URI itself."""
        body = {
            "login": login,
            "api_key": api_key,
            "client_uuid": self._client_id,
            "client_secret": self._client_secret,
            "state": state,
        }
        await self._call("POST", f"{base_url}/oauth2/exchange_api_key", json_body=body)

    async def token_from_code(self, base_url: str, code: str, *, time_limit: float | None = None) -> dict[str, Any]:
        """Redeem a single-use authorization code for a pair."""
        grant = {"grant_type": "authorization_code", "code": code}
        return await self._token(base_url, grant, time_limit)

    async def token_from_refresh(self, base_url: str, refresh_token: str) -> dict[str, Any]:
        """Spend a single-use refresh token for a new pair."""
        return await self._token(base_url, {"grant_type": "refresh_token", "refresh_token": refresh_token}, None)

    async def account(self, base_url: str, access_token: str) -> dict[str, Any]:
        """GET /api/v4/account: the cheap connection test."""
        headers = {"Authorization": f"Bearer {access_token}"}
        return await self._call("GET", f"{base_url}/api/v4/account", headers=headers)

    async def current_subdomain(self, api_domain_url: str, refresh_token: str) -> dict[str, Any]:
        """Where an account lives now, asked of the api_domain with the refresh token (after a rename)."""
        headers = {"X-Refresh-Token": refresh_token}
        return await self._call("GET", f"{api_domain_url}/oauth2/account/current/subdomain", headers=headers)

    async def _token(self, base_url: str, grant: dict[str, str], time_limit: float | None) -> dict[str, Any]:
        body = {
            "client_id": self._client_id,
            "client_secret": self._client_secret,
            "redirect_uri": self._redirect_uri,
            **grant,
        }
        answer = await self._call("POST", f"{base_url}/oauth2/access_token", json_body=body, time_limit=time_limit)
        if not isinstance(answer.get("access_token"), str) or "expires_in" not in answer:
            raise UpstreamUnavailable("amoCRM's token answer lacks access_token or expires_in")
        return answer

    async def _call(
        self,
        method: str,
        url: str,
        *,
        json_body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        time_limit: float | None = None,
    ) -> dict[str, Any]:
        limit = aiohttp.ClientTimeout(total=time_limit) if time_limit else self._timeout
        try:
            async with self._session.request(method, url, json=json_body, headers=headers, timeout=limit) as resp:
                text = await resp.text(errors="replace")
                if resp.status >= 400:
                    raise upstream_error(resp.status, text, resp.headers.get("Retry-After"))
                return _parse_json(text)
        except TimeoutError:
            raise UpstreamTimeout("amoCRM did not answer in time", maybe_processed=True) from None
        except aiohttp.ClientConnectionError as err:
            processed = not isinstance(err, aiohttp.ClientConnectorError)
            raise UpstreamUnavailable(
                f"cannot reach amoCRM ({type(err).__name__})", maybe_processed=processed
            ) from None


def _parse_json(text: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        raise UpstreamUnavailable("amoCRM answered with something that is not JSON") from None
    return data if isinstance(data, dict) else {"data": data}


def problem_hint(text: str) -> str | None:
    """The `hint` (or `title`) of a problem+json body; 403/429 bodies may be HTML or plain text."""
    try:
        body = json.loads(text)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    hint = body.get("hint") or body.get("title") or body.get("detail")
    return str(hint)[:200] if hint else None


def upstream_error(status: int, text: str, retry_after: str | None) -> UpstreamError:
    """The domain error for an amoCRM refusal, branching on status and hint as amoCRM's docs say to."""
    hint = problem_hint(text)
    said = f": {hint}" if hint else ""
    if status == 401:
        return UpstreamUnauthorized(f"amoCRM refused the credentials{said}", hint=hint)
    if status == 403:
        return UpstreamForbidden(f"amoCRM forbids this (insufficient rights or the account is blocked){said}")
    if status == 404:
        return UpstreamNotFound(f"amoCRM does not know this resource{said}", hint=hint)
    if status == 429:
        wait = int(retry_after) if retry_after and retry_after.isdigit() else None
        return UpstreamRateLimited(f"amoCRM rate-limited the call{said}", retry_after=wait)
    if status >= 500:
        return UpstreamUnavailable(f"amoCRM failed with HTTP {status}", maybe_processed=True)
    return UpstreamRejected(f"amoCRM rejected the request (HTTP {status}){said}", hint=hint)
