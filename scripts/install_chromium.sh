#!/usr/bin/env bash
# Debian's Chromium for the tests marked `browser` (the gallery page, driven by Playwright with this browser:
# Playwright's own browser download needs network). Installs only as root with apt-get; otherwise says in one
# line why not (those tests are then skipped).
set -u
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    echo "chromium: installed ($( (chromium --version || chromium-browser --version) 2>/dev/null | head -n 1))"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium: not installed and not root with apt-get: the browser tests will be skipped (apt-get install chromium)"
    exit 0
fi
start=$(date +%s)
if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/tmp/perpneg3d-chromium.log 2>&1 ||
   { DEBIAN_FRONTEND=noninteractive apt-get update -qq >>/tmp/perpneg3d-chromium.log 2>&1 &&
     DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >>/tmp/perpneg3d-chromium.log 2>&1; }; then
    echo "chromium: installed in $(( $(date +%s) - start )) s"
else
    echo "chromium: apt-get failed ($(tail -n 1 /tmp/perpneg3d-chromium.log)): the browser tests will be skipped"
fi
exit 0
