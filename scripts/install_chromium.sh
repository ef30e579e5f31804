#!/usr/bin/env bash
# Debian's chromium for the chat page's browser test (playwright drives it; it downloads no browser).
# Installed with apt when missing and run as root; otherwise the test is skipped with its reason.
set -u
for b in chromium chromium-browser google-chrome; do
    if command -v "$b" >/dev/null 2>&1; then
        echo "chromium: $(command -v "$b")"
        exit 0
    fi
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium (apt-get install chromium) for the chat page test"
    (apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 ||
     (apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends chromium >/dev/null 2>&1)) &&
        exit 0
    echo "warning: apt-get could not install chromium; the browser test will be skipped" >&2
else
    echo "warning: no chromium and no root apt-get; the browser test will be skipped" >&2
fi
exit 0
