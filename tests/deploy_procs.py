"""Helpers of the deployment tests: real processes (gateway, sandbox, nginx), a throwaway TLS certificate."""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = Path(__file__).resolve().parent.parent
CLIENT_ID = "2912780f-a1e4-4d5d-a069-ee01422d8bef"
LOGIN = "demo@example.com"
API_KEY = "sandbox-api-key-for-deploy-tests"


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for 127.0.0.1/localhost, made now and never committed."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "amo-gateway deploy test")])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


@dataclass
class Credentials:
    """The files the unit's LoadCredential= lines name, in a directory that plays $CREDENTIALS_DIRECTORY."""

    directory: Path
    client_secret: str = field(default_factory=lambda: secrets.token_hex(32))
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    def write(self) -> Path:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        files = {"vault-key": Fernet.generate_key().decode(), "client-secret": self.client_secret,
                 "admin-token": self.admin_token, "consumer-tokens": "crm-sync:consumer-secret-1"}
        for name, value in files.items():
            path = self.directory / name
            path.write_text(value + "\n", encoding="utf-8")
            path.chmod(0o600)
        return self.directory


class NotifySocket:
    """A stand-in for systemd's $NOTIFY_SOCKET: collects the datagrams the service sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, text: str, timeout: float) -> list[str]:
        """Block until a datagram holding `text` arrives; every message seen so far."""
        deadline = time.monotonic() + timeout
        while not any(text in m for m in self.messages):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {text!r} on the notify socket within {timeout}s: {self.messages}")
            self._sock.settimeout(remaining)
            try:
                self.messages.append(self._sock.recv(4096).decode())
            except TimeoutError:
                continue
        return list(self.messages)

    def close(self) -> None:
        self._sock.close()


def gateway_command() -> list[str]:
    """The console script the unit's ExecStart runs, from this virtualenv."""
    script = Path(sys.executable).with_name("amo-gateway")
    return [str(script), "serve"] if script.exists() else [sys.executable, "-m", "amo_gateway", "serve"]


def gateway_env(*, port: int, vault: Path, credentials: Path, redirect_uri: str, base_url: str,
                notify: Path | None = None, watchdog_usec: int | None = None) -> dict[str, str]:
    """Environment as the unit gives it: settings in AMO_*, secrets only in $CREDENTIALS_DIRECTORY."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMO_", "NOTIFY_", "WATCHDOG_"))}
    env.update({
        "AMO_CLIENT_ID": CLIENT_ID, "AMO_REDIRECT_URI": redirect_uri, "AMO_BASE_URL": base_url,
        "AMO_GATEWAY_HOST": "127.0.0.1", "AMO_GATEWAY_PORT": str(port), "AMO_VAULT_PATH": str(vault),
        "AMO_TEST_CACHE_SECONDS": "0", "AMO_SHUTDOWN_TIMEOUT": "5", "AMO_LOG_FORMAT": "json",
        "CREDENTIALS_DIRECTORY": str(credentials), "PYTHONUNBUFFERED": "1",
    })
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify)
    if watchdog_usec is not None:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    return env


def sandbox_command(port: int, client_secret: str, redirect_uri: str) -> list[str]:
    """The standalone sandbox (amoCRM's stand-in), whose callback goes to `redirect_uri`."""
    return [sys.executable, "-m", "amo_gateway.sandbox", "--port", str(port), "--client-id", CLIENT_ID,
            "--client-secret", client_secret, "--redirect-uri", redirect_uri, "--login", LOGIN,
            "--api-key", API_KEY, "--no-referer", "--callback-delay", "0.05"]


@dataclass
class Process:
    """A child process with its combined output in a file; stopped by SIGTERM, then SIGKILL."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> Process:
        with log.open("wb") as out:
            popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
        return cls(name, popen, log)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n{self.output()[-3000:]}")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; SIGKILL if it outstays `timeout`. The exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(5)


def wait_until(what: str, check: Callable[[], bool], timeout: float, alive: Process | None = None) -> None:
    """Poll `check` every 50 ms until true; fail naming `what` (and the dead process's output)."""
    deadline = time.monotonic() + timeout
    while not check():
        if alive is not None:
            alive.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False

