#!/usr/bin/env bash
# Prints `export` lines for running a function under `cargo lambda watch` against a running
# `make up`, all taken from its stack.json (so the ports are whatever `make up` used):
#
#   eval "$(scripts/lambda-env.sh write)"    # or read, apply
#
# The function's settings (its region's DATABASE_URL and REDIS_URL; for write and read the
# development secret the event fixtures' token is signed with, in development mode), then, for
# the terminal that invokes it, the stack's HTTP endpoints and its dev token: EDGE_URL,
# READ1_URL, READ2_URL, TOKEN. The file is $TANDEM_STACK_FILE, else stack.json in
# $TANDEM_STATE_DIR (default .tandem in this clone), as `make up` writes it.
set -euo pipefail

usage() {
  echo "usage: scripts/lambda-env.sh write|read|apply   (then: eval \"\$(scripts/lambda-env.sh write)\")" >&2
  exit 2
}
[ $# -eq 1 ] || usage
case "$1" in
  write | read) region=region1 ;;
  apply) region=region2 ;;
  *) usage ;;
esac

root="$(cd "$(dirname "$0")/.." && pwd)"
stack="${TANDEM_STACK_FILE:-${TANDEM_STATE_DIR:-$root/.tandem}/stack.json}"
if [ ! -f "$stack" ]; then
  echo "lambda-env.sh: $stack does not exist: start the stack with \`make up\` in another terminal first (the file exists only while the stack is up)" >&2
  exit 1
fi

python3 - "$stack" "$1" "$region" <<'PY'
import json, shlex, sys

path, function, region = sys.argv[1:]
with open(path) as f:
    stack = json.load(f)
regions = stack["regions"]
settings = {
    "TANDEM_REGION": region,
    "DATABASE_URL": regions[region]["postgres"],
    "REDIS_URL": regions[region]["redis"],
}
if function in ("write", "read"):
    # The published development secret (shared/http/src/auth.rs, DEV_HS256_SECRET), which the
    # fixtures' token is signed with; accepted only in development mode.
    settings["TANDEM_JWT_HS256_SECRET"] = "tandem-local-development-secret-v2"
    settings["TANDEM_DEV_MODE"] = "true"
urls = {
    "EDGE_URL": stack["edge"],
    "READ1_URL": regions["region1"]["read"],
    "READ2_URL": regions["region2"]["read"],
    "TOKEN": stack["dev_token"],
}
print(f"# the {function} function's settings, from {path}")
for name, value in settings.items():
    print(f"export {name}={shlex.quote(value)}")
print("# the stack's endpoints and dev token, for the terminal that invokes")
for name, value in urls.items():
    print(f"export {name}={shlex.quote(value)}")
PY
