"""Settings: defaults < config.yaml < environment < command-line flags; a missing setting names its key.

Secrets are `SecretStr`, so `repr()` and validation errors never show them. systemd credentials
(`$CREDENTIALS_DIRECTORY/<name>`) fill a secret the environment left empty.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from amo_gateway.errors import ConfigError

PREFIX = "/api/v1/integrations/amo-crm"
DEFAULT_BASE_DOMAINS = ("amocrm.ru", "amocrm.com", "kommo.com")

# Field name -> environment variable, where it is not simply AMO_<FIELD>.
_ENV_OVERRIDES = {"host": "AMO_GATEWAY_HOST", "port": "AMO_GATEWAY_PORT"}
# Secrets that systemd may hand over as credential files, by file name.
CREDENTIAL_FILES = {
    "client_secret": "client-secret",
    "admin_token": "admin-token",
    "consumer_tokens": "consumer-tokens",
}  # the vault key is read by vault.load_keyring, which owns its own precedence
_LIST_FIELDS = {"trusted_proxies", "allowed_base_domains", "allowed_accounts"}


class Settings(BaseModel):
    """Every setting of the gateway; see the README's configuration table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: str | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    account_id: int | None = None
    api_domain: str | None = None
    redirect_uri: str | None = None
    base_url: str | None = None
    auth_url: str = "https://www.amocrm.ru/oauth"
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    vault_path: Path = Path("var/vault.enc")
    vault_key_file: Path | None = None
    vault_key: SecretStr | None = None
    admin_token: SecretStr | None = None
    consumer_tokens: SecretStr | None = None
    refresh_margin: int = Field(default=3600, ge=0)
    state_ttl: int = Field(default=1800, gt=0)
    exchange_interval: int = Field(default=300, ge=0)
    upstream_timeout: float = Field(default=10.0, gt=0)
    test_cache_seconds: float = Field(default=5.0, ge=0)
    rate_limit: int = Field(default=7, gt=0)
    proxy_queue: int = Field(default=100, gt=0)
    rate_guard: float = Field(default=0.1, ge=0)  # added to the 1 s window: network jitter moves arrivals
    proxy_timeout: float = Field(default=30.0, gt=0)
    proxy_retries: int = Field(default=2, ge=0)
    breaker_cooldown: float = Field(default=60.0, gt=0)
    idempotency_window: float = Field(default=3600.0, gt=0)
    trusted_proxies: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    allowed_base_domains: list[str] = Field(default_factory=lambda: list(DEFAULT_BASE_DOMAINS))
    allowed_accounts: list[str] = Field(default_factory=list)
    account_url_template: str = "https://{host}"
    any_account: bool = False
    widget_installs: bool = False
    shutdown_timeout: float = Field(default=20.0, gt=0)
    log_format: str = Field(default="json", pattern="^(json|logfmt)$")
    log_level: str = "INFO"
    max_body_bytes: int = Field(default=16 * 1024, gt=0)
    max_connections: int = Field(default=1024, gt=0)
    header_timeout: float = Field(default=10.0, gt=0)
    keepalive_timeout: float = Field(default=75.0, gt=0)  # longer than nginx's upstream keepalive_timeout (60 s)
    audit_max_bytes: int = Field(default=10 * 1024 * 1024, ge=4096)
    audit_backups: int = Field(default=5, ge=0)
    audit_merge_seconds: float = Field(default=60.0, ge=0)

    @field_validator("trusted_proxies", "allowed_base_domains", "allowed_accounts", mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def account_base_url(self) -> str | None:
        """The account host to call: AMO_BASE_URL, else https://{AMO_DOMAIN}."""
        if self.base_url:
            return self.base_url.rstrip("/")
        return f"https://{self.domain}" if self.domain else None

    def secret(self, name: str) -> str | None:
        """The plain value of a secret setting, for the one place that must send or compare it."""
        value = getattr(self, name)
        return value.get_secret_value() if isinstance(value, SecretStr) else None

    def require(self, *names: str) -> None:
        """Stop with a ConfigError naming every listed setting that is empty."""
        missing = [env_name(n) for n in names if getattr(self, n) in (None, "")]
        if "base_url" in names and self.account_base_url:
            missing = [m for m in missing if m != env_name("base_url")]
        if missing:
            raise ConfigError("missing setting: " + ", ".join(missing))


def env_name(field: str) -> str:
    """The environment variable that sets `field`."""
    return _ENV_OVERRIDES.get(field, "AMO_" + field.upper())


def load_settings(
    config_path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the layers and validate; unknown keys and bad values raise ConfigError naming them."""
    environ = os.environ if environ is None else environ
    layers: dict[str, Any] = {}
    if config_path is not None:
        layers.update(_read_yaml(config_path))
    layers.update(_from_environ(environ))
    layers.update({k: v for k, v in (overrides or {}).items() if v is not None})
    _fill_from_credentials(layers, environ)
    try:
        return Settings.model_validate(layers)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config file {path}: {type(err).__name__}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    return data


def _from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for field in Settings.model_fields:
        raw = environ.get(env_name(field))
        if raw is not None and raw != "":
            values[field] = raw
    return values


def _fill_from_credentials(layers: dict[str, Any], environ: Mapping[str, str]) -> None:
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return
    for field, filename in CREDENTIAL_FILES.items():
        path = Path(directory) / filename
        if field in layers or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8").strip()
        if field == "consumer_tokens":
            text = ",".join(line.strip() for line in text.splitlines() if line.strip())
        layers[field] = text


def _describe(err: ValidationError) -> str:
    parts = []
    for problem in err.errors():
        field = ".".join(str(p) for p in problem["loc"]) or "config"
        if problem["type"] == "extra_forbidden":
            parts.append(f"unknown setting {field!r}")
        else:
            parts.append(f"{field} ({env_name(str(problem['loc'][0]))}): {problem['msg']}")
    return "invalid configuration: " + "; ".join(parts)
