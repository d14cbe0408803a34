#!/usr/bin/env bash
# Makes sure this machine can run haven's tests: Go, and a PostgreSQL server
# (initdb and pg_ctl) found the way internal/pgtest's BinDir finds it. As root
# it installs the server with apt-get; otherwise it says what to install.
set -euo pipefail

if ! command -v go >/dev/null 2>&1; then
	echo "ensure-postgres: 'go' not found on PATH: install Go (see go.mod for the version) from https://go.dev/dl/" >&2
	exit 1
fi

has_server() { [ -x "$1/initdb" ] && [ -x "$1/pg_ctl" ]; }

# Same order as pgtest.BinDir: pg_config --bindir, PATH, newest /usr/lib/postgresql/*/bin.
find_bindir() {
	local dir initdb
	if command -v pg_config >/dev/null 2>&1; then
		dir=$(pg_config --bindir 2>/dev/null || true)
		if [ -n "$dir" ] && has_server "$dir"; then echo "$dir"; return 0; fi
	fi
	if initdb=$(command -v initdb 2>/dev/null); then
		dir=$(dirname "$(readlink -f "$initdb")")
		if has_server "$dir"; then echo "$dir"; return 0; fi
	fi
	for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4,4nr); do
		if has_server "$dir"; then echo "$dir"; return 0; fi
	done
	return 1
}

if bindir=$(find_bindir); then
	if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
		echo "ensure-postgres: PostgreSQL is in $bindir, but tests run as root need a 'postgres' OS user to run it as:" >&2
		echo "  apt-get install postgresql   (creates it), or: useradd --system --home-dir /var/lib/postgresql postgres" >&2
		exit 1
	fi
	echo "ensure-postgres: using PostgreSQL server in $bindir"
	exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
	echo "ensure-postgres: no PostgreSQL server found (initdb, pg_ctl); the tests start throwaway clusters with it. Install it:" >&2
	echo "  sudo apt-get install postgresql" >&2
	exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
	echo "ensure-postgres: no PostgreSQL server found and no apt-get to install it: install the PostgreSQL server (initdb, pg_ctl) with your package manager" >&2
	exit 1
fi

echo "ensure-postgres: installing the PostgreSQL server with apt-get"
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y postgresql

# Debian creates and starts a cluster on port 5432; the tests don't use it.
if command -v pg_lsclusters >/dev/null 2>&1; then
	pg_lsclusters --no-header 2>/dev/null | while read -r version name _; do
		pg_ctlcluster "$version" "$name" stop >/dev/null 2>&1 || true
	done
fi
service postgresql stop >/dev/null 2>&1 || true

if ! bindir=$(find_bindir); then
	echo "ensure-postgres: installed postgresql, but initdb and pg_ctl are still not found" >&2
	exit 1
fi
echo "ensure-postgres: using PostgreSQL server in $bindir"
