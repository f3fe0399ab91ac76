"""The shipped nginx site, for real: Debian's nginx on loopback in front of a real gateway and sandbox process.

Only ports, paths and the certificate (self-signed, made here) are substituted in nginx/amo-gateway.conf and
its snippet: the module's nginx is a fresh install, which serves the public only callback, disconnect and test.
The operator reaches the exchange the way the README says, through the gateway's own port (what an SSH tunnel
gives); amoCRM's stand-in calls the callback THROUGH nginx over TLS, trusting the test certificate via
SSL_CERT_FILE. A second nginx, `office`, runs the site with its one allow line edited.

Client addresses: 127.0.0.0/8 is all loopback, so each test speaks from its own address. 127.0.0.1 is the box
itself (and amoCRM's stand-in); the other low addresses play the internet; 127.0.0.64/26 is the office network
that the `office` nginx allows.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from amo_gateway.settings import PREFIX
from tests.conftest import free_port
from tests.deploy_procs import (
    API_KEY,
    LOGIN,
    ROOT,
    Credentials,
    NotifySocket,
    Process,
    gateway_command,
    gateway_env,
    make_certificate,
    port_open,
    sandbox_command,
    wait_until,
)
from tests.prerequisites import unavailable

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
SERVER_NAME = "gateway.example.com"
ACME_TOKEN = "acme-token-for-the-test"
ALLOW_LINE = "    # 203.0.113.0/24 1;\n"  # the one line an operator edits (README, "Reaching the internal endpoints")
OFFICE = "127.0.0.64/26"
CONSUMER = {"Authorization": "Bearer consumer-secret-1"}  # tests/deploy_procs.py writes this consumer token
INTERNAL = [("GET", "token"), ("GET", "accounts"), ("GET", "proxy/api/v4/account"), ("POST", "proxy/api/v4/leads"),
            ("GET", "accounts/demo/proxy/api/v4/leads"), ("PATCH", "accounts/31920194/proxy/api/v4/leads"),
            ("POST", "exchange-api-key"), ("GET", "authorize"), ("GET", ""), ("GET", "anything-added-later"),
            ("GET", "console"), ("POST", "console/login"), ("POST", "console/connect"),
            ("GET", "console/static/console.js")]


@pytest.fixture(scope="module", autouse=True)
def _nginx_available() -> None:
    """Skip without nginx, naming the reason; under CI fail (`make test` installs it)."""
    if NGINX is None:
        unavailable("no nginx binary; `make test` installs it via scripts/ensure-nginx.sh (Debian's nginx-light)")


@dataclass
class Stack:
    """nginx, the gateway and the sandbox, with their ports, logs and the test certificate."""

    prefix: Path
    http_port: int
    https_port: int
    gateway_port: int
    sandbox_port: int
    cert: Path
    credentials: Credentials
    gateway: Process
    sandbox: Process
    nginx: Process

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credentials.admin_token}"}

    def nginx_access_log(self) -> str:
        return (self.prefix / "logs" / "amo-gateway.access.log").read_text(encoding="utf-8")

    def gateway_access(self) -> list[dict[str, Any]]:
        """The gateway's JSON access-log records (stderr of the process)."""
        records = []
        for line in self.gateway.output().splitlines():
            if line.startswith("{") and '"http.access"' in line:
                records.append(json.loads(line))
        return records


