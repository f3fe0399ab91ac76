"""The console's words in English and Ukrainian, and the choice between them by Accept-Language."""

from __future__ import annotations

from typing import Final

LANGUAGES: Final = ("en", "uk")

_EN: Final[dict[str, str]] = {
    "title": "amo-gateway console",
    "subtitle": "amoCRM connection",
    "login_heading": "Sign in",
    "login_hint": "Paste the operator token (AMO_ADMIN_TOKEN). The session lasts {hours} h.",
    "token_label": "Operator token",
    "sign_in": "Sign in",
    "sign_out": "Sign out",
    "error_bad_token": "That is not the operator token.",
    "console_off": "The console is off: this gateway has no operator token (AMO_ADMIN_TOKEN).",
    "notice_session_expired": "Your session has ended. Sign in again.",
    "notice_logged_out": "Signed out.",
    "accounts": "Accounts",
    "no_accounts": "No amoCRM account is connected yet. Connect one with amoCRM's consent window, or with an "
                   "API key below.",
    "state_connected": "Connected",
    "state_attention": "Connected, check",
    "state_reauth_required": "Reconnect needed",
    "state_expired": "Token expired",
    "account_id": "Account",
    "host": "Host",
    "access_expires": "Access token expires",
    "refresh_age": "Refresh token age",
    "long_lived": "long-lived token, not refreshed",
    "last_error": "Last error",
    "why": "Why",
    "refreshing": "a refresh is in flight",
    "fix_hint": "Press Reconnect and allow access in amoCRM's window (sign in there as an account administrator).",
    "none": "none",
    "in": "in {span}",
    "ago": "{span} ago",
    "expired_at": "expired {when}",
    "days": "{n} d",
    "hours": "{n} h",
    "minutes": "{n} min",
    "connect": "Connect an account",
    "reconnect": "Reconnect",
    "forget": "Forget…",
    "forget_heading": "Forget this account?",
    "forget_text": "The tokens of {host} (account {account}) are deleted from the vault. amoCRM is not told; "
                   "the integration stays installed there. You can connect the account again at any time.",
    "forget_yes": "Yes, forget it",
    "cancel": "Cancel",
    "exchange_heading": "Connect with an API key",
    "exchange_hint": "amoCRM sends the code to the gateway's callback within seconds. One try per login every "
                     "5 minutes. The key is sent to amoCRM once and never stored.",
    "login_field": "amoCRM login (e-mail)",
    "api_key_field": "API key",
    "account_field": "Account host (optional, e.g. acme.amocrm.ru)",
    "exchange_submit": "Send the exchange request",
    "alerts": "Alerts sent",
    "no_alerts": "No alerts recorded.",
    "audit": "Recent audit events",
    "no_audit": "The audit trail is empty.",
    "col_time": "Time (UTC)",
    "col_event": "Event",
    "col_account": "Account",
    "col_reason": "Reason",
    "col_details": "Details",
    "col_delivery": "Delivery",
    "shown_at": "As of {when} UTC",
    "notice_connected": "Account {account} is connected.",
    "notice_exchange_requested": "Exchange requested: amoCRM calls back in a few seconds. This page refreshes "
                                 "by itself.",
    "notice_forgotten": "Account forgotten.",
    "notice_connect_failed": "The account was not connected: {detail}",
    "popup_ok": "Connected. This window closes by itself.",
    "popup_failed": "Not connected: {detail}. You can close this window.",
    "popup_blocked": "The browser blocked the amoCRM window: allow pop-ups for this site and press the button again.",
    "error_exchange_rate_limited": "amoCRM allows one exchange per login every 5 minutes. Try again later.",
    "error_upstream_rejected": "amoCRM refused the login or the API key.",
    "error_forbidden_by_amocrm": "amoCRM says this user may not do that (an administrator is needed).",
    "error_upstream_unavailable": "amoCRM could not be reached. Try again in a minute.",
    "error_upstream_rate_limited": "amoCRM asks to slow down. Try again in a minute.",
    "error_invalid_body": "Fill in the login and the API key.",
    "error_account_not_allowed": "That host is not an allowed amoCRM/Kommo account.",
    "error_not_found": "No such account.",
    "error_config_error": "The gateway is not configured for this (see its log).",
    "error_consent_denied": "the consent was declined in amoCRM",
    "error_invalid_state": "the link expired or was already used; press Reconnect again",
    "error_referer_refused": "amoCRM answered for an account this gateway does not serve",
    "error_other": "the request failed ({code})",
    "reason_token_revoked": "amoCRM revoked the tokens (the integration was reset or used elsewhere).",
    "reason_refresh_answer_lost": "A refresh was sent but its answer was lost (crash or timeout).",
    "reason_refresh_rejected": "amoCRM refused the refresh.",
    "reason_long_lived_expired": "The long-lived token has expired: import a new one.",
    "reason_expired": "The long-lived token has expired: import a new one.",
}

