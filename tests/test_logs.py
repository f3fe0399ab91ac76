"""Logs (logs.py): one structured event per line, never a secret, never the callback's query string."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request

from amo_gateway.app import create_app
from amo_gateway.logs import AccessFields, AccessLog, JsonFormatter, LogfmtFormatter, _ms, event
from amo_gateway.serve import runner_options
from amo_gateway.settings import Settings
from amo_gateway.typedefs import ACCESS_LOG, MANAGER
from amo_gateway.vault import KeyRing
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


async def test_no_secret_reaches_any_log_line(make_rig: RigFactory, log_lines: io.StringIO,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Exchange, callback, refresh, /token and /test: the log (events and access lines, as written to stderr)
    holds no token, code, API key or client secret."""
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
    rig.app[ACCESS_LOG].flush()
    access = capsys.readouterr().err
    assert "/callback" in access and "/token" in access, "the access lines are part of what is checked"
    text = log_lines.getvalue() + access
    assert "callback.connected" in text and "refresh.ok" in text
    secrets = [first.access_token, first.refresh_token, second.access_token, second.refresh_token, record["code"],
               record["state"], API_KEY, rig.settings.secret("client_secret"), rig.admin["Authorization"][7:]]
    for secret in secrets:
        assert secret and secret not in text
        assert secret[:16] not in text, "not even a prefix of a secret"


@pytest.mark.parametrize("fmt", ["json", "logfmt"])
async def test_access_log_never_writes_the_callback_query(fmt: str) -> None:
    """The access logger logs the path without ?code=…&state=…, in either format."""
    stream = io.StringIO()
    sink = AccessLog(fmt, stream)
    logger = logging.getLogger("test.access")
    logger.setLevel(logging.INFO)
    request = make_mocked_request("GET", "/api/v1/integrations/amo-crm/callback?code=SECRETCODE&state=SECRETSTATE")
    sink.logger_class()(logger, "").log(request, web.Response(status=200), 0.01)
    sink.flush()
    if fmt == "json":
        assert json.loads(stream.getvalue())["path"] == "/api/v1/integrations/amo-crm/callback"
    else:
        assert " path=/api/v1/integrations/amo-crm/callback " in stream.getvalue()
    assert "SECRET" not in stream.getvalue() and "code" not in stream.getvalue()


AWKWARD = AccessFields("GET", '/api/v4/leads/"quoted" \\ back\nslash/ünï cödé\t=x', 404, 17, 0.00025, None)


@pytest.mark.parametrize(("fmt", "formatter"), [("json", JsonFormatter()), ("logfmt", LogfmtFormatter())])
@pytest.mark.parametrize("fields", [AccessFields("POST", "/token", 200, 1234, 0.0035, "203.0.113.66"), AWKWARD])
def test_access_lines_are_what_the_formatters_write(fmt: str, formatter: logging.Formatter,
                                                    fields: AccessFields) -> None:
    """The preformatted line equals the formatter's output for the same event: fields, order, escaping, ts."""
    stream = io.StringIO()
    now = 1_767_225_600.0475  # milliseconds are truncated, as logging does
    AccessLog(fmt, stream, clock=lambda: now).write(fields)
    record = logging.LogRecord("aiohttp.access", logging.INFO, __file__, 0, "http.access", None, None)
    record.created, record.msecs = now, int((now - int(now)) * 1000) + 0.0
    record.fields = {"method": fields.method, "path": fields.path, "status": fields.status, "bytes": fields.bytes,
                     "ms": round(fields.seconds * 1000, 2), "remote": fields.remote}
    assert stream.getvalue() == formatter.format(record) + "\n"


def test_access_line_durations_are_milliseconds_to_two_decimals() -> None:
    """The "ms" field is the duration to 0.01 ms, written short (no 0.30000000000000004), from 0 to minutes."""
    rng = random.Random(11)
    for seconds in [0.0, 0.001, 0.0035, 0.012345, 2.5, 61.0] + [rng.uniform(0, 120) for _ in range(2000)]:
        ms = _ms(seconds)
        assert abs(ms - seconds * 1000) <= 0.005 + 1e-9, seconds
        assert ms == round(ms, 2) and len(repr(ms).partition(".")[2]) <= 2, (seconds, ms)


async def test_access_lines_are_buffered_and_written_within_the_interval() -> None:
    """A burst of lines is one write, made once FLUSH_EVERY has passed (not one write per request)."""
    writes: list[str] = []

    class Recorder(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    sink = AccessLog("json", Recorder(), flush_every=0.05)
    for status in range(200, 300):
        sink.write(AccessFields("GET", "/token", status, 10, 0.0001, "127.0.0.1"))
    assert writes == []
    await asyncio.sleep(0.2)
    assert len(writes) == 1 and writes[0].count("\n") == 100


async def test_a_full_buffer_is_written_at_once() -> None:
    """MAX_PENDING bounds what waits in memory: the line that fills it writes the lot."""
    stream = io.StringIO()
    sink = AccessLog("json", stream, flush_every=60, max_pending=3)
    for _ in range(3):
        sink.write(AccessFields("GET", "/token", 200, 10, 0.0001, "127.0.0.1"))
    assert stream.getvalue().count("\n") == 3


async def test_pending_access_lines_are_written_when_the_app_stops(
        tmp_path: Path, keys: KeyRing, aiohttp_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A line still waiting for its timer at shutdown is written by the app's cleanup, not lost."""
    stream = io.StringIO()
    settings = Settings.model_validate({"vault_path": tmp_path / "vault" / "vault.enc", "log_format": "logfmt"})
    sink = AccessLog(settings.log_format, stream, flush_every=3600)
    server = TestServer(create_app(settings, keys=keys, run_refresher=False, access_log=sink), host="127.0.0.1")
    with caplog.at_level(logging.INFO):
        await server.start_server(**runner_options(settings, sink))
        client = await aiohttp_client(server)
        resp = await client.get("/healthz?probe=SECRET")
        assert resp.status == 200
        assert stream.getvalue() == ""
        await client.close()
    assert "event=http.access method=GET path=/healthz status=200" in stream.getvalue()
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
