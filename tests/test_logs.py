"""Logs (logs.py): one structured event per line, never a secret, never the callback's query string."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from amo_gateway.logs import JsonFormatter, LogfmtFormatter, event
from amo_gateway.typedefs import MANAGER
from tests.conftest import ACCOUNT_ID, API_KEY, Rig, RigFactory


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


async def test_no_secret_reaches_any_log_line(make_rig: RigFactory, log_lines: io.StringIO) -> None:
    """Exchange, callback, refresh, /token and /test: the log holds no token, code, API key or client secret."""
    rig: Rig = await make_rig()
    record = await rig.connect()
    data, _ = rig.vault().read()
    first = data.accounts[str(ACCOUNT_ID)].tokens
    assert first is not None
    await rig.app[MANAGER].refresh(str(ACCOUNT_ID), seen=first.access_token)
    await rig.client.get(rig.url("/token"), headers=rig.admin)
    await rig.client.get(rig.url("/test"))
    data, _ = rig.vault().read()
    second = data.accounts[str(ACCOUNT_ID)].tokens
    assert second is not None
    text = log_lines.getvalue()
    assert "callback.connected" in text and "refresh.ok" in text
    secrets = [first.access_token, first.refresh_token, second.access_token, second.refresh_token, record["code"],
               record["state"], API_KEY, rig.settings.secret("client_secret"), rig.admin["Authorization"][7:]]
    for secret in secrets:
        assert secret and secret not in text
        assert secret[:16] not in text, "not even a prefix of a secret"


async def test_access_log_never_writes_the_callback_query(make_rig: RigFactory) -> None:
    """The access logger logs the path without ?code=…&state=…."""
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from amo_gateway.logs import AccessLogger

    stream = io.StringIO()
    logger = logging.getLogger("test.access")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    request = make_mocked_request("GET", "/api/v1/integrations/amo-crm/callback?code=SECRETCODE&state=SECRETSTATE")
    AccessLogger(logger, "").log(request, web.Response(status=200), 0.01)
    line = json.loads(stream.getvalue())
    assert line["path"] == "/api/v1/integrations/amo-crm/callback"
    assert "SECRET" not in stream.getvalue()


def test_formatters_write_one_event_per_line() -> None:
    """JSON and logfmt both keep an event on one line, with its fields."""
    record_stream = io.StringIO()
    logger = logging.getLogger("test.fmt")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    for formatter in (JsonFormatter(), LogfmtFormatter()):
        handler = logging.StreamHandler(record_stream)
        handler.setFormatter(formatter)
        logger.handlers[:] = [handler]
        event(logger, "refresh.ok", account="7", detail="two words\nand a newline")
    lines = record_stream.getvalue().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["detail"] == "two words\nand a newline"
    assert lines[1].startswith("ts=") and 'event=refresh.ok account=7 detail="two words\\nand a newline"' in lines[1]
