#!/usr/bin/env bash
# Installs the real servers the tests talk to, where this machine allows it.
# Dovecot (IMAP) comes from Debian's packages; without root or apt the IMAP
# tests skip and say why, the rest still run.
set -u
if command -v dovecot >/dev/null 2>&1; then
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
