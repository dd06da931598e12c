#!/bin/sh
# Installs the system programs the test suite runs for real (Debian packages),
# when they are missing. CI runs as root on Debian; elsewhere sudo is tried,
# and without it the script says what to install and fails, so that no test
# silently skips for want of a component.
set -eu

# command  package
# node and npm: the JavaScript client's tests (npm installs their ws from tests/js).
NEEDED="chromium chromium redis-server redis-server redis-cli redis-tools node nodejs npm npm"

missing=""
set -- $NEEDED
while [ $# -ge 2 ]; do
    command -v "$1" >/dev/null 2>&1 || missing="$missing $2"
    shift 2
done
[ -z "$missing" ] && exit 0

echo "installing system packages:$missing" >&2
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "error: the tests need these Debian packages:$missing" >&2
    echo "       install them as root: apt-get update && apt-get install -y$missing" >&2
    exit 1
fi
$SUDO apt-get update -qq
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
