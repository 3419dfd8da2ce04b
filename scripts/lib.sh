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

# A Java runtime ≥ 17 for the Kafka broker: $JAVA_HOME, then `java` on PATH, then the JDKs
# under /usr/lib/jvm; otherwise Debian's openjdk-17-jre-headless is installed.
java_major() { # java-binary -> its feature version (17, 21, ...) or nothing
  "$1" -XshowSettings:properties -version 2>&1 |
    sed -n 's/^ *java.specification.version = \([0-9]*\).*/\1/p' | head -n 1
}
ensure_java() {
  if [ -n "${TANDEM_JAVA:-}" ] && [ -x "$TANDEM_JAVA" ]; then return; fi
  local candidate version
  for candidate in "${JAVA_HOME:+$JAVA_HOME/bin/java}" "$(command -v java || true)" /usr/lib/jvm/*/bin/java; do
    [ -n "$candidate" ] && [ -x "$candidate" ] || continue
    version="$(java_major "$candidate")"
    if [ -n "$version" ] && [ "$version" -ge 17 ]; then
      export TANDEM_JAVA="$candidate"
      return
    fi
  done
  apt_install openjdk-17-jre-headless
  export TANDEM_JAVA=/usr/lib/jvm/java-17-openjdk-amd64/bin/java
  [ -x "$TANDEM_JAVA" ] || TANDEM_JAVA="$(command -v java)"
}

# Apache Kafka's broker (the version Amazon MSK runs), as the Maven artifacts
# deploy/local/kafka/pom.xml names: resolved once with Maven into $TANDEM_CACHE/kafka/<version>
# (about 45 MB, under a minute) and reused while the pom is unchanged. Exports TANDEM_KAFKA_LIBS,
# the folder `java -cp "$TANDEM_KAFKA_LIBS/*" kafka.Kafka` runs from.
ensure_kafka() {
  ensure_java
  local root pom version dir stamp
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  pom="$root/deploy/local/kafka/pom.xml"
  version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")"
  dir="$TANDEM_CACHE/kafka/$version"
  stamp="$(sha256sum "$pom" | cut -c1-16)"
  if [ "$(cat "$dir/.pom-stamp" 2>/dev/null)" != "$stamp" ]; then
    have mvn || apt_install maven
    say "resolving Apache Kafka $version's broker jars with Maven into $dir (once)"
    rm -rf "$dir"
    mkdir -p "$dir"
    if ! mvn -q -B -f "$pom" dependency:copy-dependencies -DincludeScope=runtime \
         -DoutputDirectory="$dir/libs" -Dmaven.repo.local="$TANDEM_CACHE/m2" >"$dir/mvn.log" 2>&1; then
      tail -n 30 "$dir/mvn.log" >&2
      echo "Maven could not resolve Apache Kafka $version (log: $dir/mvn.log)" >&2
      exit 1
    fi
    echo "$stamp" >"$dir/.pom-stamp"
  fi
  export TANDEM_KAFKA_LIBS="$dir/libs"
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
