#!/bin/bash
# PostgreSQL 17 with PoWA 5 for the tests, the demo (POWA=5) and the benchmarks.
#
# Debian 12 has no PoWA 5 package: build a Debian 13 (trixie) tree once, cached
# outside the checkout, whose programs run through chroot (collector/demo/sandbox.py).
# On a host that has PoWA 5 natively (Debian 13's postgresql-17-powa), nothing is built.
#
#   scripts/powa5-tree.sh [DIR]      (default: $POWA_FLEET_POWA5_TREE or
#                                     /var/cache/powa-fleet/trixie)
#
# The tree is built in a temporary directory beside DIR and renamed into place
# once complete, so an interrupted build never leaves a tree that looks usable.
set -euo pipefail

TREE=${1:-${POWA_FLEET_POWA5_TREE:-/var/cache/powa-fleet/trixie}}
PACKAGES=postgresql-17,postgresql-17-powa,postgresql-17-pg-stat-kcache,postgresql-17-pg-qualstats
CONTROL=usr/share/postgresql/17/extension/powa.control
SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)

has_powa5() {  # $1: a root directory ("" for the host)
    [ -x "$1/usr/lib/postgresql/17/bin/postgres" ] &&
        grep -qE "^default_version *= *'5\." "$1/$CONTROL" 2>/dev/null
}

if has_powa5 ""; then
    echo "PoWA 5 is installed on this host: no tree needed"
    exit 0
fi
if has_powa5 "$TREE"; then
    exit 0
fi

if ! command -v debootstrap >/dev/null; then
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends debootstrap
fi

parent=$(dirname "$TREE")
$SUDO mkdir -p "$parent"
building=$($SUDO mktemp -d "$parent/.$(basename "$TREE").XXXXXX")
trap '$SUDO rm -rf --one-file-system "$building"' EXIT
echo "building a Debian 13 tree with PoWA 5 in $TREE (about a minute, ~700 MB)"
$SUDO debootstrap --variant=minbase --include="$PACKAGES" trixie "$building" >/dev/null
has_powa5 "$building" || { echo "debootstrap gave no PoWA 5 in $building" >&2; exit 1; }
# the clusters' data directories are made under its /tmp
$SUDO chmod 1777 "$building/tmp"
# mktemp made it 0700: the clusters run as postgres inside it
$SUDO chmod 755 "$building"
# what is left of an unusable tree goes; one another run finished meanwhile wins
if [ -e "$TREE" ] && ! has_powa5 "$TREE"; then
    $SUDO rm -rf --one-file-system "$TREE"
fi
if $SUDO mv -T "$building" "$TREE" 2>/dev/null; then
    trap - EXIT
elif ! has_powa5 "$TREE"; then
    echo "cannot move the tree to $TREE" >&2
    exit 1
fi
echo "PoWA 5 tree ready in $TREE"
