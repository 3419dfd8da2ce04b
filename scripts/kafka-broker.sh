#!/usr/bin/env bash
# One Apache Kafka node in KRaft mode (combined broker + controller) on loopback, in the
# foreground: `make up` runs one durable node with it, the test harness single nodes and 3-node
# clusters. The one home of the local broker's configuration.
#
#   scripts/kafka-broker.sh DATA_DIR
#
# Environment (ports are required):
#   KAFKA_PORT             the client listener (PLAINTEXT, 127.0.0.1)
#   KAFKA_CONTROLLER_PORT  the KRaft controller listener
#   KAFKA_ADVERTISED_PORT  the port clients are told to use (default KAFKA_PORT; a proxy's)
#   KAFKA_NODE_ID          this node's id (default 1)
#   KAFKA_VOTERS           a cluster's static controller quorum, `1@127.0.0.1:P1,2@...`;
#                          unset: a single node, its own quorum (formatted --standalone)
#   KAFKA_CLUSTER_ID       the cluster id every node of a cluster is formatted with
#                          (default: a new one; only the first start formats)
#   KAFKA_HEAP             maximum heap (default 512m)
#   KAFKA_EXTRA_PROPERTIES more broker properties, one `key=value` per line
#
# DATA_DIR keeps the log segments and metadata: a restart resumes where the node stopped. The
# storage is formatted once (kafka.tools.StorageTool), on the first start. The process execs
# into the JVM, so a signal sent to this script's pid (SIGTERM, SIGKILL, SIGSTOP) reaches the
# broker itself. Logs go to stderr (SLF4J's simple binding).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

dir="${1:?usage: scripts/kafka-broker.sh DATA_DIR}"
: "${KAFKA_PORT:?KAFKA_PORT is required}" "${KAFKA_CONTROLLER_PORT:?KAFKA_CONTROLLER_PORT is required}"
node="${KAFKA_NODE_ID:-1}"
ensure_kafka
mkdir -p "$dir/data"

if [ -n "${KAFKA_VOTERS:-}" ]; then
  quorum="controller.quorum.voters=$KAFKA_VOTERS"
  replication=3
  min_isr=2
  session=""
else
  quorum="controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT"
  replication=1
  min_isr=1
  # A single node restarted after a crash cannot register until its previous incarnation's
  # session expires (Kafka's default: 9 s); 3 s keeps a local restart quick. A cluster keeps
  # the default, as MSK does, so its tests see production's failover times.
  session=$'broker.session.timeout.ms=3000\nbroker.heartbeat.interval.ms=1000'
fi

cat >"$dir/server.properties" <<PROPERTIES
process.roles=broker,controller
node.id=$node
$quorum
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:${KAFKA_ADVERTISED_PORT:-$KAFKA_PORT}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
# As on Amazon MSK: topics exist because something created them (the relay and consumer do).
auto.create.topics.enable=false
# A cluster keeps three copies and acknowledges acks=all writes once two have them (MSK's
# recommended settings); a single node keeps one.
default.replication.factor=$replication
min.insync.replicas=$min_isr
offsets.topic.replication.factor=$replication
transaction.state.log.replication.factor=$replication
transaction.state.log.min.isr=$min_isr
# The consumer tracks its positions in Region 2's database; Kafka's group is informational,
# so there is nothing to wait for before the first rebalance.
group.initial.rebalance.delay.ms=0
# Small local footprints: a laptop's disk, not a production fleet's.
log.segment.bytes=67108864
num.network.threads=2
num.io.threads=2
$session
PROPERTIES
if [ -n "${KAFKA_EXTRA_PROPERTIES:-}" ]; then
  printf '%s\n' "$KAFKA_EXTRA_PROPERTIES" >>"$dir/server.properties"
fi

java_opts=(-Xms64m "-Xmx${KAFKA_HEAP:-512m}" -XX:+UseSerialGC -XX:TieredStopAtLevel=1
           -Djava.awt.headless=true -Dorg.slf4j.simpleLogger.showDateTime=true
           "-Dorg.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd HH:mm:ss.SSS"
           "-Dorg.slf4j.simpleLogger.defaultLogLevel=${KAFKA_LOG_LEVEL:-info}"
           -Dorg.slf4j.simpleLogger.log.org.apache.kafka.clients=warn
           -Dorg.slf4j.simpleLogger.log.kafka.utils.Log4jControllerRegistration=warn
           -cp "$TANDEM_KAFKA_LIBS/*")

if [ ! -e "$dir/data/meta.properties" ]; then
  # A cluster id is 16 random bytes in URL-safe base64 without padding (what
  # `StorageTool random-uuid` prints, without a JVM start). Like Kafka's own, never one that
  # starts with '-': the tool would take it for an option.
  cluster="${KAFKA_CLUSTER_ID:-}"
  while [ -z "$cluster" ] || [ "${cluster#-}" != "$cluster" ]; do
    cluster="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | cut -c1-22)"
  done
  standalone=()
  [ -n "${KAFKA_VOTERS:-}" ] || standalone=(--standalone)
  echo "kafka-broker.sh: formatting $dir/data for cluster $cluster (node $node)" >&2
  "$TANDEM_JAVA" "${java_opts[@]}" kafka.tools.StorageTool format --ignore-formatted \
    -t "$cluster" -c "$dir/server.properties" "${standalone[@]}" >"$dir/format.log" 2>&1 ||
    { cat "$dir/format.log" >&2; exit 1; }
fi

exec "$TANDEM_JAVA" "${java_opts[@]}" kafka.Kafka "$dir/server.properties"
