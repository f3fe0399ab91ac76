"""A real systemd as PID 1 in fresh namespaces, for tests/test_systemd_real.py.

`unshare --pid --fork --mount --net --uts --ipc` starts a shell that first makes every place systemd or the
service may write private to the namespaces, then execs /lib/systemd/systemd:
- tmpfs on /tmp, /var/tmp, /run and /var/log/journal (at boot systemd-tmpfiles empties /tmp: without its own
  tmpfs it would empty the machine's), and overlays with a tmpfs upper layer on /etc, /opt and /var, so
  /etc/amo-gateway, /opt/amo-gateway and the service's /var/lib/private/amo-gateway exist only in there;
- the test's units directory bound over /etc/systemd/system, its work directory on /run/amo-test;
- /opt/amo-gateway is the cached VPS-style install: `.venv` built from Debian's /usr/bin/python3.
Commands reach it with `nsenter -t <its systemd> -a`. Teardown is `systemctl poweroff`, then SIGKILL to that
systemd (which takes every process of its PID namespace with it); unshare also gets SIGKILL if pytest dies.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.deploy_procs import ROOT

UNIT = "amo-gateway.service"
VENV_CACHE = ROOT / "var" / "systemd-venv"
WORK_MOUNT = "/run/amo-test"  # the test's work directory, inside the namespaces
NSENTER = shutil.which("nsenter") or "/usr/bin/nsenter"
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
SYSTEMD = "/lib/systemd/systemd"
DEBIAN_PYTHON = "/usr/bin/python3"
INNER_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
             "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}

BOOT_SCRIPT = r"""#!/bin/sh
# Runs inside the fresh namespaces: make everything systemd or the service may write private, then boot.
set -eu
work=$1 venv_root=$2 repo=$3
mount -t tmpfs -o mode=0755 tmpfs "$work/scratch"
for dir in etc opt var; do  # writes land in the scratch tmpfs, never in the machine's own /etc, /opt or /var
    mkdir "$work/scratch/$dir" "$work/scratch/$dir.work"
    mount -t overlay overlay -o "lowerdir=/$dir,upperdir=$work/scratch/$dir,workdir=$work/scratch/$dir.work" "/$dir"
done
mkdir -p /etc/amo-gateway /opt/amo-gateway
cp -a "$work/etc/." /etc/amo-gateway/
chmod 0700 /etc/amo-gateway
mount --bind "$venv_root" /opt/amo-gateway
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir /run/amo-test /run/amo-repo
mount --bind "$work" /run/amo-test  # before /tmp is covered: the work directory may live there
mount --bind "$repo" /run/amo-repo  # and so may the checkout (a CI clone): the sandbox helper runs from it
mount --bind "$work/units" /etc/systemd/system
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
mkdir -p "$repo"
mount --bind /run/amo-repo "$repo"  # back at its own path (a no-op where /tmp never hid it)
if [ -d /var/log/journal ]; then mount -t tmpfs -o mode=0755 tmpfs /var/log/journal; fi
exec env container=unshare /lib/systemd/systemd --system --unit=basic.target
"""

VENV_SCRIPT = r"""#!/bin/sh
# Build or update /opt/amo-gateway/.venv as on a VPS, in a private mount namespace (network still on).
set -eu
root=$1 src=$2 scratch=$3 fresh=$4
mount -t tmpfs -o mode=0755 tmpfs "$scratch"
mkdir "$scratch/opt" "$scratch/opt.work"
mount -t overlay overlay -o "lowerdir=/opt,upperdir=$scratch/opt,workdir=$scratch/opt.work" /opt
mkdir /opt/amo-gateway
mount --bind "$root" /opt/amo-gateway
if [ "$fresh" = 1 ]; then
    /usr/bin/python3 -m venv /opt/amo-gateway/.venv
    /opt/amo-gateway/.venv/bin/pip install --quiet "$src" setuptools wheel
