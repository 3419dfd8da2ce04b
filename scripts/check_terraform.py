#!/usr/bin/env python3
"""Offline structural checks of the Terraform tree (no providers, no network).

`terraform validate` needs the providers downloaded, which this project's machines cannot do,
so this script checks what can be checked from the source alone, with python-hcl2:

* every `.tf` file parses;
* every variable has a `type` and a non-empty `description`;
* every output has a non-empty `description`;
* every module directory under terraform/modules has main.tf, variables.tf, outputs.tf and
  versions.tf, pins each provider with a `version` constraint in `required_providers`, and
  splits main.tf into sections with banner comments;
* every `module` block with a local `source` passes only variables the module declares, passes
  every variable the module requires (no default), and passes every provider alias the module
  lists in `configuration_aliases`;
* every reference resolves within its module directory: `var.X` to a declared variable,
  `local.X` to a local, `module.M.O` to a module block whose (local) source declares output O,
  `data.T.N` and `T.N` (resources of the aws, random, tls and kafka providers) to a declared block;
  the most common `terraform validate` errors, caught without providers;
* every `moved` block moves from an address the configuration no longer declares to one it does
  (module.a.module.b, module.a.aws_x.y, followed through local module sources), each `from` once;
  a move between instance keys of one declared resource (aws_x.y to aws_x.y["k"], or one key to
  another) only needs the resource declared: which keys exist depends on values, not the source;
* every call of modules/lambda or modules/lambda_kafka (from a deployment, or from a module such
  as modules/region) sets only environment variables its
  binary (Write, Read or Region 2's apply, from var.lambda_zip_paths) reads and every one it
  requires, as derived from the Rust sources by
  env_contract.py (no stale, no missing setting). The environment may be map literals, `local.X`,
  an entry of a map literal `local.X["k"]`, `var.X` and merge() of them; a `var.X` is followed to what each call of the enclosing module
  passes (or the variable's default), so a call inside a module is checked once per chain of
  calls that instantiates it, and one whose keys cannot be followed is a problem, not a pass.
  Each function also sets TANDEM_REGION, uses IAM database
  authentication, and sets none that Lambda reserves or ignores (AWS_REGION, AWS_DEFAULT_REGION,
  PORT, BIND_ADDRESS), no DATABASE_CA_FILE (nothing in the package to point it at; RDS Proxy needs
  no extra CA) and not the local-only TANDEM_JWT_HS256_SECRET;
* every `aws_lb_listener` whose default action forwards has an unconditional (no count or
  for_each) `aws_lb_listener_rule` that answers a fixed 404 for the path patterns /metrics and
  /metrics/* with a lower priority number than every other rule of that listener: the services
  serve Prometheus metrics on the API port, which must not be reachable from the internet;
* every identity-policy statement (an `aws_iam_policy_document` statement without principals)
  that allows kms:Decrypt (or a wildcard covering it) has a kms:ViaService condition, so a role
  can decrypt only through the service it reads (Secrets Manager), never by calling KMS itself;
  the few service roles that must call KMS directly are listed in KMS_DECRYPT_UNSCOPED with why;
* every `aws_msk_configuration` sets message.max.bytes and replica.fetch.max.bytes from the same
  variable, whose default is a literal number (modules/msk: max_message_bytes, which must equal
  KAFKA_MAX_MESSAGE_BYTES in shared/core/src/limits.rs, a Rust test compares them), and sets
  allow.everyone.if.no.acl.found to false: literally, or through a bootstrap variable whose
  default is false in the module and in every deployment that passes it, and that no committed
  .tfvars turns on;
* the Kafka topics and consumer groups the ACLs name (variables kafka_topics and consumer_groups,
  maps keyed by region) default to what each region's overlay (eks/overlays/regionN) sets: its
  relay's KAFKA_TOPIC is kafka_topics[regionN], its consumer's KAFKA_TOPIC the other region's
  topic and its KAFKA_GROUP_ID consumer_groups[regionN]; an ACL for another name would lock a
  relay or a consumer out;
* the GitHub workflows next to the tree (.github/workflows) that run `terraform plan` never
  upload the binary plan (a saved plan holds every sensitive value it read: database password,
  Redis AUTH token, SCRAM passwords; only `terraform show` text may leave the job), delete it in
  the step that writes it, never trigger on pull_request_target, and every job that can get an
  OIDC token on a pull request runs only for branches of this repository and in an environment
  (the subject the cloud role trusts).

Usage: check_terraform.py [TERRAFORM_DIR]   (default: terraform/ next to this script's parent)
Exit status 0 when clean, 1 when any problem was found, 2 on usage errors.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hcl2
import yaml

import env_contract

MODULE_FILES = ("main.tf", "variables.tf", "outputs.tf", "versions.tf")
# Arguments of a module block that are Terraform meta-arguments, not module inputs.
META_ARGUMENTS = {"source", "version", "providers", "count", "for_each", "depends_on"}
BANNER = "#" * 20

# Which variables the Write/Read binaries read and require comes from the Rust sources
# (env_contract.py). On top of that contract, a Lambda function:
# * must not get what Lambda reserves, what the binary ignores under the Lambda runtime, or a
#   CA file (the package is the bare binary);
LAMBDA_NOT_APPLICABLE = {
    "AWS_REGION": "Lambda reserves (it sets it itself)",
    "AWS_DEFAULT_REGION": "Lambda reserves (it sets it itself)",
    "PORT": "the function ignores under the Lambda runtime (shared/http/src/serve.rs)",
    "BIND_ADDRESS": "the function ignores under the Lambda runtime (shared/http/src/serve.rs)",
    "DATABASE_CA_FILE": "the function cannot use: its package has no CA bundle, and RDS Proxy's "
    "certificates chain to Amazon's public roots, already among the web PKI roots the binaries trust",
}
# * must name its region (the default, region1, would be wrong in Region 2) and reach the
#   database through RDS Proxy with IAM authentication.
LAMBDA_REQUIRED = {
    "TANDEM_REGION": "each function names its region",
    "DATABASE_IAM_HOST": "Lambda uses IAM database authentication through RDS Proxy",
}
# var.lambda_zip_paths key (or function_name suffix) -> binary.
LAMBDA_BINARIES = {"write": "tandem-write", "read": "tandem-read", "apply": "tandem-region2-apply-lambda"}
# The modules that deploy one of those binaries as a Lambda function.
LAMBDA_MODULES = ("modules/lambda", "modules/lambda_kafka")
ZIP_KEY = re.compile(r'lambda_zip_paths\[\s*"([A-Za-z0-9_-]+)"\s*\]')
NAME_SUFFIX = re.compile(r"-([a-z0-9]+)\"?$")
ENV_KEY = re.compile(r"\b([A-Z][A-Z0-9_]*)\s*=(?!=)")
LOCAL_REF = re.compile(r"\blocal\.([A-Za-z0-9_]+)")
# Whole expressions: a map the Lambda environment rule follows, or merges.
LOCAL_ONLY_REF = re.compile(r"local\.([A-Za-z0-9_]+)")
LOCAL_ENTRY_REF = re.compile(r'local\.([A-Za-z0-9_]+)(?:\["([A-Za-z0-9_-]+)"\]|\.([A-Za-z0-9_]+))')
VAR_ONLY_REF = re.compile(r"var\.([A-Za-z_][A-Za-z0-9_-]*)")
MERGE_CALL = re.compile(r"merge\((.*)\)", re.S)
VAR_REF = re.compile(r"(?<![\w.])var\.([A-Za-z_][A-Za-z0-9_-]*)")
MODULE_REF = re.compile(r"(?<![\w.])module\.([A-Za-z_][A-Za-z0-9_-]*)(?:\[[^\]]*\])?(?:\.([A-Za-z_][A-Za-z0-9_-]*))?")
DATA_REF = re.compile(r"(?<![\w.])data\.([a-z][a-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_-]*)")
RESOURCE_REF = re.compile(r"(?<![\w.\"])((?:aws|random|tls|kafka)_[a-z0-9_]+)\.([A-Za-z_][A-Za-z0-9_-]*)")
# aws_iam_policy_document blocks (module directory, data source name) that may allow kms:Decrypt
# without kms:ViaService, and why. Workload roles (IRSA, Lambda, RDS Proxy) never belong here.
KMS_DECRYPT_UNSCOPED = {
    ("eks", "cluster_kms"): "the EKS cluster role: the control plane calls KMS itself for envelope "
    "encryption of Kubernetes secrets",
    ("ecr", "template"): "assumed by ECR itself (repository creation template) to encrypt the "
    "replicated repositories with the replica key",
}
KMS_DECRYPT_ACTIONS = {"*", "kms:*", "kms:decrypt", "kms:decrypt*", "kms:de*", "kms:d*"}
# server.properties lines of an MSK configuration: `key=value`.
PROPERTY = re.compile(r"^\s*([A-Za-z0-9._-]+)\s*=\s*(.*?)\s*$", re.M)
VAR_ONLY = re.compile(r"^\$\{var\.([A-Za-z_][A-Za-z0-9_-]*)\}$")
# `${var.X ? "true" : "false"}`: true only while var.X is.
VAR_SWITCH = re.compile(r'^\$\{var\.([A-Za-z_][A-Za-z0-9_-]*)\s*\?\s*"true"\s*:\s*"false"\s*\}$')
SAME_SIZE_PROPERTIES = ("message.max.bytes", "replica.fetch.max.bytes")
# Terraform variables holding the Kafka names per region (maps keyed region1, region2), and where
# each region's overlay sets them: (variable, ConfigMap of the overlay, literal, whose key: the
# overlay's own region or the other one).
KAFKA_NAME_VARIABLES = (
    ("kafka_topics", "tandem-outbox-relay-config", "KAFKA_TOPIC", "own"),
    ("kafka_topics", "tandem-region2-consumer-config", "KAFKA_TOPIC", "other"),
    ("consumer_groups", "tandem-region2-consumer-config", "KAFKA_GROUP_ID", "own"),
)
OVERLAY_REGION = re.compile(r"^region[0-9]+$")
INSTANCE_KEY = re.compile(r"\[[^\]]*\]")
# Paths a public listener must never forward (the services' Prometheus endpoint).
INTERNAL_PATHS = ("/metrics", "/metrics/*")
LOCAL_ONLY = re.compile(r"^\$\{local\.([A-Za-z0-9_]+)\}$")
LISTENER_ARN = re.compile(r"^\$\{aws_lb_listener\.([A-Za-z0-9_-]+)\.arn\}$")
# `terraform plan ... -out=FILE` (or `-out FILE`) in a workflow step.
PLAN_OUT = re.compile(r"terraform\s+plan\b[^\n]*?-out[= ]\s*([^\s;|&]+)")
SAME_REPOSITORY = "github.event.pull_request.head.repo.full_name == github.repository"
# Comments, and (harmlessly: it only hides references) the rest of a line after `//` in a URL.
COMMENT = re.compile(r"/\*.*?\*/|(?:#|//)[^\n]*", re.S)
# `moved { ... }` and `removed { ... }` blocks (their bodies hold no braces).
STATE_BLOCK = re.compile(r"^[ \t]*(?:moved|removed)[ \t]*\{[^{}]*\}", re.M)
# One step of a moved block's address: module.NAME or TYPE.NAME, with an optional [key].
ADDRESS_STEP = re.compile(r'(module|[a-z][a-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_-]*)(?:\[[^\]]*\])?(?:\.|$)')


@dataclass
class ModuleInterface:
    """What a module directory declares: its inputs and required provider aliases."""

    variables: dict[str, bool] = field(default_factory=dict)  # name -> required (no default)
    provider_aliases: set[str] = field(default_factory=set)  # e.g. {"aws.replica"}


def unquote(value: object) -> str:
    """python-hcl2 >= 7 keeps the quotes of string literals and block labels; older ones do not."""
    text = str(value)
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        return text[1:-1]
    return text


def interpolated(value: object) -> str:
    """`${aws.region1}` -> `aws.region1` (references in a providers map)."""
    text = unquote(value)
    if text.startswith("${") and text.endswith("}"):
        return text[2:-1]
    return text


def labelled_blocks(parsed: dict, kind: str) -> list[tuple[str, dict]]:
    """[(label, body)] of every `kind "label" { ... }` block in a parsed file."""
    blocks = []
    for entry in parsed.get(kind, []):
        for label, body in entry.items():
            if label.startswith("__"):
                continue
            blocks.append((unquote(label), body if isinstance(body, dict) else {}))
    return blocks


def body_keys(body: dict) -> set[str]:
    return {key for key in body if not key.startswith("__")}


def first_block(body: dict, key: str) -> dict:
    """The first `key { ... }` block of a body (python-hcl2 gives blocks as lists of dicts)."""
    value = body.get(key)
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return value[0]
    return value if isinstance(value, dict) else {}


REQUIRED = object()  # a variable without a default


def overlay_literals(eks: Path) -> dict[str, dict[tuple[str, str], str]]:
    """Region -> {(ConfigMap, KEY): value} of the configMapGenerator literals of each region's own
    overlay (eks/overlays/regionN/kustomization.yaml)."""
    found: dict[str, dict[tuple[str, str], str]] = {}
    overlays = eks / "overlays"
    if not overlays.is_dir():
        return found
    for path in sorted(overlays.glob("*/kustomization.yaml")):
        if not OVERLAY_REGION.match(path.parent.name):
            continue
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            continue
        literals = found.setdefault(path.parent.name, {})
        for generator in document.get("configMapGenerator") or []:
            for literal in generator.get("literals") or []:
                key, _, value = str(literal).partition("=")
                literals[(str(generator.get("name")), key)] = value
    return found


def policy_statements(body: dict) -> list[dict]:
    """The statements of an aws_iam_policy_document body, dynamic ones included."""
    statements = [s for s in body.get("statement", []) if isinstance(s, dict)]
    for dynamic in body.get("dynamic", []):
        for label, block in dynamic.items():
            if unquote(label) == "statement" and isinstance(block, dict):
                statements += [s for s in block.get("content", []) if isinstance(s, dict)]
    return statements


def string_list(value: object, local_values: dict) -> list[str] | None:
    """A list of string literals, directly or through `local.X`; None when not literal."""
    if isinstance(value, str):
        match = LOCAL_ONLY.match(value)
        if not match:
            return None
        value = local_values.get(match.group(1))
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        return None
    return [unquote(item) for item in value]


def split_arguments(text: str) -> list[str] | None:
    """The top-level comma-separated parts of an HCL expression list (function arguments, object
    items); None when its brackets, braces or quotes do not balance."""
    closers = {"(": ")", "[": "]", "{": "}"}
    parts: list[str] = []
    stack: list[str] = []
    start = i = 0
    while i < len(text):
        c = text[i]
        if stack and stack[-1] == '"':  # inside a string: only escapes, ${ and its end matter
            if c == "\\":
                i += 2
                continue
            if text.startswith("${", i):
                stack.append("}")
                i += 2
                continue
            if c == '"':
                stack.pop()
        elif c == '"':
            stack.append('"')
        elif c in closers:
            stack.append(closers[c])
        elif c in ")]}":
            if not stack or stack[-1] != c:
                return None
            stack.pop()
        elif c == "," and not stack:
            parts.append(text[start:i].strip())
            start = i + 1
        i += 1
    if stack:
        return None
    if text[start:].strip():
        parts.append(text[start:].strip())
    return parts


def unwrap_interpolation(text: str) -> str:
    """`${expr}` -> `expr` when the whole text is one interpolation (python-hcl2 wraps every
    expression that way)."""
    if text.startswith("${") and text.endswith("}") and split_arguments(text[2:-1]) is not None:
        return text[2:-1].strip()
    return text


def lambda_env_problems(binary: str, keys: set[str]) -> list[str]:
    """What is wrong with a Lambda function of `binary` whose environment sets exactly `keys`."""
    problems = env_contract.env_problems(binary, keys, aws=True, not_applicable=LAMBDA_NOT_APPLICABLE)
    for name, why in LAMBDA_REQUIRED.items():
        if name not in keys:
            problems.append(f"does not set {name} ({why})")
    return [f"Lambda environment {problem}" for problem in problems]


def lambda_binary(body: dict) -> str | None:
    """The binary a modules/lambda call deploys: the key of var.lambda_zip_paths, else the
    function name's suffix."""
    match = ZIP_KEY.search(str(body.get("zip_path", ""))) or NAME_SUFFIX.search(str(body.get("function_name", "")))
    return LAMBDA_BINARIES.get(match.group(1)) if match else None


