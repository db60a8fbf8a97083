"""The reference push-approval app on the command line (SPEC A5).

    python -m clients.authenticator --state phone.json register 'https://idp.example.tw/push/register?code=...'
    python -m clients.authenticator --state phone.json otp        # the 6 digits for 儲存 and 【OTP 登入】
    python -m clients.authenticator --state phone.json watch      # wait for login requests, answer them
"""

from __future__ import annotations

import argparse
import sys

from .app import LONG_POLL, AppError, Authenticator


def _show(request: dict) -> None:
    print("登入請求 Login request")
    print(f"  應用 Application: {request['application']}")
    print(f"  帳號 Account:     {request['account']}")
    print(f"  本地時間 Time:    {request['time']}")
    print(f"  請點選登入頁面上顯示的數字 Pick the number the login page shows: {request['choices']}")


def _answer(app: Authenticator, request: dict) -> None:
    choices = {str(n): n for n in request["choices"]}
    picked = input("數字 Number (Enter: 拒絕 deny): ").strip()
    result = app.approve(request, choices[picked]) if picked in choices else app.deny(request)
    print({"approved": "已核准 Approved", "denied": "已拒絕 Denied",
           "wrong_number": "數字不符，請求已作廢 Wrong number: the request was cancelled"}[result])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.authenticator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", default="authenticator.json", help="the phone's state file (holds its private key)")
    commands = parser.add_subparsers(dest="command", required=True)
    register = commands.add_parser("register", help="register with the settings page's QR code URL")
    register.add_argument("url")
    commands.add_parser("otp", help="show the current 6-digit code")
    watch = commands.add_parser("watch", help="wait for login requests and answer them")
    watch.add_argument("--once", action="store_true", help="stop after one request")
    args = parser.parse_args(argv)

    app = Authenticator(args.state)
    try:
        if args.command == "register":
            answer = app.register(args.url)
            print(f"註冊成功 Registered: {answer['issuer_name']} ({answer['device'][:12]}…)")
            return 0
        if not app.registered:
            print("尚未註冊 Not registered: run `register URL` first", file=sys.stderr)
            return 1
        if args.command == "otp":
            print(app.otp())
            return 0
        while True:
            for request in app.pending(wait=LONG_POLL):
                _show(request)
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
