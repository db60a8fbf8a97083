"""What the app says, in the provider's two languages: Traditional Chinese and English.

The command line takes ``--lang``, else the environment's language as POSIX reads it
(``LC_ALL``, then ``LC_MESSAGES``, then ``LANG``): ``zh…`` is Traditional Chinese,
anything else English. The provider's own messages come in the same language
(the app sends it as ``Accept-Language``).
"""

from __future__ import annotations

LANGUAGES = ("zh-TW", "en")

MESSAGES = {
    "zh-TW": {
        "login_request": "登入請求",
        "application": "  應用：{application}",
        "account": "  帳號：{account}",
        "time": "  本地時間：{time}",
        "pick": "  請點選登入頁面上顯示的數字：{choices}",
        "number": "數字（直接按 Enter：拒絕）：",
        "approved": "已核准",
        "denied": "已拒絕",
        "wrong_number": "數字不符，請求已作廢",
        "registered": "註冊成功：{issuer_name}（{device}…）",
        "not_registered": "尚未註冊：請先執行 `register URL`",
        "foreign_provider": "回應指向的身分認證服務不是 QR 碼上的那一個。",
        "not_json": "身分認證服務的回應（HTTP {status}）不是它的 JSON 答覆（可能是代理伺服器的錯誤頁），請稍後再試。",
        "unreachable": "無法連線到身分認證服務（{host}），請檢查網路後再試。",
    },
    "en": {
        "login_request": "Login request",
        "application": "  Application: {application}",
        "account": "  Account: {account}",
        "time": "  Local time: {time}",
        "pick": "  Pick the number the login page shows: {choices}",
        "number": "Number (Enter alone: deny): ",
        "approved": "Approved",
        "denied": "Denied",
        "wrong_number": "Wrong number: the request was cancelled",
        "registered": "Registered: {issuer_name} ({device}…)",
        "not_registered": "Not registered: run `register URL` first",
        "foreign_provider": "The reply names another provider than the QR code's.",
        "not_json": "The provider's reply (HTTP {status}) is not its JSON answer (a proxy's error page?): try again later.",
        "unreachable": "Cannot reach the provider ({host}): check the network and try again.",
    },
}


def language(environ) -> str:
    """The language of the first locale variable set, as POSIX orders them."""
    for name in ("LC_ALL", "LC_MESSAGES", "LANG"):
        if value := environ.get(name):
            return "zh-TW" if value.lower().startswith("zh") else "en"
    return "en"


def say(lang: str, key: str, /, **params) -> str:
    return MESSAGES[lang][key].format(**params)
