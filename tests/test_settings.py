"""Configuration layering and validation (settings.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from amo_gateway.errors import ConfigError
from amo_gateway.settings import load_settings


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    """config.yaml < environment < command-line flags."""
    path = tmp_path / "config.yaml"
    path.write_text("port: 1111\nhost: 127.0.0.2\nrefresh_margin: 10\n")
    settings = load_settings(path, environ={"AMO_GATEWAY_PORT": "2222", "AMO_REFRESH_MARGIN": "20"},
                             overrides={"port": 3333})
    assert (settings.host, settings.port, settings.refresh_margin) == ("127.0.0.2", 3333, 20)


def test_empty_mapping_config_accepted_when_environment_supplies_the_rest(tmp_path: Path) -> None:
    """`serve --config PATH` with a file that is just {}."""
    path = tmp_path / "config.yaml"
    path.write_text("{}\n")
    settings = load_settings(path, environ={"AMO_DOMAIN": "reforyou.amocrm.ru", "AMO_CLIENT_ID": "id"})
    assert settings.account_base_url == "https://reforyou.amocrm.ru"


def test_unknown_keys_are_refused_by_name(tmp_path: Path) -> None:
    """A typo in config.yaml is an error naming the key."""
    path = tmp_path / "config.yaml"
    path.write_text("refesh_margin: 5\n")
    with pytest.raises(ConfigError, match="unknown setting 'refesh_margin'"):
        load_settings(path, environ={})


def test_bad_value_names_the_environment_variable() -> None:
    """A wrong type says which setting and which variable."""
    with pytest.raises(ConfigError, match="AMO_GATEWAY_PORT"):
        load_settings(None, environ={"AMO_GATEWAY_PORT": "eighty"})


def test_missing_required_setting_is_named() -> None:
    """require() lists the environment names of what is missing."""
    settings = load_settings(None, environ={"AMO_CLIENT_ID": "id"})
    with pytest.raises(ConfigError, match=r"AMO_CLIENT_SECRET.*AMO_REDIRECT_URI"):
        settings.require("client_id", "client_secret", "redirect_uri")


def test_base_url_defaults_to_the_domain_and_can_be_overridden() -> None:
    """AMO_BASE_URL wins over https://{AMO_DOMAIN}."""
    env = {"AMO_DOMAIN": "reforyou.amocrm.ru", "AMO_BASE_URL": "http://127.0.0.1:9/"}
    assert load_settings(None, environ=env).account_base_url == "http://127.0.0.1:9"


def test_secrets_come_from_systemd_credentials_and_never_show_in_repr(tmp_path: Path) -> None:
    """$CREDENTIALS_DIRECTORY/client-secret fills the secret; repr() masks it."""
    (tmp_path / "client-secret").write_text("s3cr3t-value\n")
    (tmp_path / "consumer-tokens").write_text("crm:tok-1\nreports:tok-2\n")
    settings = load_settings(None, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert settings.secret("client_secret") == "s3cr3t-value"
    assert settings.secret("consumer_tokens") == "crm:tok-1,reports:tok-2"
    assert "s3cr3t" not in repr(settings)


def test_environment_beats_credentials_file(tmp_path: Path) -> None:
    """An explicit AMO_CLIENT_SECRET is not replaced by a credential file."""
    (tmp_path / "client-secret").write_text("from-file")
    settings = load_settings(None, environ={"CREDENTIALS_DIRECTORY": str(tmp_path), "AMO_CLIENT_SECRET": "env"})
    assert settings.secret("client_secret") == "env"


def test_an_empty_credential_file_means_the_setting_is_not_used(tmp_path: Path) -> None:
    """The unit loads every credential file; an empty database-url keeps the vault file, not a start-up error."""
    (tmp_path / "database-url").write_text("")
    (tmp_path / "client-secret").write_text("\n")
    settings = load_settings(None, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert settings.database_url is None and settings.client_secret is None