else  # same dependencies (pyproject unchanged): only the project's own code, from the worktree
    /opt/amo-gateway/.venv/bin/pip install --quiet --no-deps --no-build-isolation --force-reinstall "$src"
fi
"""

# Stands in for LoadCredential= (see the drop-in's comment in tests/test_systemd_real.py): root copies each
# NAME:PATH into DIR, owned by DIR's owner (the unit's dynamic user), mode 0400, at every start of the unit.
LOAD_CREDENTIALS = r"""#!/bin/sh
set -eu
dir=$1
shift
owner=$(stat -c %u "$dir")
group=$(stat -c %g "$dir")
for spec in "$@"; do
    install -m 0400 -o "$owner" -g "$group" "${spec#*:}" "$dir/${spec%%:*}"
done
"""

# An HTTP client run inside the network namespace: prints status, headers and body as one JSON object.
HTTP_CLIENT = r"""import json, sys, urllib.error, urllib.request
method, url, headers, body = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect)
request = urllib.request.Request(url, data=body.encode() if body else None, method=method, headers=headers)
try:
    with opener.open(request, timeout=60) as resp:
        status, head, text = resp.status, dict(resp.headers), resp.read().decode()
except urllib.error.HTTPError as err:
    status, head, text = err.code, dict(err.headers), err.read().decode()