def workflow_triggers(workflow: dict) -> set[str]:
    """The events of a workflow's `on:` (PyYAML reads the bare key `on` as the boolean True)."""
    on = workflow.get("on", workflow.get(True))
    if isinstance(on, str):
        return {on}
    if isinstance(on, list):
        return {str(event) for event in on}
    if isinstance(on, dict):
        return {str(event) for event in on}
    return set()


def plan_workflow_problems(workflow: dict, repository: Path | None = None) -> list[str]:
    """What is wrong with a GitHub workflow, as far as Terraform plans and their role go
    (`repository`: the checkout, to tell a literal directory upload from a file)."""
    problems: list[str] = []
    triggers = workflow_triggers(workflow)
    if "pull_request_target" in triggers:
        problems.append(
            "triggers on pull_request_target, which runs with the base repository's secrets and "
            "OIDC token for pull requests from forks"
        )
    top_permissions = workflow.get("permissions") or {}
    for job_name, job in (workflow.get("jobs") or {}).items():
        if not isinstance(job, dict):
            continue
        permissions = job.get("permissions", top_permissions) or {}
        oidc = isinstance(permissions, dict) and permissions.get("id-token") == "write"
        oidc = oidc or permissions == "write-all"
        if oidc and triggers & {"pull_request", "pull_request_target"}:
            if SAME_REPOSITORY not in str(job.get("if", "")):
                problems.append(
                    f"job {job_name!r} can get an OIDC token on a pull request but its `if` does not "
                    f"require `{SAME_REPOSITORY}`"
                )
            if not job.get("environment"):
                problems.append(
                    f"job {job_name!r} can get an OIDC token on a pull request but names no "
                    "environment (the subject the plan role trusts, gated by its protection rules)"
                )
        steps = [step for step in job.get("steps") or [] if isinstance(step, dict)]
        plan_files: set[str] = set()
        for step in steps:
            script = str(step.get("run", ""))
            for plan_file in PLAN_OUT.findall(script):
                plan_file = plan_file.strip("'\"")
                plan_files.add(plan_file)
                if not re.search(rf"\brm\s+(?:-[a-z]+\s+)*[^\n]*(?<![\w.-]){re.escape(plan_file)}(?![\w.-])", script):
                    problems.append(
                        f"job {job_name!r}: the step writing the binary plan {plan_file!r} does not delete it "
                        f"(rm it in the same step, e.g. trap 'rm -f {plan_file}' EXIT)"
                    )
        if not plan_files:
            continue
        for step in steps:
            if not str(step.get("uses", "")).startswith("actions/upload-artifact"):
                continue
            paths = str((step.get("with") or {}).get("path", ""))
            for entry in (line.strip() for line in paths.splitlines()):
                if not entry or entry.startswith("#"):
                    continue
                if entry.startswith("!"):  # an exclusion uploads nothing
                    continue
                last = entry.rstrip("/").rsplit("/", 1)[-1]
                if last in plan_files:
                    problems.append(
                        f"job {job_name!r} uploads the binary plan {entry!r}: it holds every sensitive value "
                        "the plan read; upload `terraform show -no-color` text instead"
                    )
                elif (
                    entry.endswith("/")
                    or any(c in last for c in "*?[")
                    or last.startswith("${{")
                    or (repository is not None and (repository / entry).is_dir())
                ):
                    problems.append(
                        f"job {job_name!r} uploads {entry!r}, which is not a single named file and could include "
                        f"the binary plan ({', '.join(sorted(plan_files))}); name the text files to upload"
                    )
    return problems