def render_site(prefix: Path, *, http_port: int, https_port: int, gateway_port: int, cert: Path, key: Path) -> None:
    """Copy the shipped site and snippet into `prefix`, substituting only ports, paths and the certificate."""
    site = (ROOT / "nginx" / "amo-gateway.conf").read_text(encoding="utf-8")
    substitutions = [
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("    listen [::]:80;\n", ""),
        ("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;"),
        ("    listen [::]:443 ssl;\n", ""),
        ("server 127.0.0.1:8080;", f"server 127.0.0.1:{gateway_port};"),
        (f"/etc/letsencrypt/live/{SERVER_NAME}/fullchain.pem", str(cert)),
        (f"/etc/letsencrypt/live/{SERVER_NAME}/privkey.pem", str(key)),
        ("/var/log/nginx/", f"{prefix}/logs/"),
        ("/var/www/letsencrypt", f"{prefix}/acme"),
        ("/etc/nginx/snippets/", f"{prefix}/"),
    ]
    for old, new in substitutions:
        assert old in site, f"the shipped site no longer contains {old!r}; update the test's substitutions"
        site = site.replace(old, new)
    (prefix / "amo-gateway.conf").write_text(site, encoding="utf-8")
    shutil.copy(ROOT / "nginx" / "amo-gateway-proxy-params.conf", prefix / "amo-gateway-proxy-params.conf")
    for sub in ("logs", "temp", "acme/.well-known/acme-challenge"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    (prefix / "acme/.well-known/acme-challenge" / ACME_TOKEN).write_text("challenge-answer\n", encoding="utf-8")
    (prefix / "nginx.conf").write_text(_main_conf(prefix, "amo-gateway.conf", "nginx"), encoding="utf-8")


def _main_conf(prefix: Path, site: str, name: str) -> str:
    """A minimal nginx.conf (like Debian's, which includes sites at the http level) around `site`."""
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read the 0700 pytest temp directory
    temps = "".join(f"    {name}_temp_path {prefix}/temp/{name};\n"
                    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"{user}worker_processes 1;\npid {prefix}/{name}.pid;\nerror_log {prefix}/logs/{name}.error.log warn;\n"
            f"events {{ worker_connections 256; }}\n"
            f"http {{\n{temps}    access_log off;\n    include {prefix}/{site};\n}}\n")


def nginx_argv(prefix: Path, conf: str = "nginx.conf", *extra: str) -> list[str]:
    assert NGINX is not None
    return [NGINX, "-p", f"{prefix}/", "-c", str(prefix / conf), "-e", f"{prefix}/logs/error.log", *extra]


def start_nginx(prefix: Path, conf: str, ports: tuple[int, ...], name: str = "nginx") -> Process:
    nginx = Process.start(name, nginx_argv(prefix, conf, "-g", "daemon off;"), prefix / "logs" / f"{name}.out")
    for port in ports:
        wait_until(f"{name} on port {port}", lambda p=port: port_open(p), 10, nginx)  # type: ignore[misc]
    return nginx


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Sandbox, gateway (with its READY=1 awaited as systemd would) and nginx, started once for the module."""
    prefix = tmp_path_factory.mktemp("nginx")
    cert, key = make_certificate(prefix)
    http_port, https_port, gateway_port, sandbox_port = (free_port() for _ in range(4))
    redirect = f"https://127.0.0.1:{https_port}{PREFIX}/callback"
    creds = Credentials(prefix / "credentials")
    creds.write()
    render_site(prefix, http_port=http_port, https_port=https_port, gateway_port=gateway_port, cert=cert, key=key)
    sandbox_env = {**os.environ, "SSL_CERT_FILE": str(cert)}  # amoCRM's stand-in verifies nginx's certificate
    sandbox = Process.start("sandbox", sandbox_command(sandbox_port, creds.client_secret, redirect),
                            prefix / "sandbox.log", sandbox_env)
    notify = NotifySocket(prefix / "notify")
    env = gateway_env(port=gateway_port, vault=prefix / "state" / "vault.enc", credentials=creds.directory,
                      redirect_uri=redirect, base_url=f"http://127.0.0.1:{sandbox_port}", notify=notify.path)
    gateway = Process.start("gateway", gateway_command(), prefix / "gateway.log", env)
    procs = [sandbox, gateway]
    try:
        wait_until("the sandbox", lambda: port_open(sandbox_port), 15, sandbox)
        notify.wait_for("READY=1", 20)
        nginx = start_nginx(prefix, "nginx.conf", (http_port, https_port))
        procs.append(nginx)
        yield Stack(prefix, http_port, https_port, gateway_port, sandbox_port, cert, creds, gateway, sandbox, nginx)
    finally:
        notify.close()
        for proc in reversed(procs):
            proc.stop()


def request(stack: Stack, method: str, path: str, *, headers: dict[str, str] | None = None,
            body: bytes | None = None, source: str = "127.0.0.1", tls: bool = True,
            port: int | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request through nginx (HTTPS trusting the test certificate) from loopback address `source`."""
    conn: http.client.HTTPConnection
    if tls:
        context = ssl.create_default_context(cafile=str(stack.cert))
        conn = http.client.HTTPSConnection("127.0.0.1", port or stack.https_port, context=context, timeout=10,
                                           source_address=(source, 0))
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port or stack.http_port, timeout=10, source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        headers: dict[str, str] = {}
        for name, value in resp.getheaders():  # a repeated header (Set-Cookie) keeps every value, comma-joined
            headers[name.lower()] = f"{headers[name.lower()]}, {value}" if name.lower() in headers else value
        return resp.status, headers, resp.read()
    finally:
        conn.close()


def direct(stack: Stack, method: str, path: str, *, headers: dict[str, str] | None = None,
           body: bytes | None = None) -> tuple[int, bytes]:
    """One request to the gateway's own port, bypassing nginx: what `ssh -L 8080:127.0.0.1:8080` gives."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.gateway_port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def reached(stack: Stack, source: str) -> list[dict[str, Any]]:
    """The gateway's access records of requests nginx forwarded from client address `source`."""
    return [r for r in stack.gateway_access() if r["remote"] == source]


def reached_paths(stack: Stack, source: str, count: int) -> list[str]:
    """The last path segments the gateway logged from `source`, once `count` are there (its log lags the
    answer a little). Send a public request last, so that a refused one could not still be on its way."""
    wait_until(f"{count} requests from {source} in the gateway's log", lambda: len(reached(stack, source)) >= count,
               5, stack.gateway)
    return [r["path"].rsplit("/", 1)[1] for r in reached(stack, source)]


def allow(addresses: str) -> Callable[[str], str]:
    """The operator's one edit: the geo block's commented allow line, uncommented for `addresses`."""
    return lambda site: site.replace(ALLOW_LINE, f"    {addresses} 1;\n")


def sandbox_stats(stack: Stack) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.sandbox_port}/_sandbox/stats", timeout=5) as resp:
        data: dict[str, Any] = json.load(resp)
    return data


