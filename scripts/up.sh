#!/usr/bin/env bash
# `make up`: builds Tandem and runs the local system on loopback, in the foreground.
# Data lives in .tandem/ (kept between runs); Ctrl-C or SIGTERM stops everything cleanly.
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
ROOT="$PWD"
STATE="$ROOT/.tandem"
mkdir -p "$STATE/logs"

# Ports (override any of them from the environment).
EDGE_PORT="${EDGE_PORT:-8080}"
WRITE1_PORT="${WRITE1_PORT:-8081}"
READ1_PORT="${READ1_PORT:-8082}"
READ2_PORT="${READ2_PORT:-8083}"
RELAY_PORT="${RELAY_PORT:-8084}"
CONSUMER_PORT="${CONSUMER_PORT:-8085}"
PG1_PORT="${PG1_PORT:-55432}"
PG2_PORT="${PG2_PORT:-55433}"
REDIS1_PORT="${REDIS1_PORT:-56379}"
REDIS2_PORT="${REDIS2_PORT:-56380}"
KAFKA_PORT="${KAFKA_PORT:-59092}"
# The published development secret (shared/src/auth.rs, DEV_HS256_SECRET): the services accept
# it only in development mode, which every service started here runs in.
DEV_SECRET="${TANDEM_JWT_HS256_SECRET:-tandem-local-development-secret-v2}"
export TANDEM_DEV_MODE=true

ensure_rust
ensure_servers
ensure_tansu
PG_BIN="$(pg_bindir)"

PIDS=()
stop_all() {
  trap - INT TERM EXIT
  say "stopping"
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do
    kill -TERM "${PIDS[$i]}" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  say "stopped"
  exit 0
}
trap stop_all INT TERM EXIT

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
    [ "$(id -u)" = 0 ] && chown -R postgres:postgres "$dir"
    as_pg "$PG_BIN/initdb" --auth=trust --username=postgres --encoding=UTF8 --locale=C -D "$dir/data" >"$STATE/logs/$1-initdb.log"
  fi
  [ "$(id -u)" = 0 ] && chown -R postgres:postgres "$dir"
  # exec: the pid recorded is postgres itself, not a subshell that would outlive a TERM.
  (exec_as_pg "$PG_BIN/postgres" -D "$dir/data" -p "$2" -k "$dir" -c listen_addresses=127.0.0.1) >"$STATE/logs/$1.log" 2>&1 &
  PIDS+=($!)
  until "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$2" -U postgres; do sleep 0.1; done
}

start_redis() { # name port
  mkdir -p "$STATE/$1"
  redis-server --port "$2" --bind 127.0.0.1 --save "" --appendonly no --dir "$STATE/$1" >"$STATE/logs/$1.log" 2>&1 &
  PIDS+=($!)
}

start_service() { # name binary port env...
  local name="$1" binary="$2" port="$3"
  shift 3
  env "$@" PORT="$port" BIND_ADDRESS=127.0.0.1 TANDEM_LOG_FORMAT="${TANDEM_LOG_FORMAT:-pretty}" \
    "$TARGET/debug/$binary" >"$STATE/logs/$name.log" 2>&1 &
  PIDS+=($!)
}

