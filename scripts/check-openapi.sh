#!/usr/bin/env bash
# Validates docs/openapi.yaml as an OpenAPI 3.1 document, offline once its tools are installed.
#
# The validator lives in a virtualenv cached outside the clone,
# ${TANDEM_CACHE:-~/.cache/tandem}/venv-openapi, created on first use and reused afterwards.
# Usage: scripts/check-openapi.sh [SPEC]   (default: docs/openapi.yaml)

set -euo pipefail

VALIDATOR_VERSION="0.9.0"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
spec="${1:-$root/docs/openapi.yaml}"
cache="${TANDEM_CACHE:-$HOME/.cache/tandem}"
venv="$cache/venv-openapi"

say() { printf '==> %s\n' "$*" >&2; }

if [ ! -f "$spec" ]; then
  echo "no such file: $spec" >&2
  exit 2
fi

installed_version() {
  "$venv/bin/python" - <<'EOF' 2>/dev/null || true
from importlib.metadata import version
print(version("openapi-spec-validator"))
EOF
}

if [ ! -x "$venv/bin/python" ]; then
  say "creating virtualenv $venv"
  mkdir -p "$cache"
  if ! python3 -m venv "$venv" >&2; then
    say "python3 -m venv failed; installing python3-venv"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
  fi
fi

if [ "$(installed_version)" != "$VALIDATOR_VERSION" ]; then
  say "installing openapi-spec-validator==$VALIDATOR_VERSION into $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "openapi-spec-validator==$VALIDATOR_VERSION" >&2
  say "installed:"
  "$venv/bin/pip" list --disable-pip-version-check --format=freeze >&2
else
  say "using openapi-spec-validator $VALIDATOR_VERSION from $venv"
fi

say "validating ${spec#"$root"/} as OpenAPI 3.1"
"$venv/bin/python" - "$spec" <<'EOF'
import sys

import yaml
from openapi_spec_validator import OpenAPIV31SpecValidator

path = sys.argv[1]
try:
    with open(path, encoding="utf-8") as f:
        spec = yaml.safe_load(f)
except yaml.YAMLError as e:
    print(f"{path}: not valid YAML: {e}", file=sys.stderr)
    sys.exit(1)

if not isinstance(spec, dict):
    print(f"{path}: not an OpenAPI document (the top level is not a mapping)", file=sys.stderr)
    sys.exit(1)
version = str(spec.get("openapi", ""))
if not version.startswith("3.1."):
    print(f"{path}: openapi is {version!r}, expected 3.1.x", file=sys.stderr)
    sys.exit(1)


def where(error):
    return "/".join(str(p) for p in getattr(error, "absolute_path", []) or []) or "(root)"


errors = 0
try:
    for error in OpenAPIV31SpecValidator(spec, base_uri=f"file://{path}").iter_errors():
        errors += 1
        message = getattr(error, "message", str(error))
        print(f"{path}: at {where(error)}: {message[:500]}", file=sys.stderr)
except Exception as e:  # an unresolvable $ref and the like stop the validator itself
    errors += 1
    print(f"{path}: {type(e).__name__}: {str(e).split(' within ')[0][:500]}", file=sys.stderr)

# The validator checks the document's structure, not that its examples fit their schemas.
if not errors:
    from jsonschema import Draft202012Validator, FormatChecker
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    base = "urn:tandem:openapi"
    registry = Registry().with_resource(base, Resource(contents=spec, specification=DRAFT202012))

    def resolve(node):
        while isinstance(node, dict) and "$ref" in node and node["$ref"].startswith("#/"):
            target = spec
            for part in node["$ref"][2:].split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            node = target
        return node

    def check_examples(node, at):
        global errors
        if isinstance(node, dict):
            if "schema" in node and ("example" in node or "examples" in node):
                schema = node["schema"]
                if "$ref" in schema:
                    schema = {"$ref": base + schema["$ref"]}
                validator = Draft202012Validator(schema, registry=registry, format_checker=FormatChecker())
                samples = [("example", node["example"])] if "example" in node else []
                for name, example in (node.get("examples") or {}).items():
                    samples.append((f"examples/{name}", resolve(example).get("value")))
                for name, value in samples:
                    for error in validator.iter_errors(value):
                        errors += 1
                        print(f"{path}: at {at}/{name}: example does not fit its schema: {error.message[:300]}", file=sys.stderr)
            for key, value in node.items():
                check_examples(value, f"{at}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                check_examples(value, f"{at}/{i}")

    check_examples(spec, "")

if errors:
    print(f"{path}: INVALID ({errors} error(s))", file=sys.stderr)
    sys.exit(1)

methods = {"get", "head", "put", "post", "patch", "delete", "options", "trace"}
paths = spec.get("paths") or {}
operations = sum(1 for item in paths.values() for method in item if method in methods)
print(f"{path}: valid OpenAPI {version} ({len(paths)} paths, {operations} operations)")
EOF
