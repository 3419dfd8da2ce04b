#!/usr/bin/env bash
# `make up`: builds Tandem and runs the local system on loopback, in the foreground.
# Data lives in .tandem/ (kept between runs); Ctrl-C or SIGTERM stops everything cleanly.
#
# A small supervisor: every process (PostgreSQL, Redis, the broker, the services, HAProxy) runs
# under its own supervisor loop. A process that exits once the stack is up is restarted after
# 1 s, 2 s, 4 s ... (at most 30 s; back to 1 s once it stayed up for 60 s), with one line on the
# terminal, and the rest keeps running: `pkill -9 -f tandem-region2-consumer` is a fair way to
# watch the system recover. A stopped process (SIGSTOP) is not an exit and is left alone. While
# the stack starts, anything that exits or does not become ready in time (30 s for PostgreSQL,
# Redis and HAProxy, 60 s for the broker and a service) stops everything with its log's last lines
# and a non-zero status. .tandem/stack.json exists only while the whole stack is up.
#
# Besides the ports below, two knobs let a second stack run beside a developer's (the test of
# this script, tests/tests/up/, uses both):
#   TANDEM_STATE_DIR  the state directory (default .tandem in the clone)
#   TANDEM_BIN_DIR    run the binaries already built in this directory (target/debug, say)
#                     instead of building the `up` profile (target/up) first
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
ROOT="$PWD"
STATE="${TANDEM_STATE_DIR:-$ROOT/.tandem}"
mkdir -p "$STATE/logs"
STATE="$(cd "$STATE" && pwd)"
SHOWN="${STATE#"$ROOT"/}" # the state directory as messages name it: .tandem by default
RUN="$STATE/run"           # this run's pid files and supervisor flags

# Ports (override any of them from the environment).
EDGE_PORT="${EDGE_PORT:-8080}"
WRITE1_PORT="${WRITE1_PORT:-8081}"
READ1_PORT="${READ1_PORT:-8082}"
READ2_PORT="${READ2_PORT:-8083}"
RELAY_PORT="${RELAY_PORT:-8084}"
CONSUMER_PORT="${CONSUMER_PORT:-8085}"
WRITE2_PORT="${WRITE2_PORT:-8086}"
RELAY2_PORT="${RELAY2_PORT:-8087}"
CONSUMER1_PORT="${CONSUMER1_PORT:-8088}"
PG1_PORT="${PG1_PORT:-55432}"
PG2_PORT="${PG2_PORT:-55433}"
REDIS1_PORT="${REDIS1_PORT:-56379}"
REDIS2_PORT="${REDIS2_PORT:-56380}"
KAFKA_PORT="${KAFKA_PORT:-59092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-59093}"
# The published development secret (shared/http/src/auth.rs, DEV_HS256_SECRET): the services accept
# it only in development mode, which every service started here runs in.
DEV_SECRET="${TANDEM_JWT_HS256_SECRET:-tandem-local-development-secret-v2}"
export TANDEM_DEV_MODE=true

DEPENDENCY_TIMEOUT=30 # seconds for PostgreSQL, Redis, HAProxy to become ready
KAFKA_TIMEOUT=60      # seconds for the broker (a JVM: formatting and start take a few)
SERVICE_TIMEOUT=60    # seconds for a service's /healthz to answer on its first start
STOP_TIMEOUT=30       # seconds a group of processes gets to stop before SIGKILL
BACKOFF_MAX=30        # longest pause before a restart
STABLE_AFTER=60       # a process up this long restarts after 1 s again

