#!/usr/bin/env bash
# Shared helpers for the Makefile's scripts: install or locate everything Tandem needs on a
# fresh Debian machine, saying what happens while it happens. Tools that are slow to build are
# cached outside the clone, in $TANDEM_CACHE (default ~/.cache/tandem), and reused.

set -euo pipefail

TANDEM_CACHE="${TANDEM_CACHE:-$HOME/.cache/tandem}"
export TANDEM_CACHE
mkdir -p "$TANDEM_CACHE"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

have() { command -v "$1" >/dev/null 2>&1; }

apt_install() {
  say "installing Debian packages: $*"
  if [ -z "${TANDEM_APT_UPDATED:-}" ]; then
    apt-get update -qq >&2
    export TANDEM_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# PostgreSQL server programs (initdb, postgres), redis-server, HAProxy (the local edge), and
# what librdkafka's build needs (a C toolchain, OpenSSL headers, pkg-config).
ensure_servers() {
  local missing=()
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
  have redis-server || missing+=(redis-server)
  have haproxy || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
  have setpriv || missing+=(util-linux)
  have curl || missing+=(curl)
  have cc || missing+=(build-essential)
  have pkg-config || missing+=(pkg-config)
  dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
  if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
  fi
}

# tansu, a Kafka-protocol broker in Rust (no JVM Kafka can be fetched here). Its build takes
# about ten minutes on two cores, so it is built once into $TANDEM_CACHE/tools and reused; one
# already on PATH is used as is.
TANSU_VERSION=0.6.0
ensure_tansu() {
  if [ -n "${TANDEM_TANSU:-}" ] && [ -x "$TANDEM_TANSU" ]; then return; fi
  local cached="$TANDEM_CACHE/tools/bin/tansu"
  if [ -x "$cached" ]; then
    export TANDEM_TANSU="$cached"
  elif have tansu; then
    export TANDEM_TANSU="$(command -v tansu)"
  else
    say "building the tansu $TANSU_VERSION Kafka-protocol broker into $TANDEM_CACHE/tools (about 10 minutes, once)"
    cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore \
      --root "$TANDEM_CACHE/tools" >&2
    export TANDEM_TANSU="$cached"
  fi
}

pg_bindir() {
  ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1
}

# A Python virtualenv with the test tools (moto's Secrets Manager emulator).
ensure_python_tools() {
  local venv="$TANDEM_CACHE/venv"
  if [ ! -x "$venv/bin/moto_server" ]; then
    say "creating $venv and installing moto[server] (Secrets Manager emulator)"
    python3 -m venv "$venv" >&2 || { apt_install python3-venv; python3 -m venv "$venv" >&2; }
    "$venv/bin/pip" install -q --upgrade pip >&2
    "$venv/bin/pip" install -q 'moto[server]==5.1.*' >&2
  fi
  export TANDEM_MOTO_SERVER="$venv/bin/moto_server"
}

# Rust toolchain: this machine kind ships one; fail clearly otherwise.
ensure_rust() {
  if ! have cargo; then
    echo "cargo is not on PATH: install Rust (https://rustup.rs) and retry" >&2
    exit 1
  fi
}