print(json.dumps({"status": status, "headers": head, "body": text}))
"""


def missing_prerequisites() -> str | None:
    """Why this machine cannot boot systemd in namespaces, or None when it can."""
    for tool in (UNSHARE, NSENTER, SYSTEMD, "/usr/bin/systemctl", "/usr/bin/systemd-run", "/usr/bin/journalctl"):
        if not os.access(tool, os.X_OK):
            return f"{tool} is missing (packages systemd, util-linux; `make test` installs them)"
    if shutil.which("ip") is None and not os.access("/usr/sbin/ip", os.X_OK):
        return "ip is missing (package iproute2; `make test` installs it)"
    if subprocess.run([DEBIAN_PYTHON, "-c", "import ensurepip, venv"], capture_output=True).returncode:
        return f"{DEBIAN_PYTHON} cannot make a virtualenv (package python3-venv; `make test` installs it)"
    if os.geteuid() != 0:
        return "booting systemd in namespaces needs root (mounts, PID namespace)"
    probe = subprocess.run([UNSHARE, "--pid", "--fork", "--mount", "--net", "true"], capture_output=True, text=True)
    if probe.returncode:
        return f"this machine cannot create namespaces: {probe.stderr.strip()}"
    return None


def _digest(paths: list[Path]) -> str:
    sha = hashlib.sha256()
    for path in paths:
        sha.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return sha.hexdigest()


def _project_files() -> list[Path]:
    """What `pip install .` installs: pyproject.toml and the package (bytecode left out)."""
    package = sorted(p for p in (ROOT / "amo_gateway").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return [ROOT / "pyproject.toml", *package]


@contextmanager
def _cache_lock() -> Iterator[None]:
    VENV_CACHE.mkdir(parents=True, exist_ok=True)
    with (VENV_CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs of one checkout build one venv, not two at once
        yield


def service_install(scratch: Path) -> Path:
    """The directory to mount as /opt/amo-gateway: a venv from Debian's python3 with this checkout installed.

    Cached in var/systemd-venv/<pyproject hash>: a new pyproject.toml builds a fresh venv (dependencies from
    PyPI); changed sources only reinstall the project itself (about a second).
    """
    root = VENV_CACHE / _digest([ROOT / "pyproject.toml"])[:16]
    stamp, wanted = root / ".venv" / ".amo-gateway-sources", _digest(_project_files())
    with _cache_lock():
        if stamp.is_file() and stamp.read_text(encoding="utf-8") == wanted:
            return root
        fresh = not (root / ".venv" / "bin" / "python").exists()
        if fresh:
            shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        _build_venv(root, scratch, fresh)
        stamp.write_text(wanted, encoding="utf-8")
        for other in VENV_CACHE.iterdir():
            if other.is_dir() and other != root:
                shutil.rmtree(other, ignore_errors=True)  # an older pyproject's venv
    return root


def _build_venv(root: Path, scratch: Path, fresh: bool) -> None:
    src = scratch / "src"
    src.mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copytree(ROOT / "amo_gateway", src / "amo_gateway", ignore=shutil.ignore_patterns("__pycache__"))
    (scratch / "mnt").mkdir()
    (scratch / "venv.sh").write_text(VENV_SCRIPT, encoding="utf-8")
    result = subprocess.run([UNSHARE, "--mount", "--propagation", "private", "sh", str(scratch / "venv.sh"),
                             str(root), str(src), str(scratch / "mnt"), "1" if fresh else "0"],
                            capture_output=True, text=True, timeout=600)
    if result.returncode:
        if fresh:
            shutil.rmtree(root, ignore_errors=True)  # never cache a half-built venv
        raise AssertionError(f"building the service's venv failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when pytest dies, so a killed run leaves no systemd behind."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


@dataclass
class Answer:
    """An HTTP answer from inside the namespaces."""

    status: int
    headers: dict[str, str]
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Machine:
    """systemd as PID 1 of fresh namespaces; `run` executes a command inside them."""

    work: Path
    unshare: subprocess.Popen[bytes]
    pid: int = 0
    helpers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @classmethod
    def boot(cls, work: Path, install: Path) -> Machine:
        """Start the namespaces and systemd; return once `systemctl is-system-running` says it is up."""
        (work / "scratch").mkdir(exist_ok=True)
        (work / "boot.sh").write_text(BOOT_SCRIPT, encoding="utf-8")
        (work / "http_client.py").write_text(HTTP_CLIENT, encoding="utf-8")
        with (work / "boot.log").open("wb") as log:
            popen = subprocess.Popen(
                [UNSHARE, "--pid", "--fork", "--kill-child", "--mount", "--propagation", "private", "--net",
                 "--uts", "--ipc", "--mount-proc", "sh", str(work / "boot.sh"), str(work), str(install), str(ROOT)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        machine = cls(work, popen)
        try:
            machine.pid = machine._systemd_pid()
            machine.wait_until("systemd to finish booting", machine._booted, 60)
            machine.run("ip", "link", "set", "lo", "up")  # a fresh network namespace starts with lo down
        except BaseException:
            machine.poweroff()
            raise
        return machine

    def _systemd_pid(self) -> int:
        children = Path(f"/proc/{self.unshare.pid}/task/{self.unshare.pid}/children")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.unshare.poll() is not None:
                raise AssertionError(f"the namespaces did not come up:\n{self.boot_log()}")
            with suppress(OSError):
                for pid in children.read_text().split():
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        return int(pid)
            time.sleep(0.05)
        raise AssertionError(f"no systemd in the namespaces after 20 s:\n{self.boot_log()}")

    def _booted(self) -> bool:
        state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
        return state in ("running", "degraded")

    def boot_log(self) -> str:
        return (self.work / "boot.log").read_text(encoding="utf-8", errors="replace")[-3000:]

    def run(self, *argv: str, check: bool = True, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run argv in all the namespaces (as root); raise with its output when `check` and it fails."""
        result = subprocess.run([NSENTER, "-t", str(self.pid), "-a", *argv], capture_output=True, text=True,
                                timeout=timeout, env={**INNER_ENV, **(env or {})})
        if check and result.returncode:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def show(self, prop: str, unit: str = UNIT) -> str:
        """One property of a unit (`systemctl show -p PROP --value`)."""
        return self.run("systemctl", "show", "-p", prop, "--value", unit).stdout.strip()

    def read_file(self, path: str) -> bytes:
        """A file as the namespaces see it."""
        result = subprocess.run([NSENTER, "-t", str(self.pid), "-a", "cat", path], capture_output=True, timeout=30,
                                env=INNER_ENV, check=True)
        return result.stdout

    def journal(self, unit: str = UNIT) -> list[dict[str, Any]]:
        """The unit's journal entries (`journalctl -u UNIT -o json`)."""
        out = self.run("journalctl", "-u", unit, "-o", "json", "--no-pager").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def http(self, method: str, url: str, headers: dict[str, str] | None = None, body: Any = None) -> Answer:
        """An HTTP request from inside the network namespace (loopback there is the gateway's)."""
        argv = self.http_argv(method, url, headers, body)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=90, env=INNER_ENV)
        if result.returncode:
            raise AssertionError(f"{method} {url} failed:\n{result.stderr[-2000:]}")
        answer = json.loads(result.stdout)
        return Answer(answer["status"], answer["headers"], answer["body"])

    def http_argv(self, method: str, url: str, headers: dict[str, str] | None = None, body: Any = None) -> list[str]:
        """The command `http` runs; start it with Popen for a request that should stay in flight."""
        all_headers = {**(headers or {}), **({"Content-Type": "application/json"} if body is not None else {})}
        return [NSENTER, "-t", str(self.pid), "-n", DEBIAN_PYTHON, "-I", str(self.work / "http_client.py"),
                method, url, json.dumps(all_headers), "" if body is None else json.dumps(body)]

    def start_helper(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """A long-lived process inside the namespaces, in its own session (setsid), output in work/<name>.log."""
        with (self.work / f"{name}.log").open("wb") as log:
            popen = subprocess.Popen([NSENTER, "-t", str(self.pid), "-a", "setsid", *argv], stdout=log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.helpers.append(popen)
        return popen

    def wait_until(self, what: str, check: Callable[[], bool], timeout: float) -> float:
        """Poll `check` every 100 ms; the seconds it took, or fail naming `what`."""
        start = time.monotonic()
        while not check():
            if self.unshare.poll() is not None:
                raise AssertionError(f"systemd exited while waiting for {what}:\n{self.boot_log()}")
            if time.monotonic() - start > timeout:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.1)
        return time.monotonic() - start

    def poweroff(self) -> None:
        """Stop the helpers, `systemctl poweroff`; SIGKILL to systemd (so to its whole PID namespace) if it lingers."""
        self._stop_helpers()
        if self.pid and self.unshare.poll() is None:
            with suppress(subprocess.SubprocessError, OSError):
                self.run("systemctl", "poweroff", "--no-block", check=False, timeout=10)
            with suppress(subprocess.TimeoutExpired):
                self.unshare.wait(30)
        if self.unshare.poll() is None:
            for pid in (self.pid, self.unshare.pid):
                with suppress(OSError):
                    if pid:
                        os.kill(pid, signal.SIGKILL)
            self.unshare.wait(10)

    def _stop_helpers(self) -> None:
        """Kill each helper, then its nsenter. Before the poweroff: systemd-shutdown SIGSTOPs every process of the
        namespace, nsenter (outside it, waiting with WUNTRACED) then stops itself and never reaps its killed
        child, and systemd-shutdown waits 90 s for that zombie."""
        for helper in self.helpers:
            with suppress(OSError):
                for child in Path(f"/proc/{helper.pid}/task/{helper.pid}/children").read_text().split():
                    os.kill(int(child), signal.SIGKILL)
            with suppress(subprocess.TimeoutExpired):
                helper.wait(5)
            with suppress(OSError):
                os.killpg(helper.pid, signal.SIGKILL)
            helper.wait(5)
        self.helpers.clear()


def python_for_helpers() -> dict[str, str]:
    """Environment for the sandbox helper: this checkout's package on the test interpreter's path."""
    return {**INNER_ENV, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


SANDBOX_PYTHON = sys.executable
