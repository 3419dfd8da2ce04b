#!/usr/bin/env bash
# `make fuzz`: property-based fuzzing of the HTTP contract (docs/openapi.yaml) with schemathesis,
# against the real local system that `make up` runs (scripts/up.sh: PostgreSQL, Redis, the
# broker, both regions' services, the edge).
#
#   1. the Write API (region1 write, :8081): the `Write API` and `Operations` operations;
#   2. the Read API (region1 read, :8082): the `Read API` and `Operations` operations;
#   3. the edge (:8080), stateful only, for FUZZ_STATEFUL_SECONDS (300): chains of writes and
#      reads that follow the spec's OpenAPI links (PUT/POST -> GET/PATCH/DELETE/list of the same
#      document, DELETE -> GET, PUT), across both services as a client sees them;
#   4. replication survived it: every document written during the run reaches Region 2 at its
#      version or a newer one, and no event was dead-lettered in either region.
#
# 1 runs every phase (the spec's examples, coverage, fuzzing, stateful: the links between write
# operations), 2 every phase but stateful (no link joins two read operations), with every
# check, FUZZ_MAX_EXAMPLES (default 1000) examples per operation. Any failure (a 5xx, a
# response the spec does not describe, valid input refused, invalid input accepted, ...) makes
# the script exit non-zero; reports (JUnit, NDJSON) and logs go to .tandem/fuzz/.
#
# The stack uses the default state directory (.tandem/) and the ports scripts/up.sh uses (its
# environment overrides apply); the script refuses to start when something already listens on
# one of them (a `make up` running elsewhere), and stops everything it started on exit.
# Documents written by the run stay in .tandem/ (`make clean-local` removes them).
#
# Environment: FUZZ_MAX_EXAMPLES (1000), FUZZ_STATEFUL_SECONDS (300), FUZZ_WORKERS (1),
# FUZZ_SEED (random; schemathesis prints each run's seed, set it to replay that run) and
# FUZZ_START_TIMEOUT (seconds for `make up` to become ready, building included; 3600).
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
ROOT="$PWD"
STATE="$ROOT/.tandem"
OUT="$STATE/fuzz"
SPEC="$ROOT/docs/openapi.yaml"

SCHEMATHESIS_VERSION=4.32.5
MAX_EXAMPLES="${FUZZ_MAX_EXAMPLES:-1000}"
# One worker: schemathesis' workers are threads, and Hypothesis raises the recursion limit
# around each test; CPython 3.11 (Debian 12's) then fails an ast.parse running in another
# thread with "SystemError: AST constructor recursion depth mismatch" (CPython gh-106905).
WORKERS="${FUZZ_WORKERS:-1}"
START_TIMEOUT="${FUZZ_START_TIMEOUT:-3600}"
STATEFUL_SECONDS="${FUZZ_STATEFUL_SECONDS:-300}"

# schemathesis in its own virtualenv, cached outside the clone like the other Python tools.
ensure_schemathesis() {
  local venv="$TANDEM_CACHE/venv-fuzz"
  if [ "$("$venv/bin/schemathesis" --version 2>/dev/null)" != "schemathesis, version $SCHEMATHESIS_VERSION" ]; then
    say "installing schemathesis $SCHEMATHESIS_VERSION into $venv"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2 || {
      apt_install python3-venv
      rm -rf "$venv"
      python3 -m venv "$venv" >&2
    }
    "$venv/bin/pip" install -q --disable-pip-version-check --upgrade pip >&2
    "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION" >&2
  fi
  SCHEMATHESIS="$venv/bin/schemathesis"
}