class Checker:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.problems: list[str] = []
        self.parsed: dict[Path, dict] = {}
        self.checked_modules = 0
        self.checked_calls = 0
        self.checked_workflows = 0

    def problem(self, where: Path | str, message: str) -> None:
        location = where.relative_to(self.root.parent) if isinstance(where, Path) else where
        self.problems.append(f"{location}: {message}")

    # -- parsing -----------------------------------------------------------------------------

    def parse_all(self) -> None:
        for path in sorted(self.root.rglob("*.tf")):
            if ".terraform" in path.parts:
                continue
            try:
                with path.open(encoding="utf-8") as handle:
                    self.parsed[path] = hcl2.load(handle)
            except Exception as error:  # noqa: BLE001 - any parser failure is a finding
                self.problem(path, f"does not parse: {error}")

    def files_in(self, directory: Path) -> list[tuple[Path, dict]]:
        return [(path, parsed) for path, parsed in self.parsed.items() if path.parent == directory]

    # -- per-file rules ----------------------------------------------------------------------

    def check_variables_and_outputs(self) -> None:
        for path, parsed in self.parsed.items():
            for name, body in labelled_blocks(parsed, "variable"):
                if "type" not in body:
                    self.problem(path, f'variable "{name}" has no type')
                if not unquote(body.get("description", "")).strip():
                    self.problem(path, f'variable "{name}" has no description')
            for name, body in labelled_blocks(parsed, "output"):
                if not unquote(body.get("description", "")).strip():
                    self.problem(path, f'output "{name}" has no description')

    # -- modules -----------------------------------------------------------------------------

    def interface(self, directory: Path) -> ModuleInterface:
        interface = ModuleInterface()
        for _, parsed in self.files_in(directory):
            for name, body in labelled_blocks(parsed, "variable"):
                interface.variables[name] = "default" not in body
            for terraform in parsed.get("terraform", []):
                for providers in terraform.get("required_providers", []):
                    for provider, spec in providers.items():
                        if provider.startswith("__") or not isinstance(spec, dict):
                            continue
                        for alias in spec.get("configuration_aliases", []):
                            interface.provider_aliases.add(interpolated(alias))
        return interface

    def check_module_directories(self) -> None:
        modules_dir = self.root / "modules"
        if not modules_dir.is_dir():
            self.problem(modules_dir, "missing")
            return
        for directory in sorted(p for p in modules_dir.iterdir() if p.is_dir()):
            self.checked_modules += 1
            for name in MODULE_FILES:
                if not (directory / name).is_file():
                    self.problem(directory, f"module has no {name}")
            self.check_provider_pins(directory)
            main = directory / "main.tf"
            if main.is_file() and BANNER not in main.read_text(encoding="utf-8"):
                self.problem(main, "no banner comment (a line of #) splitting it into sections")

    def check_provider_pins(self, directory: Path) -> None:
        versions = directory / "versions.tf"
        parsed = self.parsed.get(versions)
        if parsed is None:
            return
        pinned_any = False
        for terraform in parsed.get("terraform", []):
            if "required_version" not in terraform:
                self.problem(versions, "terraform block has no required_version")
            for providers in terraform.get("required_providers", []):
                for provider, spec in providers.items():
                    if provider.startswith("__"):
                        continue
                    pinned_any = True
                    if not isinstance(spec, dict) or not unquote(spec.get("version", "")).strip():
                        self.problem(versions, f'provider "{provider}" has no version constraint')
                    elif not isinstance(spec, dict) or "source" not in spec:
                        self.problem(versions, f'provider "{provider}" has no source')
        if not pinned_any:
            self.problem(versions, "no required_providers")

    def check_module_calls(self) -> None:
        interfaces: dict[Path, ModuleInterface] = {}
        for path, parsed in self.parsed.items():
            for name, body in labelled_blocks(parsed, "module"):
                source = unquote(body.get("source", ""))
                if not source.startswith(("./", "../")):
                    continue  # registry or remote modules are not checked offline
                self.checked_calls += 1
                target = (path.parent / source).resolve()
                where = f"{path.relative_to(self.root.parent)} module \"{name}\""
                if not target.is_dir():
                    self.problem(where, f"source {source} is not a directory")
                    continue
                if target not in interfaces:
                    interfaces[target] = self.interface(target)
                interface = interfaces[target]

                passed = body_keys(body) - META_ARGUMENTS
                for unknown in sorted(passed - interface.variables.keys()):
                    self.problem(where, f'passes "{unknown}", which {source} does not declare')
                required = {var for var, is_required in interface.variables.items() if is_required}
                for missing in sorted(required - passed):
                    self.problem(where, f'does not pass required variable "{missing}" of {source}')

                providers = body.get("providers", {})
                if isinstance(providers, list):  # older parsers wrap maps in lists
                    providers = providers[0] if providers else {}
                passed_providers = {interpolated(key) for key in providers}
                for alias in sorted(interface.provider_aliases - passed_providers):
                    self.problem(where, f'does not pass provider "{alias}" required by {source}')

    def check_references(self) -> None:
        directories = sorted({path.parent for path in self.parsed})
        outputs: dict[Path, set[str]] = {}

        def outputs_of(directory: Path) -> set[str]:
            if directory not in outputs:
                outputs[directory] = {
                    name for _, parsed in self.files_in(directory) for name, _ in labelled_blocks(parsed, "output")
                }
            return outputs[directory]

        for directory in directories:
            files = self.files_in(directory)
            variables = {name for _, parsed in files for name, _ in labelled_blocks(parsed, "variable")}
            local_names = set(self.locals_in(directory))
            modules = {
                name: unquote(body.get("source", ""))
                for _, parsed in files
                for name, body in labelled_blocks(parsed, "module")
            }
            declared: dict[str, set[tuple[str, str]]] = {"resource": set(), "data": set()}
            for kind in declared:
                for _, parsed in files:
                    for entry in parsed.get(kind, []):
                        for type_name, named in entry.items():
                            if isinstance(named, dict):
                                declared[kind] |= {
                                    (unquote(type_name), unquote(n)) for n in named if not n.startswith("__")
                                }
            for path, _ in files:
                # moved/removed blocks name addresses, not values: check_moved_blocks checks them.
                text = STATE_BLOCK.sub("", COMMENT.sub("", path.read_text(encoding="utf-8")))
                for name in sorted(set(VAR_REF.findall(text)) - variables):
                    self.problem(path, f"var.{name} is not declared")
                for name in sorted(set(LOCAL_REF.findall(text)) - local_names):
                    self.problem(path, f"local.{name} is not defined")
                for name, output in sorted(set(MODULE_REF.findall(text))):
                    if name not in modules:
                        self.problem(path, f"module.{name} is not declared")
                        continue
                    source = modules[name]
                    if output and source.startswith(("./", "../")):
                        target = (directory / source).resolve()
                        if output not in outputs_of(target):
                            self.problem(path, f"module.{name}.{output}: {source} has no such output")
                for kind, pattern in (("data", DATA_REF), ("resource", RESOURCE_REF)):
                    for ref in sorted(set(pattern.findall(text)) - declared[kind]):
                        prefix = "data." if kind == "data" else ""
                        self.problem(path, f"{prefix}{ref[0]}.{ref[1]} is not declared")

    def declared_in(self, directory: Path, kind: str, type_name: str, name: str) -> dict | None:
        """The body of `module "name"` (kind module) or `resource "type" "name"` in a directory."""
        for _, parsed in self.files_in(directory):
            if kind == "module":
                for label, body in labelled_blocks(parsed, "module"):
                    if label == name:
                        return body
                continue
            for entry in parsed.get("resource", []):
                for found_type, named in entry.items():
                    if unquote(found_type) == type_name and isinstance(named, dict):
                        for label, body in named.items():
                            if unquote(label) == name:
                                return body if isinstance(body, dict) else {}
        return None

    def resolve_address(self, directory: Path, address: str) -> str | None:
        """None when `address` (module.a.module.b, module.a.aws_x.y, ...) names something the
        configuration declares from `directory`, else why not."""
        steps = []
        rest = address
        while rest:
            match = ADDRESS_STEP.match(rest)
            if not match:
                return f"cannot parse {rest!r}"
            steps.append((match.group(1), match.group(2)))
            rest = rest[match.end():]
        for index, (kind, name) in enumerate(steps):
            if kind == "module":
                body = self.declared_in(directory, "module", "", name)
                if body is None:
                    return f"{directory.relative_to(self.root.parent)} declares no module \"{name}\""
                source = unquote(body.get("source", ""))
                if not source.startswith(("./", "../")):
                    return None  # a registry module: not followed offline
                directory = (directory / source).resolve()
            else:
                if index != len(steps) - 1:
                    return f"{kind}.{name} is not the last step"
                if self.declared_in(directory, "resource", kind, name) is None:
                    return f"{directory.relative_to(self.root.parent)} declares no {kind}.{name}"
        return None

    def check_moved_blocks(self) -> None:
        """Every moved block's `to` resolves in the configuration, and its `from` no longer does
        (Terraform refuses a move from an object that still exists; a `to` that resolves to
        nothing would move state to an address that the next plan destroys)."""
        for path, parsed in self.parsed.items():
            sources: dict[str, str] = {}
            for block in parsed.get("moved", []):
                if not isinstance(block, dict):
                    continue
                source, target = (interpolated(block.get(key, "")) for key in ("from", "to"))
                where = f"{path.relative_to(self.root.parent)} moved {{ from = {source} }}"
                if source in sources:
                    self.problem(where, f"moved twice (also to {sources[source]})")
                sources[source] = target
                rekey = INSTANCE_KEY.sub("", source) == INSTANCE_KEY.sub("", target) and source != target
                if not rekey and self.resolve_address(path.parent, source) is None:
                    self.problem(where, f"{source} is still declared: nothing moves")
                why = self.resolve_address(path.parent, target)
                if why is not None:
                    self.problem(where, f"to = {target} does not resolve: {why}")

    def locals_in(self, directory: Path) -> dict:
        values: dict = {}
        for _, parsed in self.files_in(directory):
            for block in parsed.get("locals", []):
                values.update({k: v for k, v in block.items() if not k.startswith("__")})
        return values

    def call_chains(self, directory: Path, seen: tuple[Path, ...] = ()) -> list[tuple[tuple[Path, str, dict], ...]]:
        """Every chain of module calls (outermost first) that instantiates `directory`: one empty
        chain for a directory nothing calls (a root module)."""
        chains: list[tuple[tuple[Path, str, dict], ...]] = []
        callers = [call for call in self.module_calls_of(directory) if call[0].parent not in seen]
        if not callers:
            return [()]
        for call in callers:
            for chain in self.call_chains(call[0].parent, (*seen, directory)):
                chains.append((*chain, call))
        return chains

    def map_keys(self, directory: Path, value: object, chain: tuple, depth: int = 0) -> tuple[set[str], list[str]]:
        """(keys, problems) of a map expression in `directory`, as instantiated through `chain`:
        a map literal, `local.X`, `local.X["k"]` (an entry of a map literal), `var.X` (followed to what the innermost call of `chain` passes,
        or the variable's default) or `merge()` of those; anything else is a problem (the rule
        cannot see its keys)."""
        if depth > 20:
            return set(), ["environment: references nest too deep (a cycle?)"]
        if value is None:
            return set(), []
        if isinstance(value, dict):
            return {unquote(key) for key in value if not key.startswith("__")}, []
        text = unwrap_interpolation(str(value).strip())
        merge = MERGE_CALL.fullmatch(text)
        if merge:
            arguments = split_arguments(merge.group(1))
            if arguments is None:
                return set(), [f"environment: cannot split the arguments of {text!r}"]
            keys: set[str] = set()
            problems: list[str] = []
            for argument in arguments:
                more, found = self.map_keys(directory, argument, chain, depth + 1)
                keys |= more
                problems += found
            return keys, problems
        if text.startswith("{") and text.endswith("}") and split_arguments(text[1:-1]) is not None:
            return set(ENV_KEY.findall(text)), []
        entry = LOCAL_ENTRY_REF.fullmatch(text)
        if entry:
            name, key = entry.group(1), entry.group(2) or entry.group(3)
            local_values = self.locals_in(directory)
            outer = local_values.get(name)
            if not isinstance(outer, dict):
                return set(), [f"environment uses local.{name}[{key!r}], but local.{name} is no map literal"]
            entries = {unquote(k): v for k, v in outer.items() if not k.startswith("__")}
            if key not in entries:
                return set(), [f"environment uses local.{name}[{key!r}], which local.{name} does not have"]
            return self.map_keys(directory, entries[key], chain, depth + 1)
        local = LOCAL_ONLY_REF.fullmatch(text)
        if local:
            local_values = self.locals_in(directory)
            if local.group(1) not in local_values:
                return set(), [f"environment uses local.{local.group(1)}, which is not defined"]
            return self.map_keys(directory, local_values[local.group(1)], chain, depth + 1)
        variable = VAR_ONLY_REF.fullmatch(text)
        if variable:
            name = variable.group(1)
            where = self.root.parent
            if not chain:
                return set(), [
                    f"environment uses var.{name}, but nothing calls {directory.relative_to(where)} "
                    "to pass it (the rule follows module inputs to the calls that set them)"
                ]
            call_path, call_name, call_body = chain[-1]
            if name in call_body:
                return self.map_keys(call_path.parent, call_body[name], chain[:-1], depth + 1)
            default = self.variable_defaults(directory).get(name, REQUIRED)
            if isinstance(default, dict):
                return self.map_keys(directory, default, chain, depth + 1)
            return set(), [
                f'environment uses var.{name}, which {call_path.relative_to(where)} module "{call_name}" '
                "does not pass and whose default is no map literal"
            ]
        return set(), [
            f"environment: cannot tell the keys of {text!r} (use map literals, local.X, var.X and merge() of them)"
        ]

    def calls_lambda_module(self, path: Path, body: dict) -> bool:
        """Whether a module block (in file `path`) calls one of LAMBDA_MODULES, by the directory its
        source resolves to: ../../modules/lambda from a deployment, ../lambda from a module."""
        source = unquote(body.get("source", ""))
        if not source.startswith(("./", "../")):
            return False
        target = (path.parent / source).resolve()
        return any(target == (self.root / module).resolve() for module in LAMBDA_MODULES)

    def check_lambda_environments(self) -> None:
        for path, parsed in self.parsed.items():
            for name, body in labelled_blocks(parsed, "module"):
                if not self.calls_lambda_module(path, body):
                    continue
                where = f"{path.relative_to(self.root.parent)} module \"{name}\""
                binary = lambda_binary(body)
                if binary is None:
                    self.problem(where, f"cannot tell which binary it deploys (zip_path key or function_name suffix in {sorted(LAMBDA_BINARIES)})")
                    continue
                # A module that calls modules/lambda with environment values from its own inputs
                # (modules/region) is checked once per call of it, with what that call passes.
                for chain in self.call_chains(path.parent):
                    via = "".join(
                        f' (via {call_path.relative_to(self.root.parent)} module "{call_name}")'
                        for call_path, call_name, _ in reversed(chain)
                    )
                    keys, problems = self.map_keys(path.parent, body.get("environment"), chain)
                    for message in problems:
                        self.problem(where + via, message)
                    if problems:
                        continue
                    for message in lambda_env_problems(binary, keys):
                        self.problem(where + via, f"{binary}: {message}")

    # -- IAM -----------------------------------------------------------------------------------

    def check_kms_decrypt_scoped(self) -> None:
        for path, parsed in self.parsed.items():
            directory = path.parent.name
            for entry in parsed.get("data", []):
                for type_name, named in entry.items():
                    if unquote(type_name) != "aws_iam_policy_document" or not isinstance(named, dict):
                        continue
                    for name, body in named.items():
                        if name.startswith("__") or not isinstance(body, dict):
                            continue
                        name = unquote(name)
                        if (directory, name) in KMS_DECRYPT_UNSCOPED:
                            continue
                        for statement in policy_statements(body):
                            if statement.get("principals") or unquote(statement.get("effect", "Allow")) == "Deny":
                                continue  # a resource policy (key policy), or a deny
                            actions = statement.get("actions", [])
                            if not isinstance(actions, list):
                                continue
                            if not {unquote(a).lower() for a in actions} & KMS_DECRYPT_ACTIONS:
                                continue
                            conditions = statement.get("condition", [])
                            scoped = isinstance(conditions, list) and any(
                                isinstance(c, dict)
                                and unquote(c.get("variable", "")) == "kms:ViaService"
                                and unquote(c.get("test", "")) in ("StringEquals", "StringLike")
                                and c.get("values")
                                for c in conditions
                            )
                            if not scoped:
                                sid = unquote(statement.get("sid", "")) or "(no sid)"
                                self.problem(
                                    path,
                                    f'data "aws_iam_policy_document" "{name}" statement {sid} allows kms:Decrypt '
                                    "without a kms:ViaService condition (e.g. secretsmanager.<region>.amazonaws.com)",
                                )

    # -- Kafka ---------------------------------------------------------------------------------

    def variable_defaults(self, directory: Path) -> dict[str, object]:
        """name -> default (a marker object when the variable has none) of a directory's variables."""
        defaults: dict[str, object] = {}
        for _, parsed in self.files_in(directory):
            for name, body in labelled_blocks(parsed, "variable"):
                defaults[name] = body.get("default", REQUIRED)
        return defaults

    def module_calls_of(self, directory: Path) -> list[tuple[Path, str, dict]]:
        """(file, name, body) of every module block whose local source is `directory`."""
        calls = []
        for path, parsed in self.parsed.items():
            for name, body in labelled_blocks(parsed, "module"):
                source = unquote(body.get("source", ""))
                if source.startswith(("./", "../")) and (path.parent / source).resolve() == directory.resolve():
                    calls.append((path, name, body))
        return calls

    def check_msk_configurations(self) -> None:
        for path, parsed in self.parsed.items():
            for entry in parsed.get("resource", []):
                for type_name, named in entry.items():
                    if unquote(type_name) != "aws_msk_configuration" or not isinstance(named, dict):
                        continue
                    for name, body in named.items():
                        if name.startswith("__") or not isinstance(body, dict):
                            continue
                        where = f'{path.relative_to(self.root.parent)} aws_msk_configuration "{unquote(name)}"'
                        text = str(body.get("server_properties", ""))
                        properties = {key: value for key, value in PROPERTY.findall(text)}
                        self.check_msk_sizes(where, path.parent, properties)
                        self.check_msk_acl_default(where, path.parent, properties)

    def check_msk_sizes(self, where: str, directory: Path, properties: dict[str, str]) -> None:
        values = {key: properties.get(key) for key in SAME_SIZE_PROPERTIES}
        missing = [key for key, value in values.items() if value is None]
        if missing:
            self.problem(where, f"server_properties does not set {', '.join(missing)}")
            return
        if len(set(values.values())) != 1:
            self.problem(where, f"{' and '.join(SAME_SIZE_PROPERTIES)} differ ({values}); set both from one variable")
            return
        match = VAR_ONLY.match(next(iter(values.values())))
        if not match:
            self.problem(where, f"{SAME_SIZE_PROPERTIES[0]} is not a single variable (${{var.max_message_bytes}})")
            return
        default = self.variable_defaults(directory).get(match.group(1), REQUIRED)
        if not isinstance(default, int):
            self.problem(where, f"var.{match.group(1)} needs a literal numeric default (KAFKA_MAX_MESSAGE_BYTES)")

    def check_msk_acl_default(self, where: str, directory: Path, properties: dict[str, str]) -> None:
        key = "allow.everyone.if.no.acl.found"
        value = properties.get(key)
        if value is None:
            self.problem(where, f"server_properties does not set {key}=false (MSK's default lets every SCRAM user use every topic)")
            return
        if value == "false":
            return
        switch = VAR_SWITCH.match(value)
        if not switch:
            self.problem(where, f'{key}={value}: must be false, or ${{var.X ? "true" : "false"}} for a bootstrap switch')
            return
        variable = switch.group(1)
        if self.variable_defaults(directory).get(variable) is not False:
            self.problem(where, f"{key} follows var.{variable}, whose default must be false")
        for path, call, body in self.module_calls_of(directory):
            call_where = f'{path.relative_to(self.root.parent)} module "{call}"'
            if variable not in body or body[variable] is False:
                continue
            passed = VAR_ONLY.match(str(body[variable]))
            if not passed:
                self.problem(call_where, f"{variable} must be false or a variable defaulting to false, not {body[variable]!r}")
                continue
            root_variable = passed.group(1)
            if self.variable_defaults(path.parent).get(root_variable) is not False:
                self.problem(call_where, f"passes var.{root_variable} as {variable}: its default must be false")
            for tfvars in sorted(path.parent.glob("*.tfvars")):
                if re.search(rf"^\s*{re.escape(root_variable)}\s*=\s*true\b", tfvars.read_text(encoding="utf-8"), re.M):
                    self.problem(tfvars, f"sets {root_variable} = true: the cluster would let every SCRAM user use what no ACL covers")

    def check_kafka_names(self) -> None:
        overlays = overlay_literals(self.root.parent / "eks")
        if not overlays:
            return
        for path, parsed in self.parsed.items():
            for name, body in labelled_blocks(parsed, "variable"):
                if name not in {variable for variable, *_ in KAFKA_NAME_VARIABLES} or "default" not in body:
                    continue
                default = body["default"]
                if not isinstance(default, dict):
                    self.problem(path, f'variable "{name}" must default to a map keyed by region')
                    continue
                default = {unquote(k): unquote(v) for k, v in default.items()}
                if set(default) != set(overlays):
                    self.problem(
                        path,
                        f'variable "{name}" defaults to the regions {sorted(default)} but eks/overlays has {sorted(overlays)}',
                    )
                    continue
                for variable, config_map, setting, whose in KAFKA_NAME_VARIABLES:
                    if variable != name:
                        continue
                    for region, literals in sorted(overlays.items()):
                        others = sorted(set(overlays) - {region})
                        key = region if whose == "own" else (others[0] if len(others) == 1 else None)
                        if key is None:
                            self.problem(path, f'variable "{name}": "the other region" of {region} is ambiguous')
                            continue
                        value = literals.get((config_map, setting))
                        if value != default[key]:
                            self.problem(
                                path,
                                f'variable "{name}" defaults {key} to {default[key]!r} but eks/overlays/{region} sets '
                                f"{config_map} {setting}={value}: the Kafka ACLs would name another resource than "
                                "the workloads use",
                            )

    # -- load balancers ----------------------------------------------------------------------

    def check_listener_internal_paths(self) -> None:
        for directory in sorted({path.parent for path in self.parsed}):
            files = self.files_in(directory)
            local_values = self.locals_in(directory)
            listeners: list[tuple[Path, str, dict]] = []
            rules: dict[str, list[tuple[str, dict]]] = {}
            for path, parsed in files:
                for entry in parsed.get("resource", []):
                    for type_name, named in entry.items():
                        if not isinstance(named, dict):
                            continue
                        kind = unquote(type_name)
                        for name, body in named.items():
                            if name.startswith("__") or not isinstance(body, dict):
                                continue
                            if kind == "aws_lb_listener":
                                listeners.append((path, unquote(name), body))
                            elif kind == "aws_lb_listener_rule":
                                match = LISTENER_ARN.match(str(body.get("listener_arn", "")))
                                if match:
                                    rules.setdefault(match.group(1), []).append((unquote(name), body))
            for path, listener, body in listeners:
                action = first_block(body, "default_action")
                if unquote(action.get("type", "")) != "forward" and "forward" not in action:
                    continue
                where = f'{path.relative_to(self.root.parent)} aws_lb_listener "{listener}"'
                guards = [
                    (name, rule)
                    for name, rule in rules.get(listener, [])
                    if self.answers_internal_paths_with_404(rule, local_values)
                ]
                if not guards:
                    self.problem(
                        where,
                        f"forwards by default but has no aws_lb_listener_rule answering a fixed 404 for "
                        f"{' and '.join(INTERNAL_PATHS)} (the services' metrics must not be public)",
                    )
                    continue
                for name, rule in guards:
                    if "count" in rule or "for_each" in rule:
                        self.problem(where, f'rule "{name}" guarding {INTERNAL_PATHS[0]} must not have count or for_each')
                guard_priorities = [rule.get("priority") for _, rule in guards]
                if not all(isinstance(priority, int) for priority in guard_priorities):
                    self.problem(where, "the rule guarding /metrics needs a literal priority")
                    continue
                best = min(guard_priorities)
                for name, rule in rules.get(listener, []):
                    if any(rule is guard for _, guard in guards):
                        continue
                    priority = rule.get("priority")
                    if not isinstance(priority, int) or priority <= best:
                        self.problem(
                            where,
                            f'rule "{name}" (priority {priority}) is evaluated before the /metrics guard '
                            f"(priority {best}); the guard needs the lowest priority number",
                        )

    @staticmethod
    def answers_internal_paths_with_404(rule: dict, local_values: dict) -> bool:
        action = first_block(rule, "action")
        if unquote(action.get("type", "")) != "fixed-response":
            return False
        if unquote(first_block(action, "fixed_response").get("status_code", "")) != "404":
            return False
        conditions = rule.get("condition", [])
        if not isinstance(conditions, list) or len(conditions) != 1:
            return False  # conditions are ANDed: any other condition narrows the guard
        values = string_list(first_block(conditions[0], "path_pattern").get("values"), local_values)
        return values is not None and all(path in values for path in INTERNAL_PATHS)

    # -- the CI workflows that plan --------------------------------------------------------

    def check_plan_workflows(self) -> None:
        workflows = self.root.parent / ".github" / "workflows"
        if not workflows.is_dir():
            return
        for path in sorted([*workflows.glob("*.yml"), *workflows.glob("*.yaml")]):
            self.checked_workflows += 1
            try:
                workflow = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as error:
                self.problem(path, f"does not parse: {error}")
                continue
            for message in plan_workflow_problems(workflow, self.root.parent):
                self.problem(path, message)

    def run(self) -> int:
        self.parse_all()
        self.check_variables_and_outputs()
        self.check_module_directories()
        self.check_module_calls()
        self.check_references()
        self.check_moved_blocks()
        self.check_lambda_environments()
        self.check_kms_decrypt_scoped()
        self.check_msk_configurations()
        self.check_kafka_names()
        self.check_listener_internal_paths()
        self.check_plan_workflows()
        print(
            f"check_terraform: {len(self.parsed)} files, {self.checked_modules} modules, "
            f"{self.checked_calls} module calls, {self.checked_workflows} workflows checked"
        )
        for line in self.problems:
            print(f"  FAIL {line}")
        if self.problems:
            print(f"check_terraform: {len(self.problems)} problem(s)")
            return 1
        print("check_terraform: ok")
        return 0


def main(argv: list[str]) -> int:
    if len(argv) > 2:
        print(__doc__, file=sys.stderr)
        return 2
    default = Path(__file__).resolve().parent.parent / "terraform"
    root = Path(argv[1]).resolve() if len(argv) == 2 else default
    if not root.is_dir():
        print(f"check_terraform: no such directory {root}", file=sys.stderr)
        return 2
    try:
        env_contract.load()
    except env_contract.ContractError as error:
        print(f"check_terraform: cannot derive the environment contract from the sources: {error}")
        return 1
    return Checker(root).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
