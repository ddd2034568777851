#!/usr/bin/env bash
# Installs the real servers (and the browser) the tests talk to, where this machine allows it.
# Dovecot (IMAP) comes from Debian's packages; without root or apt the IMAP
# tests skip and say why, the rest still run (under CI=true they fail instead:
# CI must run them).
set -u
# systemd-analyze checks the unit file in tests/test_systemd.py (Debian's systemd package).
if ! command -v systemd-analyze >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup-services: installing systemd for systemd-analyze verify"
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd \
      >/dev/null 2>&1 || echo "setup-services: could not install systemd; the unit check will be skipped"
  else
    echo "setup-services: no systemd-analyze; the unit check will be skipped"
  fi
fi
# Headless Chromium and its WebDriver render the HTML digest in tests/test_browser.py.
if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup-services: installing chromium and chromium-driver for the browser tests"
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      chromium chromium-driver fonts-liberation >/dev/null 2>&1 \
      || echo "setup-services: could not install chromium; the browser tests will be skipped"
  else
    echo "setup-services: no chromium/chromedriver; the browser tests will be skipped"
  fi
fi
if command -v dovecot >/dev/null 2>&1 || [ -x /usr/sbin/dovecot ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup-services: installing dovecot-imapd for the IMAP tests"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null 2>&1 || true
  if apt-get install -y -qq dovecot-imapd >/dev/null 2>&1; then
    # The package starts a system-wide instance; the tests run their own.
    (systemctl stop dovecot || service dovecot stop || pkill -x dovecot) >/dev/null 2>&1 || true
    exit 0
  fi
  echo "setup-services: could not install dovecot-imapd; IMAP tests will be skipped"
else
  echo "setup-services: not root or no apt-get; IMAP tests will be skipped unless dovecot is installed"
fi
exit 0
