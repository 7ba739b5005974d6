#!/usr/bin/env bash
# Debian's chromium for tests/test_index_browser.py. Playwright drives this system browser
# (executable_path), so nothing is downloaded but the Debian package. Idempotent and quiet:
# it does nothing when chromium is already installed, and prints apt's log only on failure.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
log="$(mktemp)"
trap 'rm -f "$log"' EXIT

install() {
    $SUDO apt-get update -qq >>"$log" 2>&1 &&
        $SUDO apt-get install -y -qq chromium >>"$log" 2>&1
}

# One retry: a mirror hiccup should not fail CI.
if ! install && ! { sleep 5; install; }; then
    echo "install-browser: apt-get could not install chromium:" >&2
    tail -n 40 "$log" >&2
    exit 1
fi
command -v chromium >/dev/null 2>&1 || { echo "install-browser: chromium missing after install" >&2; exit 1; }
