"""The README's promises stay true: every setting and every CLI command is documented."""

from __future__ import annotations

import re
from pathlib import Path

from amo_gateway.cli import _parser
from amo_gateway.settings import Settings, env_name

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