wait_healthy() { # name port
  local deadline=$((SECONDS + 60))
  until curl -fsS "http://127.0.0.1:$2/healthz" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      echo "$1 did not become healthy; its log:" >&2
      tail -n 30 "$STATE/logs/$1.log" >&2
      exit 1
    fi
    sleep 0.2
  done
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
say "building Tandem (cargo build --workspace --bins)"
cargo build --workspace --bins --locked
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"

say "starting PostgreSQL and Redis for region1 and region2"
start_postgres pg1 "$PG1_PORT"
start_postgres pg2 "$PG2_PORT"
start_redis redis1 "$REDIS1_PORT"
start_redis redis2 "$REDIS2_PORT"
PG1_DSN="postgres://postgres@127.0.0.1:$PG1_PORT/postgres"
PG2_DSN="postgres://postgres@127.0.0.1:$PG2_PORT/postgres"
REDIS1_URL="redis://127.0.0.1:$REDIS1_PORT"
REDIS2_URL="redis://127.0.0.1:$REDIS2_PORT"

say "starting the Kafka-protocol broker (tansu, memory storage) on 127.0.0.1:$KAFKA_PORT"
"$TANDEM_TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" --storage-engine memory://tansu/ \
  >"$STATE/logs/kafka.log" 2>&1 &
PIDS+=($!)
until (echo >"/dev/tcp/127.0.0.1/$KAFKA_PORT") 2>/dev/null; do sleep 0.1; done
# tansu's memory engine needs one record per producer batch for consumers to resume
# mid-stream, and answers a waiting fetch only when fetch.wait.max.ms runs out (50 ms by
# default) rather than when data arrives; a restarted memory broker has lost everything (the
# consumer detects that).
KAFKA=(KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT" KAFKA_TOPIC=tandem.documents
       KAFKA_PROPERTIES="batch.num.messages=1,message.timeout.ms=10000,fetch.wait.max.ms=5"
       KAFKA_TOPIC_PARTITIONS=3 KAFKA_TOPIC_REPLICATION=1)

say "starting region1: Write API, Read API, outbox relay"
COMMON1=(TANDEM_REGION=region1 DATABASE_URL="$PG1_DSN" REDIS_URL="$REDIS1_URL" TANDEM_JWT_HS256_SECRET="$DEV_SECRET")
start_service write1 tandem-write "$WRITE1_PORT" "${COMMON1[@]}"
wait_healthy write1 "$WRITE1_PORT"
start_service read1 tandem-read "$READ1_PORT" "${COMMON1[@]}"
start_service relay1 tandem-outbox-relay "$RELAY_PORT" TANDEM_REGION=region1 DATABASE_URL="$PG1_DSN" "${KAFKA[@]}"

say "starting region2: consumer, Read API (replica)"
start_service consumer2 tandem-region2-consumer "$CONSUMER_PORT" TANDEM_REGION=region2 \
  DATABASE_URL="$PG2_DSN" REDIS_URL="$REDIS2_URL" "${KAFKA[@]}"
wait_healthy consumer2 "$CONSUMER_PORT"
start_service read2 tandem-read "$READ2_PORT" TANDEM_REGION=region2 DATABASE_URL="$PG2_DSN" \
  REDIS_URL="$REDIS2_URL" TANDEM_JWT_HS256_SECRET="$DEV_SECRET" \
  TANDEM_PRIMARY_READ_URL="http://127.0.0.1:$READ1_PORT"
for service in "read1 $READ1_PORT" "relay1 $RELAY_PORT" "read2 $READ2_PORT"; do
  wait_healthy $service
done

say "starting the edge (HAProxy as Route 53 + ALB) on 127.0.0.1:$EDGE_PORT"
sed -e "s/@EDGE_PORT@/$EDGE_PORT/" -e "s/@WRITE1@/127.0.0.1:$WRITE1_PORT/" \
    -e "s/@READ1@/127.0.0.1:$READ1_PORT/" -e "s/@READ2@/127.0.0.1:$READ2_PORT/" \
    deploy/local/haproxy.cfg.template >"$STATE/haproxy.cfg"
HAPROXY="$(command -v haproxy || echo /usr/sbin/haproxy)"
"$HAPROXY" -db -f "$STATE/haproxy.cfg" >"$STATE/logs/edge.log" 2>&1 &
PIDS+=($!)
until (echo >"/dev/tcp/127.0.0.1/$EDGE_PORT") 2>/dev/null; do sleep 0.1; done

TOKEN="$(mint_dev_token)"
cat >"$STATE/stack.json" <<JSON
{
  "edge": "http://127.0.0.1:$EDGE_PORT",
  "regions": {
    "region1": {
      "write": "http://127.0.0.1:$WRITE1_PORT",
      "read": "http://127.0.0.1:$READ1_PORT",
      "postgres": "$PG1_DSN",
      "redis": "$REDIS1_URL",
      "relay": "http://127.0.0.1:$RELAY_PORT"
    },
    "region2": {
      "read": "http://127.0.0.1:$READ2_PORT",
      "postgres": "$PG2_DSN",
      "redis": "$REDIS2_URL",
      "consumer": "http://127.0.0.1:$CONSUMER_PORT"
    }
  },
  "kafka": "127.0.0.1:$KAFKA_PORT",
  "dev_token": "$TOKEN"
}
JSON

cat <<MSG

Tandem is up (logs in .tandem/logs/, endpoints in .tandem/stack.json).
  edge (Route 53 + ALB)  http://127.0.0.1:$EDGE_PORT
  region1 write          http://127.0.0.1:$WRITE1_PORT
  region1 read           http://127.0.0.1:$READ1_PORT
  region1 relay (ops)    http://127.0.0.1:$RELAY_PORT/metrics
  region1 postgres       $PG1_DSN
  region1 redis          $REDIS1_URL
  kafka                  127.0.0.1:$KAFKA_PORT
  region2 read           http://127.0.0.1:$READ2_PORT
  region2 consumer (ops) http://127.0.0.1:$CONSUMER_PORT/metrics
  region2 postgres       $PG2_DSN
  region2 redis          $REDIS2_URL
  dev token              $TOKEN

Try:
  TOKEN=\$(jq -r .dev_token .tandem/stack.json)
  curl -i -X PUT http://127.0.0.1:$EDGE_PORT/v1/notes/hello -H "Authorization: Bearer \$TOKEN" \\
       -H 'Content-Type: application/json' -d '{"text":"hi"}'
  curl http://127.0.0.1:$EDGE_PORT/v1/notes/hello          # region1
  curl http://127.0.0.1:$READ2_PORT/v1/notes/hello         # region2, replicated

Press Ctrl-C to stop.
MSG

# Stay in the foreground until a signal arrives or a service dies.
wait -n "${PIDS[@]}" || true
say "a process exited; shutting the stack down (see .tandem/logs/)"
