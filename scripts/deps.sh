#!/bin/sh
# Installs the Debian packages the tests use, then proves each one by what the tests need of it (a capability,
# not only a binary on the PATH). Run by `make deps` (CI runs as root on a fresh machine; elsewhere sudo).
# Each line: a Debian package, then the probe that must succeed once it is installed.
set -u

PROBES='
nsd                      /usr/sbin/nsd -v
unbound                  /usr/sbin/unbound -V && command -v unbound-checkconf
swaks                    command -v swaks
libnet-ssleay-perl       swaks --support 2>&1 | grep -q "^=== TLS supported"
libio-socket-ssl-perl    perl -MIO::Socket::SSL -e 1
libio-socket-inet6-perl  swaks --support 2>&1 | grep -q "^=== IPv6 supported"
postfix                  test -x /usr/sbin/smtp-sink && test -x /usr/sbin/smtp-source && test -x /usr/sbin/postconf && test -x /usr/sbin/posttls-finger
iproute2                 command -v ss && command -v ip
util-linux               command -v setpriv
postgresql               ls /usr/lib/postgresql/*/bin/initdb && ls /usr/lib/postgresql/*/bin/pg_ctl
'

failing() {
    echo "$PROBES" | while read -r pkg probe; do
        [ -n "$pkg" ] || continue
        sh -c "$probe" >/dev/null 2>&1 || echo "$pkg"
    done
}

missing=$(failing | tr '\n' ' ')
[ -z "$missing" ] && exit 0

echo "installing Debian packages: $missing"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
$SUDO apt-get update -qq || exit 1
# shellcheck disable=SC2086  # one word per package
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null || exit 1

still=$(failing | tr '\n' ' ')
if [ -n "$still" ]; then
    echo "make deps: installed, but these still fail their probe (see scripts/deps.sh): $still" >&2
    exit 1
fi
