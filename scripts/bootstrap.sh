#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian machine for this project.
#
#   scripts/bootstrap.sh          what the provider and the demo need (the demo's
#                                 Google stand-in is oidc-provider: Node.js and
#                                 tests/e2e's npm packages)
#   scripts/bootstrap.sh --test   that, plus what the tests need (pytest extras
#                                 incl. playwright, Debian's Chromium for the
#                                 browser test)
#   scripts/bootstrap.sh --bench  that, plus what bench/run.py needs (Debian's
#                                 wrk, py-spy for its profiles, bench's npm
#                                 packages)
#
# Each step only runs when something is missing or out of date, so running it
# again is quick. Used by `make run` and `make test`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

with_test=0
with_bench=0
for arg in "$@"; do
  case "$arg" in
    --test) with_test=1 ;;
    --bench) with_test=1; with_bench=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "bootstrap.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

say() { echo "bootstrap: $*"; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  SUDO=(sudo)
fi

# --- Debian packages -------------------------------------------------------
pkgs=()
command -v redis-server >/dev/null 2>&1 || pkgs+=(redis-server)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || pkgs+=(postgresql)
if [ ! -x .venv/bin/python ] && ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  pkgs+=(python3-venv)
fi
if ! command -v node >/dev/null 2>&1; then
  pkgs+=(nodejs npm)
fi
# The browser test drives Debian's Chromium through the playwright package;
# never `playwright install` (it downloads its own browser).
if [ "$with_test" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  pkgs+=(chromium)
fi
# The certificate journeys sign with a SoftHSM2 token through the local signer
# (clients/hipki_signer); opensc brings pkcs11-tool for looking at tokens by hand.
if [ "$with_test" = 1 ] && ! command -v softhsm2-util >/dev/null 2>&1; then
  pkgs+=(softhsm2 opensc)
fi
# tests/test_deploy.py checks deploy/nginx/nginx.conf with the real `nginx -t`; the TLS
# client-certificate test runs it in front of the provider (deploy/nginx/client-cert.conf).
if [ "$with_test" = 1 ] && [ ! -x /usr/sbin/nginx ]; then
  pkgs+=(nginx)
fi
# ... and checks deploy/systemd/idp@.service with `systemd-analyze verify`.
if [ "$with_test" = 1 ] && ! command -v systemd-analyze >/dev/null 2>&1; then
  pkgs+=(systemd)
fi
if [ "$with_bench" = 1 ] && ! command -v wrk >/dev/null 2>&1; then
  pkgs+=(wrk)
fi

if [ "${#pkgs[@]}" -gt 0 ]; then
  say "installing Debian packages: ${pkgs[*]}"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi

# --- Python virtualenv -----------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  python3 -m venv .venv
fi

# Reinstall only when pyproject.toml changed since the last install (the
# install is editable, so source changes need none).
if [ "$with_bench" = 1 ]; then
  spec='.[test,bench]'; stamp=.venv/.bootstrap-installed-bench
elif [ "$with_test" = 1 ]; then
  spec='.[test]'; stamp=.venv/.bootstrap-installed-test
else
  spec='.'; stamp=.venv/.bootstrap-installed
fi
if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "pip install -e '$spec'"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
  touch "$stamp"
fi

# --- npm packages: the peer tests' and the demo's Google stand-in (tests/e2e);
# with --bench, the Redis client of the benchmark's oidc-provider (bench) ----
npm_dirs=(tests/e2e)
[ "$with_bench" = 1 ] && npm_dirs+=(bench)
for dir in "${npm_dirs[@]}"; do
  (
    cd "$dir"
    if [ ! -d node_modules ] || [ package-lock.json -nt node_modules ]; then
      say "npm ci in $dir"
      npm ci --no-audit --no-fund --loglevel=error
      touch node_modules  # npm ci may leave the dir's mtime as it was
    fi
  )
done

say "ok"
