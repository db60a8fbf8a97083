"""The reference push-approval app on the command line (SPEC A5).

    python -m clients.authenticator --state phone.json register 'https://idp.example.tw/push/register?code=...'
    python -m clients.authenticator --state phone.json otp        # the 6 digits for 儲存 and 【OTP 登入】
    python -m clients.authenticator --state phone.json watch      # wait for login requests, answer them

It speaks Traditional Chinese or English: --lang, else the environment's (LC_ALL, LC_MESSAGES, LANG).
"""

from __future__ import annotations

import argparse
import os
import sys

from .app import LONG_POLL, AppError, Authenticator
from .messages import LANGUAGES, language, say


def _show(app: Authenticator, request: dict) -> None:
    for key in ("login_request", "application", "account", "time", "pick"):
        print(say(app.lang, key, **request))


def _answer(app: Authenticator, request: dict) -> None:
    choices = {str(n): n for n in request["choices"]}
    picked = input(say(app.lang, "number")).strip()
    result = app.approve(request, choices[picked]) if picked in choices else app.deny(request)
    print(say(app.lang, result))  # approved, denied or wrong_number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.authenticator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", default="authenticator.json", help="the phone's state file (holds its private key)")
    parser.add_argument("--lang", choices=LANGUAGES, default=language(os.environ),
                        help="the language it speaks (default: from LC_ALL, LC_MESSAGES or LANG)")
    commands = parser.add_subparsers(dest="command", required=True)
    register = commands.add_parser("register", help="register with the settings page's QR code URL")
    register.add_argument("url")
    commands.add_parser("otp", help="show the current 6-digit code")
    watch = commands.add_parser("watch", help="wait for login requests and answer them")
    watch.add_argument("--once", action="store_true", help="stop after one request")
    args = parser.parse_args(argv)

    app = Authenticator(args.state, lang=args.lang)
    try:
        if args.command == "register":
            answer = app.register(args.url)
            print(say(app.lang, "registered", issuer_name=answer["issuer_name"], device=answer["device"][:12]))
            return 0
        if not app.registered:
            print(say(app.lang, "not_registered"), file=sys.stderr)
            return 1
        if args.command == "otp":
            print(app.otp())
            return 0
        while True:
            for request in app.pending(wait=LONG_POLL):
                _show(app, request)
                _answer(app, request)
                if args.once:
                    return 0
    except AppError as exc:
        print(exc.message or exc.code, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
