#!/usr/bin/env bash
# Install Debian's Chromium for the frontend test (tests/comfy/server/test_comfy_frontend.py), which
# drives it through the `playwright` Python package (never `playwright install`: no
# browser downloads). Does nothing when /usr/bin/chromium exists; a failure (no apt, no
# root, no network) is reported and tolerated: the test then skips with the reason.
set -u

if [ -x /usr/bin/chromium ]; then
    echo "install_chromium: /usr/bin/chromium present"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium: no apt-get here; the frontend test will skip"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "install_chromium: not root and no sudo; the frontend test will skip"
        exit 0
    fi
fi
if $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium; then
    echo "install_chromium: installed $(/usr/bin/chromium --version 2>/dev/null)"
else
    echo "install_chromium: apt-get install chromium failed; the frontend test will skip"
fi
exit 0