@pytest.fixture(scope="module")
def connected(stack: Stack) -> dict[str, Any]:
    """The seed's story on a fresh install: exchange through the tunnel (202), amoCRM's callback over TLS
    through nginx, then the public /test through nginx."""
    body = json.dumps({"login": LOGIN, "api_key": API_KEY}).encode()
    status, answer = direct(stack, "POST", f"{PREFIX}/exchange-api-key", body=body,
                            headers={**stack.admin, "Content-Type": "application/json"})
    assert status == 202, answer
    done: list[dict[str, Any]] = []

    def answered() -> bool:
        done[:] = [c for c in sandbox_stats(stack)["callbacks"] if c["status"] or c["error"]]
        return bool(done)

    wait_until("amoCRM's callback through nginx", answered, 10, stack.gateway)
    test_status, _, test_body = request(stack, "GET", f"{PREFIX}/test")
    return {"exchange": json.loads(answer), "callback": done[-1], "test": (test_status, json.loads(test_body))}


def test_shipped_site_passes_nginx_t(stack: Stack) -> None:
    """`nginx -t` accepts the shipped site and snippet (only ports, paths and certificate substituted)."""
    result = subprocess.run(nginx_argv(stack.prefix, "nginx.conf", "-t"), capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_plain_http_redirects_to_https(stack: Stack) -> None:
    """Port 80 answers 301 to the https:// URL of the same path, query kept for the browser."""
    status, headers, _ = request(stack, "GET", f"{PREFIX}/test?x=1", tls=False)
    assert status in (301, 308)
    assert headers["location"] == f"https://{SERVER_NAME}{PREFIX}/test?x=1"


def test_acme_challenge_is_served_over_plain_http(stack: Stack) -> None:
    """certbot's webroot challenge is answered on port 80, not redirected."""
    status, _, body = request(stack, "GET", f"/.well-known/acme-challenge/{ACME_TOKEN}", tls=False)
    assert (status, body) == (200, b"challenge-answer\n")


def _handshake(port: int, version: ssl.TLSVersion) -> str:
    """The negotiated version, or `refused:<OpenSSL reason>` when the handshake fails."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # offering the deprecated TLS 1.1 is the point
        context.minimum_version = context.maximum_version = version
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let OUR side offer TLS 1.1, so any refusal is the server's
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                return str(tls.version())
        except ssl.SSLError as err:
            return f"refused:{err.reason}"


def test_tls_1_1_is_refused_and_1_2_and_1_3_are_accepted(stack: Stack) -> None:
    """Mozilla intermediate: the server itself alerts on a TLS 1.1 hello; 1.2 and 1.3 complete."""
    assert _handshake(stack.https_port, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    assert _handshake(stack.https_port, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    refused = _handshake(stack.https_port, ssl.TLSVersion.TLSv1_1)
    assert refused.startswith("refused:"), f"nginx accepted TLS 1.1 ({refused})"
    # An alert FROM the server; NO_PROTOCOLS_AVAILABLE would mean our client never sent the hello.
    assert refused in ("refused:TLSV1_ALERT_PROTOCOL_VERSION", "refused:UNSUPPORTED_PROTOCOL"), refused


def test_https_answers_carry_hsts(stack: Stack) -> None:
    """Every https answer, even nginx's own 404, carries Strict-Transport-Security."""
    for path in (f"{PREFIX}/test", "/nowhere"):
        _, headers, _ = request(stack, "GET", path)
        assert headers["strict-transport-security"].startswith("max-age=")


def test_exchange_callback_test_story_works_through_nginx(connected: dict[str, Any]) -> None:
    """202 with the seed's JSON (through the tunnel); amoCRM's TLS callback through nginx gets the seed's success
    JSON; the public /test then answers 200 `connected`."""
    assert connected["exchange"] == {"message": "API key exchange request accepted", "status": "accepted",
                                     "note": "Authorization code will be sent to redirect URI"}
    callback = connected["callback"]
    assert callback["error"] is None and callback["status"] == 200, callback
    seed = {"message": "AMO CRM successfully connected", "status": "success", "fromExchange": True}
    answer = json.loads(callback["body"])
    assert {k: answer.get(k) for k in seed} == seed  # extra fields are fine (contract notes)
    status, body = connected["test"]
    assert (status, body["status"]) == (200, "connected"), body


def test_nginx_access_log_never_holds_the_callback_query(stack: Stack, connected: dict[str, Any]) -> None:
    """After a real callback, nginx's log shows its path but no `code=` (nor any query) anywhere."""
    log = stack.nginx_access_log()
    assert f"{PREFIX}/callback" in log
    assert "code=" not in log
    assert "?" not in log


def test_forged_forwarded_for_does_not_reach_the_gateway(stack: Stack) -> None:
    """A client's own X-Forwarded-For is replaced by nginx: the gateway logs the real peer, not the forgery."""
    forged = {"X-Forwarded-For": "198.51.100.23", "X-Forwarded-Proto": "http", "Forwarded": "for=198.51.100.23"}
    request(stack, "GET", f"{PREFIX}/test", headers=forged, source="127.0.0.2")

    def logged() -> list[dict[str, Any]]:
        return [r for r in stack.gateway_access() if r["path"] == f"{PREFIX}/test" and r["remote"] != "127.0.0.1"]

    wait_until("the gateway's access log line", lambda: bool(logged()), 5, stack.gateway)
    assert [r["remote"] for r in logged()] == ["127.0.0.2"]  # nginx's $remote_addr, believed from 127.0.0.1
    assert "198.51.100.23" not in stack.gateway.output()


def _burst(stack: Stack, method: str, path: str, source: str, count: int, port: int | None = None) -> list[int]:
    """`count` requests back to back from `source`; their statuses. Each 429 must be nginx's JSON one."""
    statuses = []
    for _ in range(count):
        status, headers, body = request(stack, method, path, body=b"{}" if method == "POST" else None,
                                        headers={"Content-Type": "application/json"}, source=source, port=port)
        statuses.append(status)
        if status == 429:
            assert json.loads(body)["error"] == "too_many_requests"
            assert headers["retry-after"] == "10"
    return statuses


def test_exchange_burst_is_answered_429_by_nginx(stack: Stack, office: int) -> None:
    """A burst to exchange-api-key from one office address: past the burst allowance nginx answers JSON 429."""
    statuses = _burst(stack, "POST", f"{PREFIX}/exchange-api-key", "127.0.0.67", 12, office)
    assert 429 in statuses
    assert statuses.index(429) >= 1, "the first request of a burst must reach the gateway"
    assert len(reached_paths(stack, "127.0.0.67", statuses.count(401))) == statuses.count(401) < 12


def test_callback_and_disconnect_have_their_own_rate_limits(stack: Stack) -> None:
    """A flood of callbacks from one address gets nginx's 429 past a burst of 10; disconnect, with its own
    zone, still reaches the gateway from that address, then is cut the same way under its own flood."""
    callbacks = _burst(stack, "GET", f"{PREFIX}/callback", "127.0.0.8", 30)
    assert callbacks[:11] == [400] * 11 and callbacks.count(429) >= 10, callbacks  # 400: the gateway's, no code
    disconnects = _burst(stack, "GET", f"{PREFIX}/disconnect", "127.0.0.8", 30)
    assert disconnects[:11] == [400] * 11 and disconnects.count(429) >= 10, disconnects
    passed = [("callback", callbacks.count(400)), ("disconnect", disconnects.count(400))]
    assert reached_paths(stack, "127.0.0.8", 60 - callbacks.count(429) - disconnects.count(429)) == [
        path for path, count in passed for _ in range(count)]


def test_root_endpoints_are_not_exposed_publicly(stack: Stack) -> None:
    """/healthz, /readyz, /metrics and /openapi.json answer 404 from nginx; the gateway never sees them."""
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        status, _, body = request(stack, "GET", path)
        assert status == 404, path
        assert json.loads(body)["error"] == "not_found"
    assert not [r for r in stack.gateway_access() if r["path"] in ("/healthz", "/readyz", "/metrics")]


def test_very_long_uri_gets_414_and_a_big_body_413(stack: Stack) -> None:
    """nginx refuses a 9 KB request line (414) and a 100 KB body (413) before the gateway."""
    status, _, _ = request(stack, "GET", f"{PREFIX}/test?pad={'a' * 9000}", source="127.0.0.4")
    assert status == 414
    status, _, _ = request(stack, "POST", f"{PREFIX}/callback", body=b"x" * 100_000, source="127.0.0.4",
                           headers={"Content-Type": "application/json"})
    assert status == 413
    assert not [r for r in stack.gateway_access() if r["remote"] == "127.0.0.4"]


@contextmanager
def variant(stack: Stack, name: str, change: Callable[[str], str]) -> Iterator[int]:
    """A second nginx on fresh ports, running the rendered site after `change`; yields its https port."""
    site = (stack.prefix / "amo-gateway.conf").read_text(encoding="utf-8")
    changed = change(site)
    assert changed != site, f"{name}: the shipped site changed shape; update this test"
    port_http, port_https = free_port(), free_port()
    changed = changed.replace(f":{stack.http_port};", f":{port_http};")
    changed = changed.replace(f":{stack.https_port} ", f":{port_https} ")
    (stack.prefix / f"{name}.conf").write_text(changed, encoding="utf-8")
    (stack.prefix / f"{name}-main.conf").write_text(_main_conf(stack.prefix, f"{name}.conf", name), encoding="utf-8")
    nginx = start_nginx(stack.prefix, f"{name}-main.conf", (port_http, port_https), name)
    try:
        yield port_https
    finally:
        nginx.stop()


@pytest.fixture(scope="module")
def office(stack: Stack) -> Iterator[int]:
    """The site with its one allow line edited for the office network 127.0.0.64/26; its https port."""
    with variant(stack, "office", allow(OFFICE)) as port:
        yield port


def _refused(stack: Stack, source: str, port: int | None = None) -> None:
    """Every internal endpoint, bearer or not, answers nginx's JSON 403 to `source`."""
    for method, path in INTERNAL:
        for headers in ({}, stack.admin):
            status, answer_headers, body = request(stack, method, f"{PREFIX}/{path}", headers=headers,
                                                   body=b"{}" if method == "POST" else None, source=source, port=port)
            assert status == 403, (method, path, status, body)
            assert answer_headers["content-type"] == "application/json"
            assert json.loads(body)["error"] == "address_not_allowed"
            assert answer_headers["strict-transport-security"].startswith("max-age=")


def test_fresh_install_refuses_the_internal_endpoints_to_everyone(stack: Stack) -> None:
    """The shipped site allows no address: token, accounts, proxy, exchange, authorize and anything else under
    the prefix get nginx's JSON 403 from the internet and even from the box itself; the gateway never sees one."""
    _refused(stack, "127.0.0.9")
    _refused(stack, "127.0.0.1")
    assert request(stack, "GET", f"{PREFIX}/test", source="127.0.0.9")[0] in (200, 503)
    assert reached_paths(stack, "127.0.0.9", 1) == ["test"]


def test_fresh_install_serves_callback_disconnect_and_a_public_test(stack: Stack, connected: dict[str, Any]) -> None:
    """From the internet: callback and disconnect reach the gateway (its own 400s here: no code, no signature);
    /test answers only status and expiry; a bearer holder sees the account through the same public /test."""
    for path in ("callback", "disconnect"):
        status, _, body = request(stack, "GET", f"{PREFIX}/{path}", source="127.0.0.10")
        assert status == 400, (path, body)  # the gateway's refusal: the log check below shows it was reached
    status, _, body = request(stack, "GET", f"{PREFIX}/test", source="127.0.0.10")
    assert status == 200
    assert set(json.loads(body)) == {"status", "expires_at", "expires_in"}
    status, _, body = request(stack, "GET", f"{PREFIX}/test", headers=CONSUMER, source="127.0.0.10")
    assert (status, json.loads(body)["account_id"]) == (200, str(connected["callback"]["account_id"]))
    assert reached_paths(stack, "127.0.0.10", 4) == ["callback", "disconnect", "test", "test"]


def test_the_one_allow_line_opens_the_internal_endpoints_to_the_office_only(stack: Stack, office: int,
                                                                          connected: dict[str, Any]) -> None:
    """With the geo line edited for 127.0.0.64/26, an office address gets the token, the accounts and the proxy;
    an address outside that network still gets 403 on the same nginx, and callback stays public."""
    status, _, body = request(stack, "GET", f"{PREFIX}/token", headers=CONSUMER, source="127.0.0.65", port=office)
    assert status == 200 and json.loads(body)["access_token"], body
    status, _, body = request(stack, "GET", f"{PREFIX}/accounts", headers=stack.admin, source="127.0.0.65",
                              port=office)
    assert status == 200 and json.loads(body)["accounts"], body
    status, _, body = request(stack, "GET", f"{PREFIX}/proxy/api/v4/account", headers=CONSUMER, source="127.0.0.65",
                              port=office)
    assert status == 200 and "subdomain" in json.loads(body), body
    assert request(stack, "GET", f"{PREFIX}/token", source="127.0.0.66", port=office)[0] == 401  # reached: no bearer
    _refused(stack, "127.0.0.128", office)
    assert request(stack, "GET", f"{PREFIX}/callback", source="127.0.0.128", port=office)[0] == 400
    assert reached_paths(stack, "127.0.0.128", 1) == ["callback"]


def test_the_console_works_from_the_office_over_tls(stack: Stack, office: int) -> None:
    """From an allowed address, through nginx over TLS: the console's sign-in form, then a session whose
    cookie is Secure (nginx says the browser came over HTTPS) and HttpOnly, then the dashboard."""
    def get(path: str, cookie: str = "") -> tuple[int, dict[str, str], bytes]:
        return request(stack, "GET", f"{PREFIX}/{path}", headers={"Cookie": cookie} if cookie else {},
                       source="127.0.0.65", port=office)

    status, headers, body = get("console")
    assert status == 200 and headers["content-type"].startswith("text/html"), body
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    login_cookie = headers["set-cookie"].split(";", 1)[0]
    assert "Secure" in headers["set-cookie"]
    csrf = body.decode().split('name="csrf" value="', 1)[1].split('"', 1)[0]
    form = urllib.parse.urlencode({"csrf": csrf, "token": stack.credentials.admin_token}).encode()
    status, headers, _ = request(stack, "POST", f"{PREFIX}/console/login", body=form, source="127.0.0.65",
                                 port=office, headers={"Cookie": login_cookie,
                                                       "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 303
    session = next(c for c in headers["set-cookie"].split(", ") if c.startswith("amo_console="))
    assert "Secure" in session and "HttpOnly" in session and "SameSite=Strict" in session
    status, _, body = get("console", session.split(";", 1)[0])
    assert status == 200 and b"/console/logout" in body
    assert stack.credentials.admin_token.encode() not in body


class _Echo(BaseHTTPRequestHandler):
    """An upstream that records the headers nginx sends it."""

    seen: ClassVar[dict[str, dict[str, list[str]]]] = {}

    def _answer(self) -> None:
        path = self.path.split("?", 1)[0]
        _Echo.seen[path] = {k.lower(): self.headers.get_all(k) or [] for k in set(self.headers.keys())}
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        return


def test_every_location_sets_the_forwarded_headers_not_appends(stack: Stack) -> None:
    """Each proxied location sends X-Forwarded-For = the peer (a forged one dropped), -Proto https, no Forwarded."""
    echo = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=echo.serve_forever, daemon=True)
    thread.start()
    paths = [f"{PREFIX}/{p}" for p in ("callback", "test", "disconnect", "exchange-api-key", "authorize",
                                        "token", "accounts", "proxy/api/v4/leads")]
    forged = {"X-Forwarded-For": "198.51.100.23", "Forwarded": "for=198.51.100.23", "X-Forwarded-Proto": "http"}

    def to_echo(site: str) -> str:
        site = allow("127.0.0.6")(site)
        return site.replace(f"server 127.0.0.1:{stack.gateway_port};", f"server 127.0.0.1:{echo.server_port};")

    try:
        with variant(stack, "header-probe", to_echo) as port:
            for path in paths:
                method = "POST" if path.endswith("exchange-api-key") else "GET"
                assert request(stack, method, path, headers=forged, source="127.0.0.6", port=port)[0] == 200, path
    finally:
        echo.shutdown()
        echo.server_close()
    for path in paths:
        seen = _Echo.seen[path]
        assert seen["x-forwarded-for"] == ["127.0.0.6"], path
        assert seen["x-forwarded-proto"] == ["https"], path
        assert "forwarded" not in seen, path


# What walked around the site's location rules (issue 9) and its relatives: encoded separators, any case;
# an encoded `%` (double encoding); dot segments; a raw backslash; encoded control characters. With the code
# of nginx's JSON 400: `bad_path` from the site's check, `bad_request` from nginx's own parser.
BAD_PATHS = [
    ("GET", f"{PREFIX}/proxy/api/v4/leads%2f..%2f..%2f..%2f..%2ftest", "bad_path"),
    ("POST", f"{PREFIX}/token%2F..%2Fcallback", "bad_path"),
    ("GET", f"{PREFIX}/proxy/api/v4/leads%5C..%5Caccount", "bad_path"),
    ("GET", f"{PREFIX}/proxy/api/v4/%2E%2e/account", "bad_path"),
    ("GET", f"{PREFIX}/proxy/api/v4/leads%252f..%252faccount", "bad_path"),
    ("GET", f"{PREFIX}/proxy/api/v4/leads/../account", "bad_path"),
    ("GET", f"{PREFIX}/proxy/api/v4/./leads", "bad_path"),
    ("GET", f"{PREFIX}/proxy/api/v4/leads/..?x=1", "bad_path"),
    ("GET", f"{PREFIX}/test/.", "bad_path"),
    ("GET", f"{PREFIX}/proxy/api/v4/leads\\account", "bad_path"),
    ("GET", f"{PREFIX}/proxy/api/v4/leads%00", "bad_request"),  # nginx's own parser refuses a NUL
    ("GET", f"{PREFIX}/proxy/api/v4/leads%0A", "bad_path"),
    ("GET", f"{PREFIX}/proxy/api/v4/leads%7f", "bad_path"),
]


def _raw_request_line(port: int, target: bytes, source: str) -> bytes:
    """Send one HTTP/1.1 request line as raw bytes (http.client refuses control characters); the answer."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as raw, \
            context.wrap_socket(raw) as tls:
        tls.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: " + SERVER_NAME.encode() + b"\r\nConnection: close\r\n\r\n")
        return tls.recv(4096)


def test_encoded_separators_get_400_and_never_reach_the_gateway(stack: Stack, office: int,
                                                               connected: dict[str, Any]) -> None:
    """Each bad path gets nginx's JSON 400 `bad_path`, from the internet and from the office alike, and not one
    is forwarded; a raw control character gets nginx's own 400. The same bytes in a query pass."""
    for port, source in ((stack.https_port, "127.0.0.7"), (office, "127.0.0.70")):
        for method, path, code in BAD_PATHS:
            status, headers, body = request(stack, method, path, headers=CONSUMER, source=source, port=port,
                                            body=b"{}" if method == "POST" else None)
            assert (status, headers["content-type"]) == (400, "application/json"), (path, status, body)
            assert json.loads(body)["error"] == code, (path, body)
        absolute = f"https://{SERVER_NAME}{BAD_PATHS[0][1]}"  # an absolute-form target is checked the same
        for target in (f"{PREFIX}/test\x01", f"{PREFIX}/proxy/api/v4/leads\x7f", absolute):
            assert _raw_request_line(port, target.encode(), source).startswith(b"HTTP/1.1 400 "), target
    status, _, _ = request(stack, "GET", f"{PREFIX}/test?x=%2f..%2F%5c%2e%00", source="127.0.0.7")
    assert status == 200
    status, _, _ = request(stack, "GET", f"{PREFIX}/proxy/api/v4/echo?query=a%2Fb%2e.", headers=CONSUMER,
                           source="127.0.0.70", port=office)
    assert status == 200
    assert reached_paths(stack, "127.0.0.7", 1) == ["test"]
    assert reached_paths(stack, "127.0.0.70", 1) == ["echo"]
