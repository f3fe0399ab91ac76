"""The README's promises stay true: every setting and every CLI command is documented."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from amo_gateway.cli import _parser
from amo_gateway.settings import Settings, env_name
from tests.test_cli_operator import _env, _make_run

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
SITE = (ROOT / "nginx" / "amo-gateway.conf").read_text(encoding="utf-8")


def test_every_setting_has_a_row_in_the_configuration_table() -> None:
    """A new setting without documentation fails here."""
    missing = [env_name(f) for f in Settings.model_fields if f"| `{env_name(f)}` |" not in README]
    assert missing == []


def test_every_cli_command_is_documented() -> None:
    """Each `amo-gateway <command>` appears in the CLI section."""
    commands = _parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    missing = [c for c in commands if f"amo-gateway {c}" not in README]
    assert missing == []


def test_the_two_setup_commands_are_given() -> None:
    """make run and make test, as the brief promises."""
    assert "make run" in README and "make test" in README


def test_the_readme_shows_the_sites_one_allow_line_and_the_ssh_tunnel() -> None:
    """The commented allow line of the site's geo block is quoted verbatim, beside an SSH tunnel command."""
    geo = re.search(r"^geo \$amo_gateway_internal_allowed \{\n(.*?)^\}", SITE, re.M | re.S)
    assert geo is not None, "the site's geo block for the internal endpoints is gone"
    allow_lines = [line for line in geo.group(1).splitlines() if line.strip().startswith("#")]
    assert len(allow_lines) == 1, allow_lines
    assert allow_lines[0] in README.splitlines()
    assert "ssh -N -L 8080:127.0.0.1:8080 " in README


def test_readme_sections_named_by_the_shipped_files_exist() -> None:
    """Every `README.md, "Section"` reference in the nginx and systemd files names a real heading."""
    shipped = [*(ROOT / "nginx").iterdir(), *(ROOT / "systemd").iterdir()]
    named = {m for path in shipped for m in re.findall(r'README\.md, \\*"([^"\\]+)', path.read_text(encoding="utf-8"))}
    headings = {line.lstrip("#").strip() for line in README.splitlines() if line.startswith("#")}
    assert "Reaching the internal endpoints" in named
    assert {name for name in named if not any(h.startswith(name) for h in headings)} == set()


def _walkthrough() -> list[tuple[str, list[str]]]:
    """The walkthrough's bash block as (command, the `#>` lines it is shown to print)."""
    section = README[README.index("## Walkthrough"):README.index("## Швидкий старт")]
    block = section[section.index("```bash\n") + 8:section.index("\n```", section.index("```bash\n"))]
    steps: list[tuple[str, list[str]]] = []
    command: list[str] = []
    for line in block.splitlines():
        if line.startswith("#>"):
            steps[-1][1].append(line[2:].strip())
        elif line.startswith("#") or not line.strip():
            continue
        else:
            command.append(line)
            if not line.endswith("\\"):
                steps.append(("\n".join(command), []))
                command = []
    return steps


def _shape(expected: str) -> re.Pattern[str]:
    """A shown line as a pattern: `...` is anything, a number is any number, the rest literal."""
    parts = [re.escape(part) for part in expected.split("...")]
    pattern = ".*".join(re.sub(r"\d+", r"\\d+", part) for part in parts)
    return re.compile(pattern)


@pytest.mark.slow
def test_the_walkthrough_prints_what_the_readme_shows(tmp_path: Path) -> None:
    """The README's walkthrough block, run as pasted against `make run`'s set-up, prints the shapes it shows."""
    steps = _walkthrough()
    assert len(steps) >= 8 and sum(1 for _, shown in steps if shown) >= 7
    with _make_run(tmp_path) as port:
        marker = "@@step@@"
        script = "\n".join(f"{cmd}\necho {marker}" for cmd, _ in steps)
        script = script.replace("127.0.0.1:8081", f"127.0.0.1:{port + 1}")
        script = script.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              check=False, env=_env())
    outputs = done.stdout.split(f"{marker}\n")
    assert len(outputs) == len(steps) + 1, (done.stdout, done.stderr)
    for (command, shown), printed in zip(steps, outputs, strict=False):
        lines = [ln.rstrip("\r") for ln in printed.splitlines() if ln.strip()]
        assert len(lines) == len(shown), f"{command!r} printed {lines}, the README shows {shown}"
        for want, got in zip(shown, lines, strict=True):
            want = want.replace("127.0.0.1:8081", f"127.0.0.1:{port + 1}")
            assert _shape(want).fullmatch(got), f"{command!r}: printed {got!r}, the README shows {want!r}"
