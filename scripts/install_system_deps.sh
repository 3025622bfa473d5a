#!/usr/bin/env bash
# Installs the Debian packages the test suite uses: Dovecot (IMAP) and Chromium (page tests).
set -euo pipefail
packages=(dovecot-imapd chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "mailsync: the tests need these Debian packages: ${missing[*]}" >&2
  echo "          run: sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