listening() { (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The ports scripts/up.sh binds (same defaults, same overrides).
PORTS=("${EDGE_PORT:-8080}" "${WRITE1_PORT:-8081}" "${READ1_PORT:-8082}" "${READ2_PORT:-8083}"
       "${RELAY_PORT:-8084}" "${CONSUMER_PORT:-8085}" "${PG1_PORT:-55432}" "${PG2_PORT:-55433}"
       "${REDIS1_PORT:-56379}" "${REDIS2_PORT:-56380}" "${KAFKA_PORT:-59092}")
for port in "${PORTS[@]}"; do
  if listening "$port"; then
    echo "something already listens on 127.0.0.1:$port (a running \`make up\`?): stop it first;" \
         "make fuzz starts and stops its own stack in .tandem/" >&2
    exit 1
  fi
done

ensure_schemathesis
have psql || apt_install postgresql-client
mkdir -p "$OUT"

UP_PID=""
stop_stack() {
  local status=$?
  trap - EXIT INT TERM
  if [ -n "$UP_PID" ]; then
    say "stopping the local system"
    # up.sh runs in its own process group (set -m below): every process it started is in it,
    # cargo included while it still builds. TERM all of them (up.sh's trap stops its services
    # in order, in at most 3 x 30 s), wait, and KILL whatever is left after 120 s.
    kill -TERM -- "-$UP_PID" 2>/dev/null || true
    local deadline=$((SECONDS + 120))
    while pgrep -g "$UP_PID" >/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
    if pgrep -g "$UP_PID" >/dev/null; then
      echo "still running after 120 s, killed:" >&2
      pgrep -a -g "$UP_PID" >&2 || true
      kill -KILL -- "-$UP_PID" 2>/dev/null || true
      status=1
    fi
    wait "$UP_PID" 2>/dev/null || true
    for port in "${PORTS[@]}"; do
      if listening "$port"; then
        echo "127.0.0.1:$port is still open after the stack stopped" >&2
        status=1
      fi
    done
    pgrep -g "$UP_PID" >/dev/null || say "stopped; nothing left running"
  fi
  exit $status
}
trap stop_stack EXIT
trap 'exit 130' INT TERM

say "starting the local system (scripts/up.sh; output in .tandem/fuzz/up.log)"
touch "$OUT/.started"
set -m
bash scripts/up.sh >"$OUT/up.log" 2>&1 &
UP_PID=$!
set +m

# up.sh writes .tandem/stack.json (endpoints and a dev token) once everything is healthy.
deadline=$((SECONDS + START_TIMEOUT))
until [ "$STATE/stack.json" -nt "$OUT/.started" ] &&
      python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$STATE/stack.json" 2>/dev/null; do
  if ! kill -0 "$UP_PID" 2>/dev/null; then
    echo "make up exited before the system was ready; the end of its output:" >&2
    tail -n 40 "$OUT/up.log" >&2
    exit 1
  fi
  if [ $SECONDS -ge $deadline ]; then
    echo "the system was not ready after $START_TIMEOUT s; the end of make up's output:" >&2
    tail -n 40 "$OUT/up.log" >&2
    exit 1
  fi
  sleep 2
done
stack() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); [d := d[k] for k in sys.argv[2:]]; print(d)' "$STATE/stack.json" "$@"; }
export TANDEM_FUZZ_TOKEN="$(stack dev_token)"
EDGE="$(stack edge)"
WRITE="$(stack regions region1 write)"
READ="$(stack regions region1 read)"
READ2="$(stack regions region2 read)"
PG1="$(stack regions region1 postgres)"
PG2="$(stack regions region2 postgres)"
say "the system is up: write $WRITE, read $READ, edge $EDGE"

# Idempotency keys: schemathesis draws few distinct ones (often the spec's example), and the
# API rightly refuses one key for two different requests (422 idempotency-key-reused) and
# answers a repeated one with the original response without writing anything. Most generated
# writes would stop there (seen: 720 of 1,000 PATCHes), and a replayed DELETE (Hypothesis
# repeats a scenario's steps while it shrinks) looks to the stateful checks like a delete that
# left the document alive. This hook makes every valid key unique per call, so every write is
# a write and still goes through the idempotency record; reuse and replays are covered by the
# integration tests (tests/tests/api/). Invalid keys (negative tests) are left as drawn.
cat >"$OUT/hooks.py" <<'PY'
# Written by scripts/fuzz.sh on every run.
import re
import uuid

import schemathesis

VALID_KEY = re.compile(r"[ -~]{1,255}")


@schemathesis.hook
def before_call(context, case, kwargs):
    key = case.headers.get("Idempotency-Key") if case.headers else None
    if isinstance(key, str) and VALID_KEY.fullmatch(key):
        case.headers["Idempotency-Key"] = f"{key[:222]}#{uuid.uuid4().hex}"  # at most 255
PY

# What the checks expect beyond schemathesis' defaults; every exception is explained.
cat >"$OUT/schemathesis.toml" <<TOML
# Written by scripts/fuzz.sh on every run.
hooks = "$OUT/hooks.py"

# The dev token, for the spec's bearerAuth scheme (not a fixed -H header, so that the checks
# can leave it out or spoil it: ignored_auth, missing_required_header).
[auth.openapi.bearerAuth]
bearer = "\${TANDEM_FUZZ_TOKEN}"

[generation]
# Failing examples are replayed first on the next run.
database = "$OUT/examples"

# Valid input must be accepted: 2xx/3xx, or the refusals that depend on state rather than on
# the input's shape (schemathesis' defaults: 401, 403, 404, 409, 429; 5xx is judged by
# not_a_server_error). Additionally:
[[operations]]
include-tag = "Write API"
# 412: If-Match / If-None-Match are any string by the spec; whether one holds depends on the
#      stored version.
# 422, 413, 400: the body is a free-form object, and its documented limits are not expressible
#      in its JSON Schema without a recursive schema no client generator wants: U+0000 in a
#      string (422 unstorable-value), more than 64 levels (422 too-deep), a body within 256 KiB
#      whose stored form, numbers written out in full, exceeds 512 KiB (413), an integer beyond
#      the double range (400 malformed-json).
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "412", "413", "422", "429", "5xx"]

[[operations]]
include-tag = "Read API"
# 400: X-Consistency-Token and the after cursor are opaque values the server issued (a write,
#      a previous page); any other string of the right shape is documented as 400.
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"]
TOML