listening() { (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Something already on one of our ports (a `make up` running elsewhere, a leftover process)
# would answer our readiness checks in place of ours: refuse to start (checked again after the
# build, which can take minutes).
check_ports_free() {
  local entry name variable port
  for entry in "edge EDGE_PORT" "write1 WRITE1_PORT" "read1 READ1_PORT" "read2 READ2_PORT" \
               "relay1 RELAY_PORT" "consumer2 CONSUMER_PORT" "write2 WRITE2_PORT" \
               "relay2 RELAY2_PORT" "consumer1 CONSUMER1_PORT" "pg1 PG1_PORT" "pg2 PG2_PORT" \
               "redis1 REDIS1_PORT" "redis2 REDIS2_PORT" "kafka KAFKA_PORT" \
               "kafka-controller KAFKA_CONTROLLER_PORT"; do
    name="${entry% *}" variable="${entry#* }"
    port="${!variable}"
    if listening "$port"; then
      echo "up.sh: 127.0.0.1:$port ($name) is already in use: is another \`make up\` running?" \
           "(ss -ltnp 'sport = :$port' shows what listens); stop it, or set $variable to a free port" >&2
      exit 1
    fi
  done
}
check_ports_free
# Nothing listens: a .tandem/stack.json is a previous run's, and tools waiting for this run's
# must not take it for the real thing. (Only now: a running stack's file is not ours to remove.)
rm -f "$STATE/stack.json"

ensure_servers
ensure_kafka
PG_BIN="$(pg_bindir)"

# ---------------------------------------------------------------------------------------------
# Supervision. Each process runs under `supervise`, a background subshell that starts it (the
# pid it records is the process itself: everything started is a simple command or an exec), waits
# for it and, once up.sh marked it up ($RUN/NAME.up), restarts it with backoff. An exit before
# that is written to $RUN/NAME.exit for up.sh to report, and the supervisor ends.

declare -A SUP=()     # name -> supervisor pid
declare -A STOP_SIG=() # name -> the signal that stops the process cleanly
STATUS=0
OWN_STACK=0 # set once the ports were found free after the build: $STATE/stack.json is ours

supervise() { # name stop-signal command...
  local name="$1" sig="$2"
  shift 2
  local log="$STATE/logs/$name.log" stopping=0 child status started delay=1 i
  set +e
  trap 'stopping=1' TERM INT HUP
  stop_requested() { [ "$stopping" = 1 ] || [ -e "$RUN/stopping" ]; }
  : >"$log"
  while ! stop_requested; do
    started=$SECONDS
    "$@" >>"$log" 2>&1 &
    child=$!
    echo "$child" >"$RUN/$name.pid"
    while :; do
      # up.sh also signals the pid recorded above: a stop request that lands between this
      # check and `wait` is not lost.
      if stop_requested; then kill "-$sig" "$child" 2>/dev/null; kill -CONT "$child" 2>/dev/null; fi
      wait "$child" 2>/dev/null # (no "Killed" job notice: the line below says it)
      status=$?
      # `wait` also returns when a trap ran; a stopped (SIGSTOP) child is not reported at all.
      kill -0 "$child" 2>/dev/null || break
    done
    rm -f "$RUN/$name.pid"
    stop_requested && break
    if [ ! -e "$RUN/$name.up" ]; then
      echo "$status" >"$RUN/$name.exit"
      break
    fi
    # Ctrl-C reaches every process of the terminal at once: give up.sh's stop a moment to begin
    # before calling this exit a crash.
    sleep 0.5
    stop_requested && break
    [ $((SECONDS - started)) -ge "$STABLE_AFTER" ] && delay=1
    say "$name exited with status $status; restarting in ${delay}s (log: $SHOWN/logs/$name.log)"
    printf '\n==> scripts/up.sh: %s exited with status %s at %s; restarting in %ss\n\n' \
      "$name" "$status" "$(date '+%F %T')" "$delay" >>"$log"
    for ((i = 0; i < delay * 10; i++)); do
      stop_requested && break 2
      sleep 0.1
    done
    delay=$((delay * 2 > BACKOFF_MAX ? BACKOFF_MAX : delay * 2))
  done
}

start() { # name stop-signal command...
  supervise "$@" &
  SUP[$1]=$!
  STOP_SIG[$1]=$2
}

child_of() { cat "$RUN/$1.pid" 2>/dev/null || true; }

stop_group() { # names...
  local name pid left deadline=$((SECONDS + STOP_TIMEOUT))
  for name in "$@"; do
    [ -n "${SUP[$name]:-}" ] || continue
    kill -TERM "${SUP[$name]}" 2>/dev/null || true
    pid="$(child_of "$name")"
    if [ -n "$pid" ]; then
      kill "-${STOP_SIG[$name]}" "$pid" 2>/dev/null || true
      kill -CONT "$pid" 2>/dev/null || true # a stopped process handles its signal only then
    fi
  done
  while :; do
    left=()
    for name in "$@"; do
      [ -n "${SUP[$name]:-}" ] || continue
      pid="$(child_of "$name")"
      if kill -0 "${SUP[$name]}" 2>/dev/null || { [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }; then
        left+=("$name")
      fi
    done
    [ ${#left[@]} -eq 0 ] && return 0 # (an explicit 0: a bare return in a trap returns the pre-trap status)
    if [ $SECONDS -ge $deadline ]; then
      for name in "${left[@]}"; do
        say "$name did not stop within ${STOP_TIMEOUT}s: killing it"
        pid="$(child_of "$name")"
        [ -z "$pid" ] || kill -KILL "$pid" 2>/dev/null || true
        kill -KILL "${SUP[$name]}" 2>/dev/null || true
      done
      STATUS=1
      return 0
    fi
    sleep 0.1
  done
}

stop_all() { # exit-status
  set +e # best effort: a failing command must not leave the rest running
  [ "$1" = 0 ] || STATUS="$1"
  trap - EXIT
  trap '' INT TERM HUP # a second Ctrl-C must not cut the stop short; STOP_TIMEOUT bounds it
  [ "$OWN_STACK" = 0 ] || rm -f "$STATE/stack.json"
  if [ ${#SUP[@]} -gt 0 ]; then
    say "stopping"
    touch "$RUN/stopping"
    # Clients before what they use: the edge and the services, then the broker and Redis,
    # then PostgreSQL (fast shutdown: open sessions, a psql included, are disconnected).
    stop_group edge read2 consumer2 relay2 write2 read1 consumer1 relay1 write1
    stop_group kafka redis1 redis2
    stop_group pg1 pg2
    wait 2>/dev/null || true
    say "stopped"
  fi
  exit "$STATUS"
}
trap 'stop_all 0' INT TERM HUP
trap 'stop_all $?' EXIT

fail() { # name message
  local log="$STATE/logs/$1.log" errors
  if [ -s "$log" ]; then
    say "$1 $2; the last 30 lines of its log ($SHOWN/logs/$1.log):"
    tail -n 30 "$log" >&2 || true
    # A JVM's (the broker's) last lines are its shutdown, the cause is further up: its error
    # lines and the causes of their exceptions, each once (PostgreSQL's FATAL and PANIC too).
    errors="$(grep -E '(^|[[:space:]])(ERROR|FATAL|PANIC)([[:space:]]|:)|^Caused by:' "$log" |
              awk '!seen[$0]++' | tail -n 12 || true)"
    if [ -n "$errors" ]; then
      say "$1: the errors in its log:"
      printf '%s\n' "$errors" >&2
    fi
  else
    say "$1 $2; its log ($SHOWN/logs/$1.log) is empty"
  fi
  stop_all 1
}

# Wait until `check...` succeeds for NAME; fail when it (or anything started so far) exits
# first, or after TIMEOUT seconds. Then NAME is up: from now on its supervisor restarts it.
await() { # name timeout check...
  local name="$1" timeout="$2" exited
  shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" 2>/dev/null; do
    for exited in "$RUN"/*.exit; do
      [ -e "$exited" ] || continue
      exited="$(basename "$exited" .exit)"
      fail "$exited" "did not start: it exited with status $(cat "$RUN/$exited.exit")"
    done
    [ $SECONDS -lt $deadline ] || fail "$name" "did not become ready within ${timeout}s"
    sleep 0.2
  done
  touch "$RUN/$name.up"
}

postgres_ready() { "$PG_BIN/pg_isready" -q -t 2 -h 127.0.0.1 -p "$1" -U postgres; }
redis_ready() { # answers PING
  (exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'PING\r\n' >&3 && read -r -t 2 reply <&3 && [[ $reply == +PONG* ]])
}
http_healthy() { curl -fsS --max-time 2 "http://127.0.0.1:$1/healthz" >/dev/null; }

# ---------------------------------------------------------------------------------------------

# PostgreSQL refuses to run as root: run it as the postgres user then.
as_pg() {
  if [ "$(id -u)" = 0 ]; then setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; else "$@"; fi
}
exec_as_pg() { # the same, replacing the calling (sub)shell
  if [ "$(id -u)" = 0 ]; then exec setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; else exec "$@"; fi
}

start_postgres() { # name port
  local dir="$STATE/$1"
  if [ ! -d "$dir/data" ]; then
    say "initialising PostgreSQL cluster $1 in $dir"
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then chown -R postgres:postgres "$dir"; fi
    as_pg "$PG_BIN/initdb" --auth=trust --username=postgres --encoding=UTF8 --locale=C -D "$dir/data" >"$STATE/logs/$1-initdb.log"
  fi
  if [ "$(id -u)" = 0 ]; then chown -R postgres:postgres "$dir"; fi
  # exec: the pid recorded is postgres itself. SIGINT is PostgreSQL's fast shutdown. After a
  # crash PostgreSQL recovers by itself; its lock file refuses a second postmaster.
  start "$1" INT exec_as_pg "$PG_BIN/postgres" -D "$dir/data" -p "$2" -k "$dir" -c listen_addresses=127.0.0.1
}

start_redis() { # name port
  mkdir -p "$STATE/$1"
  start "$1" TERM redis-server --port "$2" --bind 127.0.0.1 --save "" --appendonly no --dir "$STATE/$1"
}

start_service() { # name binary port env...
  local name="$1" binary="$2" port="$3"
  shift 3
  start "$name" TERM env "$@" PORT="$port" BIND_ADDRESS=127.0.0.1 \
    TANDEM_LOG_FORMAT="${TANDEM_LOG_FORMAT:-pretty}" "$BIN/$binary"
}

mint_dev_token() {
  python3 - "$DEV_SECRET" <<'PY'
import base64, hashlib, hmac, json, sys, time
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
now = int(time.time())
header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
claims = b64(json.dumps({"sub": "local-developer", "scope": "tandem:write tandem:read",
                         "iat": now, "exp": now + 30 * 24 * 3600}).encode())
signature = b64(hmac.new(sys.argv[1].encode(), f"{header}.{claims}".encode(), hashlib.sha256).digest())
print(f"{header}.{claims}.{signature}")
PY
}

have curl || apt_install curl
if [ -n "${TANDEM_BIN_DIR:-}" ]; then
  BIN="$TANDEM_BIN_DIR"
  say "using the binaries built in $BIN"
else
  ensure_rust
  # The `up` profile (Cargo.toml): optimised, so the local system is not the slow one a
  # newcomer measures; the first build takes longer than a debug build, later ones are incremental.
  say "building Tandem (cargo build --profile up --workspace --bins: optimised; the first build takes a while)"
  cargo build --profile up --workspace --bins --locked
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/up"
fi

check_ports_free
OWN_STACK=1
rm -f "$STATE/stack.json"
rm -rf "$RUN"
mkdir -p "$RUN"

say "starting PostgreSQL and Redis for region1 and region2"
start_postgres pg1 "$PG1_PORT"
await pg1 "$DEPENDENCY_TIMEOUT" postgres_ready "$PG1_PORT"
start_postgres pg2 "$PG2_PORT"
await pg2 "$DEPENDENCY_TIMEOUT" postgres_ready "$PG2_PORT"
start_redis redis1 "$REDIS1_PORT"
start_redis redis2 "$REDIS2_PORT"
await redis1 "$DEPENDENCY_TIMEOUT" redis_ready "$REDIS1_PORT"
await redis2 "$DEPENDENCY_TIMEOUT" redis_ready "$REDIS2_PORT"
PG1_DSN="postgres://postgres@127.0.0.1:$PG1_PORT/postgres"
PG2_DSN="postgres://postgres@127.0.0.1:$PG2_PORT/postgres"
REDIS1_URL="redis://127.0.0.1:$REDIS1_PORT"
REDIS2_URL="redis://127.0.0.1:$REDIS2_PORT"

# Apache Kafka, one KRaft node whose data lives in .tandem/kafka: a restart keeps the topic and
# every record and position. Ready once it listens and has logged its start.
say "starting Apache Kafka (one node, data in $SHOWN/kafka) on 127.0.0.1:$KAFKA_PORT"
start kafka TERM env KAFKA_PORT="$KAFKA_PORT" KAFKA_CONTROLLER_PORT="$KAFKA_CONTROLLER_PORT" \
  bash "$ROOT/scripts/kafka-broker.sh" "$STATE/kafka"
kafka_ready() { listening "$KAFKA_PORT" && grep -q 'Kafka Server started' "$STATE/logs/kafka.log"; }
await kafka "$KAFKA_TIMEOUT" kafka_ready
# Each direction has its own topic, named for the region whose outbox it carries (Region 1's
# keeps its name from before Region 2 could write). Both regions run the same four services:
# the write region's relay publishes its writes and the other region's consumer applies them;
# the other direction carries heartbeats until a switchover makes Region 2 the write region.
KAFKA=(KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT" KAFKA_TOPIC_PARTITIONS=3 KAFKA_TOPIC_REPLICATION=1)
TOPIC1=tandem.documents
TOPIC2=tandem.documents.region2

say "starting region1: Write API, Read API, outbox relay, consumer"
COMMON1=(TANDEM_REGION=region1 DATABASE_URL="$PG1_DSN" REDIS_URL="$REDIS1_URL" TANDEM_JWT_HS256_SECRET="$DEV_SECRET")
COMMON2=(TANDEM_REGION=region2 DATABASE_URL="$PG2_DSN" REDIS_URL="$REDIS2_URL" TANDEM_JWT_HS256_SECRET="$DEV_SECRET")
start_service write1 tandem-write "$WRITE1_PORT" "${COMMON1[@]}" \
  TANDEM_WRITE_FORWARD_URL="http://127.0.0.1:$WRITE2_PORT"
await write1 "$SERVICE_TIMEOUT" http_healthy "$WRITE1_PORT"
start_service read1 tandem-read "$READ1_PORT" "${COMMON1[@]}" \
  TANDEM_PRIMARY_READ_URL="http://127.0.0.1:$READ2_PORT"
start_service relay1 tandem-outbox-relay "$RELAY_PORT" TANDEM_REGION=region1 DATABASE_URL="$PG1_DSN" \
  "${KAFKA[@]}" KAFKA_TOPIC="$TOPIC1"

say "starting region2: Write API (forwards to the write region), Read API, consumer, outbox relay"
start_service write2 tandem-write "$WRITE2_PORT" "${COMMON2[@]}" \
  TANDEM_WRITE_FORWARD_URL="http://127.0.0.1:$WRITE1_PORT"
await write2 "$SERVICE_TIMEOUT" http_healthy "$WRITE2_PORT"
start_service consumer2 tandem-region2-consumer "$CONSUMER_PORT" TANDEM_REGION=region2 \
  DATABASE_URL="$PG2_DSN" REDIS_URL="$REDIS2_URL" "${KAFKA[@]}" KAFKA_TOPIC="$TOPIC1" \
  KAFKA_GROUP_ID=tandem-region2
await consumer2 "$SERVICE_TIMEOUT" http_healthy "$CONSUMER_PORT"
start_service read2 tandem-read "$READ2_PORT" "${COMMON2[@]}" \
  TANDEM_PRIMARY_READ_URL="http://127.0.0.1:$READ1_PORT"
start_service relay2 tandem-outbox-relay "$RELAY2_PORT" TANDEM_REGION=region2 DATABASE_URL="$PG2_DSN" \
  "${KAFKA[@]}" KAFKA_TOPIC="$TOPIC2"
start_service consumer1 tandem-region2-consumer "$CONSUMER1_PORT" TANDEM_REGION=region1 \
  DATABASE_URL="$PG1_DSN" REDIS_URL="$REDIS1_URL" "${KAFKA[@]}" KAFKA_TOPIC="$TOPIC2" \
  KAFKA_GROUP_ID=tandem-region1
await read1 "$SERVICE_TIMEOUT" http_healthy "$READ1_PORT"
await relay1 "$SERVICE_TIMEOUT" http_healthy "$RELAY_PORT"
await read2 "$SERVICE_TIMEOUT" http_healthy "$READ2_PORT"
await relay2 "$SERVICE_TIMEOUT" http_healthy "$RELAY2_PORT"
await consumer1 "$SERVICE_TIMEOUT" http_healthy "$CONSUMER1_PORT"

say "starting the edge (HAProxy as Route 53 + ALB) on 127.0.0.1:$EDGE_PORT"
sed -e "s/@EDGE_PORT@/$EDGE_PORT/" -e "s/@WRITE1@/127.0.0.1:$WRITE1_PORT/" \
    -e "s/@WRITE2@/127.0.0.1:$WRITE2_PORT/" \
    -e "s/@READ1@/127.0.0.1:$READ1_PORT/" -e "s/@READ2@/127.0.0.1:$READ2_PORT/" \
    deploy/local/haproxy.cfg.template >"$STATE/haproxy.cfg"
HAPROXY="$(command -v haproxy || echo /usr/sbin/haproxy)"
start edge TERM "$HAPROXY" -db -f "$STATE/haproxy.cfg"
await edge "$DEPENDENCY_TIMEOUT" listening "$EDGE_PORT"

TOKEN="$(mint_dev_token)"
# Written whole, then renamed: a reader never sees half a file.
cat >"$STATE/stack.json.tmp" <<JSON
{
  "edge": "http://127.0.0.1:$EDGE_PORT",
  "regions": {
    "region1": {
      "write": "http://127.0.0.1:$WRITE1_PORT",
      "read": "http://127.0.0.1:$READ1_PORT",
      "postgres": "$PG1_DSN",
      "redis": "$REDIS1_URL",
      "relay": "http://127.0.0.1:$RELAY_PORT",
      "consumer": "http://127.0.0.1:$CONSUMER1_PORT",
      "topic": "$TOPIC1"
    },
    "region2": {
      "write": "http://127.0.0.1:$WRITE2_PORT",
      "read": "http://127.0.0.1:$READ2_PORT",
      "postgres": "$PG2_DSN",
      "redis": "$REDIS2_URL",
      "relay": "http://127.0.0.1:$RELAY2_PORT",
      "consumer": "http://127.0.0.1:$CONSUMER_PORT",
      "topic": "$TOPIC2"
    }
  },
  "kafka": "127.0.0.1:$KAFKA_PORT",
  "dev_token": "$TOKEN"
}
JSON
mv -f "$STATE/stack.json.tmp" "$STATE/stack.json"

cat <<MSG

Tandem is up (logs in $SHOWN/logs/, endpoints in $SHOWN/stack.json).
  edge (Route 53 + ALB)  http://127.0.0.1:$EDGE_PORT
  region1 write          http://127.0.0.1:$WRITE1_PORT
  region1 read           http://127.0.0.1:$READ1_PORT
  region1 relay (ops)    http://127.0.0.1:$RELAY_PORT/metrics
  region1 consumer (ops) http://127.0.0.1:$CONSUMER1_PORT/metrics
  region1 postgres       $PG1_DSN
  region1 redis          $REDIS1_URL
  kafka                  127.0.0.1:$KAFKA_PORT
  region2 write          http://127.0.0.1:$WRITE2_PORT (forwards to the write region)
  region2 read           http://127.0.0.1:$READ2_PORT
  region2 relay (ops)    http://127.0.0.1:$RELAY2_PORT/metrics
  region2 consumer (ops) http://127.0.0.1:$CONSUMER_PORT/metrics
  region2 postgres       $PG2_DSN
  region2 redis          $REDIS2_URL
  dev token              $TOKEN

Try:
  TOKEN=\$(jq -r .dev_token $SHOWN/stack.json)
  curl -i -X PUT http://127.0.0.1:$EDGE_PORT/v1/notes/hello -H "Authorization: Bearer \$TOKEN" \\
       -H 'Content-Type: application/json' -d '{"text":"hi"}'
  curl http://127.0.0.1:$EDGE_PORT/v1/notes/hello          # region1
  curl http://127.0.0.1:$READ2_PORT/v1/notes/hello         # region2, replicated

A process that exits is restarted (with backoff); press Ctrl-C to stop.
MSG

# Stay in the foreground until a signal arrives (its trap stops everything). The supervisors
# never end by themselves; one that does (its process exited as it was being marked up) is
# reported like a failed start. A bounded sleep, not `wait -n`: bash runs a trap only between
# commands, and a signal that lands just before `wait -n` blocks was seen to leave it waiting
# (and the stack running) until a supervisor ended; here a trap runs within half a second.
while :; do
  sleep 0.5 || true
  for name in "${!SUP[@]}"; do
    if ! kill -0 "${SUP[$name]}" 2>/dev/null; then
      if [ -e "$RUN/$name.exit" ]; then
        fail "$name" "exited with status $(cat "$RUN/$name.exit")"
      fi
      fail "$name" "is no longer supervised"
    fi
  done
done