_UK: Final[dict[str, str]] = {
    "title": "Консоль amo-gateway",
    "subtitle": "з'єднання з amoCRM",
    "login_heading": "Вхід",
    "login_hint": "Вставте токен оператора (AMO_ADMIN_TOKEN). Сесія триває {hours} год.",
    "token_label": "Токен оператора",
    "sign_in": "Увійти",
    "sign_out": "Вийти",
    "error_bad_token": "Це не токен оператора.",
    "console_off": "Консоль вимкнена: у шлюзу немає токена оператора (AMO_ADMIN_TOKEN).",
    "notice_session_expired": "Сесія завершилася. Увійдіть знову.",
    "notice_logged_out": "Ви вийшли.",
    "accounts": "Акаунти",
    "no_accounts": "Жодного акаунта amoCRM ще не підключено. Підключіть його у вікні згоди amoCRM або за "
                   "API-ключем нижче.",
    "state_connected": "Підключено",
    "state_attention": "Підключено, перевірте",
    "state_reauth_required": "Потрібне перепідключення",
    "state_expired": "Токен прострочено",
    "account_id": "Акаунт",
    "host": "Адреса",
    "access_expires": "Access-токен спливає",
    "refresh_age": "Вік refresh-токена",
    "long_lived": "довгостроковий токен, не оновлюється",
    "last_error": "Остання помилка",
    "why": "Причина",
    "refreshing": "триває оновлення",
    "fix_hint": "Натисніть «Перепідключити» й дозвольте доступ у вікні amoCRM (увійдіть там як адміністратор "
                "акаунта).",
    "none": "немає",
    "in": "через {span}",
    "ago": "{span} тому",
    "expired_at": "сплив {when}",
    "days": "{n} дн",
    "hours": "{n} год",
    "minutes": "{n} хв",
    "connect": "Підключити акаунт",
    "reconnect": "Перепідключити",
    "forget": "Забути…",
    "forget_heading": "Забути цей акаунт?",
    "forget_text": "Токени {host} (акаунт {account}) буде видалено зі сховища. amoCRM про це не дізнається; "
                   "інтеграція там лишається встановленою. Акаунт можна підключити знову будь-коли.",
    "forget_yes": "Так, забути",
    "cancel": "Скасувати",
    "exchange_heading": "Підключити за API-ключем",
    "exchange_hint": "amoCRM надсилає код на callback шлюзу за кілька секунд. Одна спроба на логін раз на "
                     "5 хвилин. Ключ передається amoCRM один раз і ніде не зберігається.",
    "login_field": "Логін amoCRM (e-mail)",
    "api_key_field": "API-ключ",
    "account_field": "Адреса акаунта (необов'язково, напр. acme.amocrm.ru)",
    "exchange_submit": "Надіслати запит обміну",
    "alerts": "Надіслані сповіщення",
    "no_alerts": "Сповіщень не записано.",
    "audit": "Останні події аудиту",
    "no_audit": "Журнал аудиту порожній.",
    "col_time": "Час (UTC)",
    "col_event": "Подія",
    "col_account": "Акаунт",
    "col_reason": "Причина",
    "col_details": "Подробиці",
    "col_delivery": "Доставка",
    "shown_at": "Станом на {when} UTC",
    "notice_connected": "Акаунт {account} підключено.",
    "notice_exchange_requested": "Запит обміну надіслано: amoCRM відповість за кілька секунд. Сторінка "
                                 "оновиться сама.",
    "notice_forgotten": "Акаунт забуто.",
    "notice_connect_failed": "Акаунт не підключено: {detail}",
    "popup_ok": "Підключено. Це вікно закриється саме.",
    "popup_failed": "Не підключено: {detail}. Це вікно можна закрити.",
    "popup_blocked": "Браузер заблокував вікно amoCRM: дозвольте спливні вікна для цього сайту й натисніть "
                     "кнопку ще раз.",
    "error_exchange_rate_limited": "amoCRM дозволяє один обмін на логін раз на 5 хвилин. Спробуйте пізніше.",
    "error_upstream_rejected": "amoCRM відхилив логін або API-ключ.",
    "error_forbidden_by_amocrm": "amoCRM каже, що цьому користувачеві не можна (потрібен адміністратор).",
    "error_upstream_unavailable": "amoCRM недоступний. Спробуйте за хвилину.",
    "error_upstream_rate_limited": "amoCRM просить сповільнитися. Спробуйте за хвилину.",
    "error_invalid_body": "Заповніть логін і API-ключ.",
    "error_account_not_allowed": "Ця адреса не є дозволеним акаунтом amoCRM/Kommo.",
    "error_not_found": "Такого акаунта немає.",
    "error_config_error": "Шлюз для цього не налаштовано (див. його журнал).",
    "error_consent_denied": "у amoCRM відмовилися надати доступ",
    "error_invalid_state": "посилання сплило або вже використане; натисніть «Перепідключити» ще раз",
    "error_referer_refused": "amoCRM відповів за акаунт, який цей шлюз не обслуговує",
    "error_other": "запит не вдався ({code})",
    "reason_token_revoked": "amoCRM відкликав токени (інтеграцію скинуто або токен використано деінде).",
    "reason_refresh_answer_lost": "Запит оновлення надіслано, але відповідь втрачено (збій або тайм-аут).",
    "reason_refresh_rejected": "amoCRM відмовив в оновленні.",
    "reason_long_lived_expired": "Довгостроковий токен сплив: імпортуйте новий.",
    "reason_expired": "Довгостроковий токен сплив: імпортуйте новий.",
}

