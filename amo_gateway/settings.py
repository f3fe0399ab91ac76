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
    "database_url": "database-url",
    "alert_webhook_secret": "alert-webhook-secret",
    "alert_telegram_bot_token": "alert-telegram-bot-token",
}  # the vault key is read by vault.load_keyring, which owns its own precedence
# Secret settings that must never sit in config.yaml, and where each belongs instead.
SECRET_HOMES = {
    "client_secret": "put it in the systemd credential file /etc/amo-gateway/client-secret "
                     "(LoadCredential=client-secret) or the environment variable AMO_CLIENT_SECRET",
    "admin_token": "put it in the systemd credential file /etc/amo-gateway/admin-token "
                   "(LoadCredential=admin-token) or the environment variable AMO_ADMIN_TOKEN",
    "vault_key": "put the key in a 0600 key file named by AMO_VAULT_KEY_FILE, or the systemd credential "
                 "/etc/amo-gateway/vault-key (LoadCredential=vault-key)",
    "consumer_tokens": "put them in the systemd credential file /etc/amo-gateway/consumer-tokens "
                       "(LoadCredential=consumer-tokens) or the environment variable AMO_CONSUMER_TOKENS",
    "database_url": "put it in the systemd credential file /etc/amo-gateway/database-url "
                    "(LoadCredential=database-url) or the environment variable AMO_DATABASE_URL",
    "alert_webhook_secret": "put it in the systemd credential file /etc/amo-gateway/alert-webhook-secret "
                            "(LoadCredential=alert-webhook-secret) or the environment variable "
                            "AMO_ALERT_WEBHOOK_SECRET",
    "alert_telegram_bot_token": "put it in the systemd credential file /etc/amo-gateway/alert-telegram-bot-token "
                                "(LoadCredential=alert-telegram-bot-token) or the environment variable "
                                "AMO_ALERT_TELEGRAM_BOT_TOKEN",
}
SECRET_SETTINGS = tuple(SECRET_HOMES)
_LIST_FIELDS = {"trusted_proxies", "allowed_base_domains", "allowed_accounts", "proxy_paths"}


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
    database_url: SecretStr | None = None  # postgresql://…: shared state in PostgreSQL instead of the vault file
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
    idempotency_max_bytes: int = Field(default=32 * 1024 * 1024, gt=0)  # remembered answers, all consumers
    proxy_paths: list[str] = Field(default_factory=lambda: ["/api/v4/"])  # what the proxy forwards (prefixes)
    proxy_refresh_interval: float = Field(default=300.0, ge=0)  # one 401-triggered refresh per account per this
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
    console_session_hours: float = Field(default=8.0, gt=0, le=720)  # the operator console's sign-in lifetime
    max_connections: int = Field(default=1024, gt=0)
    header_timeout: float = Field(default=10.0, gt=0)
    keepalive_timeout: float = Field(default=75.0, gt=0)  # longer than nginx's upstream keepalive_timeout (60 s)
    audit_max_bytes: int = Field(default=10 * 1024 * 1024, ge=4096)
    audit_backups: int = Field(default=5, ge=0)
    audit_merge_seconds: float = Field(default=60.0, ge=0)
    # Alerts (alerts.py, outbox.py, webhook.py): off unless a webhook URL or a Telegram chat is configured.
    alert_webhook_url: str | None = Field(default=None, pattern="^https?://")
    alert_webhook_secret: SecretStr | None = None
    alert_telegram_bot_token: SecretStr | None = None
    alert_telegram_chat_id: str | None = None
    alert_telegram_api_url: str = Field(default="https://api.telegram.org", pattern="^https?://")
    alert_reconnect_url: str | None = None  # a link for the `reconnect` hint (e.g. the operator console)
    alert_reminder_interval: float = Field(default=12 * 3600.0, gt=0)
    alert_transient_after: float = Field(default=1800.0, ge=0)  # refresh failing transiently this long: alert
    alert_check_interval: float = Field(default=10.0, gt=0)  # how often the alert state is derived again
    alert_outbox_max: int = Field(default=1000, gt=0)  # undelivered alerts kept; the oldest dropped beyond it
    alert_retry_max: float = Field(default=600.0, gt=0)  # the longest pause between delivery attempts
    alert_timeout: float = Field(default=10.0, gt=0)

    @field_validator("trusted_proxies", "allowed_base_domains", "allowed_accounts", "proxy_paths", mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("proxy_paths")
    @classmethod
    def _plain_prefixes(cls, value: list[str]) -> list[str]:
        """Each prefix is a literal path from the root ending in `/`, so `/api/v4` cannot also admit `/api/v4x`."""
        for prefix in value:
            segments = prefix.strip("/").split("/")
            if not prefix.startswith("/") or not prefix.endswith("/") or prefix == "/":
                raise ValueError(f"{prefix!r} must start and end with / and name a path, e.g. /api/v4/")
            if any(s in ("", ".", "..") or not s.isascii() or "%" in s or "\\" in s for s in segments):
                raise ValueError(f"{prefix!r} must be plain path segments (no empty, dot, encoded or non-ASCII ones)")
        return value

    @field_validator("database_url")
    @classmethod
    def _postgresql_url(cls, value: SecretStr | None) -> SecretStr | None:
        """Only PostgreSQL URLs: a typo must not silently fall back to the file vault."""
        if value is not None and not value.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql://user@host:port/database URL")
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

    @property
    def alerts_enabled(self) -> bool:
        """True when an alert target is configured (a webhook URL, or a Telegram bot token; an empty one is none)."""
        return bool(self.alert_webhook_url or self.secret("alert_telegram_bot_token"))

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
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or type(err).__name__}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read config file {path}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse config file {path}: {_yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    _refuse_secrets(path, data)
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's problem with its 1-based line and column (the message alone names neither)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or type(err).__name__
    if mark is None:
        return str(problem)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def _refuse_secrets(path: Path, data: dict[str, Any]) -> None:
    """A secret in config.yaml (often world-readable, often committed) stops start-up, naming where it belongs."""
    for key in SECRET_SETTINGS:
        if key in data:
            raise ConfigError(f"config file {path} holds the secret {key!r}: remove it from there; {SECRET_HOMES[key]}")


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
        text = None if field in layers else _read_credential(Path(directory) / filename)
        if not text:  # absent, or empty: not used (the unit loads every credential file, so unused ones are empty)
            continue
        if field == "consumer_tokens":
            text = ",".join(line.strip() for line in text.splitlines() if line.strip())
        layers[field] = text


def _read_credential(path: Path) -> str | None:
    """A credential file's text, None when absent; one that cannot be read is a ConfigError naming the file."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ConfigError(f"cannot read credential file {path}: {err.strerror or type(err).__name__}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read credential file {path}: not UTF-8 text") from None


def _describe(err: ValidationError) -> str:
    parts = []
    for problem in err.errors():
        field = ".".join(str(p) for p in problem["loc"]) or "config"
        if problem["type"] == "extra_forbidden":
            parts.append(f"unknown setting {field!r}")
        else:
            parts.append(f"{field} ({env_name(str(problem['loc'][0]))}): {problem['msg']}")
    return "invalid configuration: " + "; ".join(parts)