# Every check: not_a_server_error (no 5xx), status_code_conformance, content_type_conformance,
# response_headers_conformance and response_schema_conformance (the spec describes every
# response), negative_data_rejection, positive_data_acceptance, missing_required_header,
# unsupported_method, use_after_free, ensure_resource_availability, ignored_auth,
# object_level_authorization, except one:
# - allow_header_conformance wants the Allow header of an OPTIONS response to list every
#   method the spec declares on the path. Here one path is served by two services (PUT, PATCH,
#   DELETE by the Write API; GET, HEAD by the Read API, see x-tandem-service), and each
#   service's Allow lists what that service supports, as the spec documents (RFC 9110 §10.2.1:
#   the methods the target resource supports on this origin). unsupported_method still checks
#   that every undeclared method is 405 with an Allow header.
CHECKS=(--checks all --exclude-checks allow_header_conformance)

REPORTS=()
failed=()
run() { # name url [schemathesis options...]
  local name="$1" url="$2"
  shift 2
  say "schemathesis: $name ($url); log in .tandem/fuzz/$name.log"
  mkdir -p "$OUT/$name"
  local started=$SECONDS
  # From .tandem/fuzz, so that schemathesis' own state directories land there.
  if (cd "$OUT" && "$SCHEMATHESIS" --config-file "$OUT/schemathesis.toml" run "$SPEC" \
        --url "$url" "${CHECKS[@]}" \
        --max-examples "$MAX_EXAMPLES" --workers "$WORKERS" --continue-on-failure \
        --request-timeout 30 ${FUZZ_SEED:+--seed "$FUZZ_SEED"} --no-color \
        --report junit,ndjson --report-dir "$OUT/$name" "$@") 2>&1 | tee "$OUT/$name.log"; then
    REPORTS+=("$name: passed in $((SECONDS - started)) s")
  else
    REPORTS+=("$name: FAILED after $((SECONDS - started)) s (see .tandem/fuzz/$name.log)")
    failed+=("$name")
  fi
}

psql1() { psql "$PG1" -X -q -v ON_ERROR_STOP=1 -tA "$@"; }
psql2() { psql "$PG2" -X -q -v ON_ERROR_STOP=1 -tA "$@"; }
FUZZ_START="$(psql1 -c 'SELECT now()')"
DEAD1_BEFORE="$(psql1 -c 'SELECT count(*) FROM relay_dead_letters')"
DEAD2_BEFORE="$(psql2 -c 'SELECT count(*) FROM dead_letters')"
RUN_STARTED=$SECONDS

run write "$WRITE" --include-tag "Write API" --include-tag Operations
run read "$READ" --include-tag "Read API" --include-tag Operations --phases examples,coverage,fuzzing
# A time budget rather than a count: schemathesis repeats the stateful phase until it is spent.
run edge-stateful "$EDGE" --include-tag "Write API" --include-tag "Read API" --phases stateful \
  --max-time "$STATEFUL_SECONDS"

# Replication survived whatever was written: Region 2 holds every document written during the
# run at its version or a newer one, and nothing was dead-lettered on the way.
say "checking that Region 2 caught up with every document written during the run"
psql1 -c "\\copy (SELECT collection, id, version FROM documents WHERE updated_at >= '$FUZZ_START') TO '$OUT/region1-written.csv' CSV"
written="$(wc -l <"$OUT/region1-written.csv")"
behind=""
deadline=$((SECONDS + 120))
while :; do
  behind="$(psql2 -c 'CREATE TEMP TABLE written (collection text, id text, version bigint)' \
    -c "\\copy written FROM '$OUT/region1-written.csv' CSV" \
    -c 'SELECT count(*) FROM written w LEFT JOIN documents d ON d.collection = w.collection AND d.id = w.id WHERE d.version IS NULL OR d.version < w.version')"
  [ "$behind" = 0 ] || [ $SECONDS -ge $deadline ] && break
  sleep 2
done
dead1=$(( $(psql1 -c 'SELECT count(*) FROM relay_dead_letters') - DEAD1_BEFORE ))
dead2=$(( $(psql2 -c 'SELECT count(*) FROM dead_letters') - DEAD2_BEFORE ))
if [ "$behind" = 0 ] && [ "$dead1" = 0 ] && [ "$dead2" = 0 ]; then
  REPORTS+=("replication: all $written documents written during the run reached Region 2 ($READ2); no dead letters")
else
  REPORTS+=("replication: FAILED: $behind of $written documents missing or older in Region 2 after 120 s; $dead1 new dead letters in Region 1 (relay_dead_letters), $dead2 in Region 2 (dead_letters)")
  failed+=(replication)
fi

say "fuzzing finished in $((SECONDS - RUN_STARTED)) s"
printf '  %s\n' "${REPORTS[@]}" >&2
if [ ${#failed[@]} -gt 0 ]; then
  echo "make fuzz FAILED: ${failed[*]}" >&2
  exit 1
fi
say "make fuzz passed"