_TEXTS: Final = {"en": _EN, "uk": _UK}


class Texts:
    """The words of one language; `t(key, **values)` fills the placeholders."""

    def __init__(self, lang: str) -> None:
        self.lang = lang if lang in _TEXTS else "en"
        self._words = _TEXTS[self.lang]

    def t(self, key: str, **values: object) -> str:
        text = self._words.get(key) or _EN[key]
        return text.format(**values) if values else text

    def error(self, code: str) -> str:
        """A refusal's code in words; an unknown code is shown as itself (codes hold no secret)."""
        key = f"error_{code}"
        return self.t(key) if key in _EN else self.t("error_other", code=code)


def choose_language(header: str | None) -> str:
    """`uk` or `en` from an Accept-Language header, by q-value; anything else, or nothing, is English."""
    best, best_q = "en", 0.0
    for item in (header or "").split(",")[:32]:  # bounded: the header is the client's to make long
        tag, _, params = item.strip().partition(";")
        lang = tag.strip().lower().split("-")[0]
        q = _quality(params)
        if lang in _TEXTS and q > best_q:  # on a tie the language listed first wins
            best, best_q = lang, q
    return best


def _quality(params: str) -> float:
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.strip() == "q":
            try:
                return min(max(float(value), 0.0), 1.0)
            except ValueError:
                return 0.0
    return 1.0
