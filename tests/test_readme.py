"""The README's promises stay true: every setting and every CLI command is documented."""

from __future__ import annotations

from pathlib import Path

from amo_gateway.cli import _parser
from amo_gateway.settings import Settings, env_name

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")


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
