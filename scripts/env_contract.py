#!/usr/bin/env python3
"""The environment contract of each Tandem binary, derived from the Rust sources.

Which variables a binary reads is not written down here: it is extracted from the code, so the
deployment checks (scripts/check_manifests.py for the EKS Deployments, scripts/check_terraform.py
for the Lambda functions) cannot drift from it. A deployment may set only variables its binary
reads (no stale setting) and must set every variable the binary requires (no missing setting).

What counts as a read (string literals only; comments are ignored):

* the helpers of shared/runtime/src/config.rs, qualified (`config::optional("X")`,
  `tandem_runtime::config::parsed_or::<u64>("X", ..)`) or unqualified inside config.rs itself and
  in files that import them by name: optional, required, parsed, parsed_or, flag, millis_or,
  secret;
* `std::env::var("X")` and `std::env::var_os("X")`;
* tracing-subscriber's `EnvFilter::from_default_env()` / `try_from_default_env()`, which read
  RUST_LOG;
* the AWS SDK's own standard variables (AWS_SDK_ENV below), which aws-config reads in every
  binary;
* the names in a `READ_BY_THE_SDK: &[&str]` table (shared/runtime/src/telemetry.rs): the
  OpenTelemetry SDK reads those itself, where no call of ours can be seen. telemetry.rs must
  keep that table.
* the names in ANNOUNCED below: a variable a binary is about to read, set by the deployment ahead
  of the code; load() fails once the sources read it, so the entry cannot outlive its reason.

A binary reads the variables of its own crate's sources plus those of the shared modules whose
settings its `Settings::from_env` composes (BINARIES below). That mapping is verified against the
code too: each crate must call exactly the `...Settings::from_env` of the shared files mapped to
it, and `telemetry::init()`; a shared file that reads variables but is mapped to no binary is an
error. Any mismatch, a missing file, a file that yields nothing or a call whose variable name is
not a literal makes this module fail loudly (ContractError) rather than guess.

"Required" combines the `config::required("X", ..)` calls, found automatically, with the
either/or rules of the code, which a regex cannot see and which are therefore written out below
(RULES, CONDITIONAL_REQUIRED), each with the source it restates and an anchor that must still be
found there.

Usage:
  env_contract.py              print, per binary, the variables it reads and which are required
  env_contract.py --self-test  check that the deployment checkers reject a stale and a missing
                               variable (needs PyYAML and jsonschema, as check_manifests.py does)
"""

from __future__ import annotations

import functools
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class ContractError(RuntimeError):
    """The sources no longer match what this module knows how to read: fix the module."""


# --- what each binary is made of ---------------------------------------------------------------


@dataclass(frozen=True)
class Binary:
    crate: str  # directory of the binary's crate; every .rs file under its src/ is scanned
    shared: tuple[str, ...]  # files under shared/ whose settings the binary loads


# file under shared/ -> the settings type whose from_env it defines (checked against each crate's
# Settings::from_env); telemetry.rs has no settings type: the crate must call telemetry::init().
SETTINGS_TYPES = {
    "runtime/src/config.rs": "ServiceSettings",
    "store/src/db.rs": "DatabaseSettings",
    "store/src/cache.rs": "CacheSettings",
    "http/src/auth.rs": "AuthSettings",
    "runtime/src/kafka.rs": "KafkaSettings",
}
TELEMETRY = "runtime/src/telemetry.rs"

BINARIES = {
    "tandem-write": Binary(
        "functions/write", ("runtime/src/config.rs", "store/src/db.rs", "store/src/cache.rs", "http/src/auth.rs", "runtime/src/telemetry.rs")
    ),
    "tandem-read": Binary(
        "functions/read", ("runtime/src/config.rs", "store/src/db.rs", "store/src/cache.rs", "http/src/auth.rs", "runtime/src/telemetry.rs")
    ),
    "tandem-outbox-relay": Binary(
        "functions/outbox-relay", ("runtime/src/config.rs", "store/src/db.rs", "runtime/src/kafka.rs", "runtime/src/telemetry.rs")
    ),
    "tandem-region2-consumer": Binary(
        "consumers/region2", ("runtime/src/config.rs", "store/src/db.rs", "store/src/cache.rs", "runtime/src/kafka.rs", "runtime/src/telemetry.rs")
    ),
    # Region 2's apply as a Lambda function: the event source mapping reads Kafka, so no
    # kafka.rs (KAFKA_TOPIC and KAFKA_TOPIC_PARTITIONS are read in the crate itself).
    "tandem-region2-apply-lambda": Binary(
        "consumers/region2-apply", ("runtime/src/config.rs", "store/src/db.rs", "store/src/cache.rs", "runtime/src/telemetry.rs")
    ),
}

# Read by the code but never set by a deployment.
EXCLUDED = {
    "AWS_LAMBDA_RUNTIME_API": "set by the Lambda runtime itself (shared/http/src/serve.rs picks the transport from it)",
}

# Announced: variables a binary is about to read, which a deployment sets ahead of the code
# (binary -> {variable: why}). Each counts as an optional read of that binary while its sources do
# not read it; once they do, load() fails loudly, so the entry is removed rather than forgotten.
ANNOUNCED: dict[str, dict[str, str]] = {}

# aws-config (Secrets Manager, RDS IAM tokens) reads these in every binary.
AWS_SDK_ENV = (
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_STS_REGIONAL_ENDPOINTS",
)

# --- the either/or rules, restated from the code -----------------------------------------------


@dataclass(frozen=True)
class Rule:
    """`exactly` (or at least) one of `names` must be set."""

    names: tuple[str, ...]
    exactly: bool
    binaries: tuple[str, ...] | None  # None: every binary that reads all of `names`
    source: str  # the file whose logic this restates
    anchor: str  # a regex that must still match in `source`, or the rule is stale
    aws_only: tuple[str, ...] = ()  # in AWS, exactly these of `names` (the others never)

    def describe(self) -> str:
        text = ("exactly one of " if self.exactly else "at least one of ") + ", ".join(self.names)
        if self.aws_only:
            text += f" (in AWS: {', '.join(self.aws_only)})"
        return f"{text}  [{self.source}]"


RULES = (
    # shared/store/src/db.rs, DatabaseSettings::from_env: `match (url, secret_id, iam_host)` accepts
    # exactly one credential source; none is ConfigError::Missing, several ConfigError::Invalid.
    Rule(
        names=("DATABASE_URL", "DATABASE_SECRET_ID", "DATABASE_IAM_HOST"),
        exactly=True,
        binaries=None,
        source="shared/store/src/db.rs",
        anchor=r"set exactly one of DATABASE_URL, DATABASE_SECRET_ID or DATABASE_IAM_HOST",
    ),
    # functions/write/src/lib.rs, AppState::build: `ensure!(auth.is_configured(), "writes need
    # authentication: set TANDEM_JWKS_URL (production) or TANDEM_JWT_HS256_SECRET (local)")`.
    # In AWS the JWKS of the Cognito pool; the HS256 secret is local development only
    # (AWS_FORBIDDEN below).
    Rule(
        names=("TANDEM_JWKS_URL", "TANDEM_JWT_HS256_SECRET"),
        exactly=False,
        binaries=("tandem-write",),
        source="functions/write/src/lib.rs",
        anchor=r"auth\.is_configured\(\)[\s\S]{0,200}TANDEM_JWKS_URL[\s\S]{0,100}TANDEM_JWT_HS256_SECRET",
        aws_only=("TANDEM_JWKS_URL",),
    ),
)

# shared/store/src/db.rs, DatabaseSettings::from_env: the `(None, None, Some(host))` arm is the only
# one that calls config::required("DATABASE_IAM_USER") and config::required("DATABASE_IAM_DBNAME"):
# they are required when DATABASE_IAM_HOST is set, and unused otherwise.
CONDITIONAL_REQUIRED = {
    "DATABASE_IAM_USER": "DATABASE_IAM_HOST",
    "DATABASE_IAM_DBNAME": "DATABASE_IAM_HOST",
}
CONDITIONAL_SOURCE = ("shared/store/src/db.rs", r"\(None,\s*None,\s*Some\(host\)\)\s*=>\s*CredentialSource::Iam")

# Never set in an AWS deployment (EKS manifests, Lambda functions).
AWS_FORBIDDEN = {"TANDEM_JWT_HS256_SECRET": "is for local development only"}

# --- extraction --------------------------------------------------------------------------------

HELPERS = ("optional", "required", "parsed_or", "parsed", "flag", "millis_or", "secret")
HELPER_CALL = re.compile(
    r"(?<![\w:.])(?P<path>(?:[A-Za-z_]\w*::)*config::)?"
    r"(?P<helper>" + "|".join(HELPERS) + r")\b\s*(?:::\s*<[^<>()]*>\s*)?\(\s*"
)
ENV_CALL = re.compile(r"(?<![\w.])(?:std::)?env::(?P<helper>var_os|var)\s*\(\s*")
DEFAULT_ENV_FILTER = re.compile(r"\bEnvFilter::(?:try_)?from_default_env\s*\(")
NAMED_ENV_FILTER = re.compile(r"\bEnvFilter::(?:try_)?from_env\s*\(\s*")
LITERAL = re.compile(r'"(?P<name>[^"\\]*)"')
SDK_TABLE = re.compile(r"\bconst\s+READ_BY_THE_SDK\s*:\s*&\[&str\]\s*=\s*&\[(?P<body>[^\]]*)\]")
VARIABLE_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
USE_HELPERS = re.compile(r"\buse\s+(?:[A-Za-z_]\w*::)*config::(?:\{(?P<many>[^}]*)\}|(?P<one>\w+))")
RAW_STRING = re.compile(r'b?r(#*)"')
CHAR_LITERAL = re.compile(r"'(?:\\(?:x[0-9a-fA-F]{2}|u\{[0-9a-fA-F]+\}|.)|[^\\'])'")
# The parameter of the helper definitions in config.rs (`std::env::var(name)`, `optional(name)`).
HELPER_PARAMETER = "name"


def strip_comments(text: str) -> str:
    """Blanks out // and /* */ comments (keeping line breaks and offsets), not string contents."""
    out = list(text)
    i, n = 0, len(text)

    def blank(start: int, end: int) -> None:
        for k in range(start, end):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            blank(i, end)
            i = end
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            blank(i, j)
            i = j
        elif (raw := RAW_STRING.match(text, i)) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            close = '"' + raw.group(1)
            end = text.find(close, raw.end())
            i = n if end < 0 else end + len(close)
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            i = j + 1
        elif c == "'":
            char = CHAR_LITERAL.match(text, i)
            i = char.end() if char else i + 1  # else a lifetime
        else:
            i += 1
    return "".join(out)


def imported_helpers(code: str) -> set[str]:
    names: set[str] = set()
    for match in USE_HELPERS.finditer(code):
        items = match.group("many") or match.group("one") or ""
        names |= {item.strip() for item in items.split(",")} & set(HELPERS)
    return names


def extract(text: str, rel: str) -> tuple[dict[str, list[str]], set[str]]:
    """(variable -> ["path:line", ...], variables passed to config::required) of one file."""
    code = strip_comments(text)
    in_config = rel == "shared/runtime/src/config.rs"
    unqualified = set(HELPERS) if in_config else imported_helpers(code)
    reads: dict[str, list[str]] = {}
    required: set[str] = set()

    def line_of(offset: int) -> str:
        return f"{rel}:{code.count(chr(10), 0, offset) + 1}"

    def literal_at(match: re.Match, what: str) -> str | None:
        literal = LITERAL.match(code, match.end())
        if literal is None:
            argument = re.match(r"[^,)]*", code[match.end():]).group(0).strip()
            if in_config and argument == HELPER_PARAMETER:
                return None  # inside a helper definition
            raise ContractError(f"{line_of(match.start())}: {what}({argument}) does not name its variable with a string literal")
        name = literal.group("name")
        if not VARIABLE_NAME.match(name):
            raise ContractError(f"{line_of(match.start())}: {what}({name!r}) is not an environment variable name")
        reads.setdefault(name, []).append(line_of(match.start()))
        return name

    for match in HELPER_CALL.finditer(code):
        helper = match.group("helper")
        if match.group("path") is None and helper not in unqualified:
            continue  # some other function of that name
        if re.search(r"\bfn\s*$", code[max(0, match.start() - 20):match.start()]):
            continue  # the helper's definition
        name = literal_at(match, f"config::{helper}")
        if name is not None and helper == "required":
            required.add(name)
    for match in ENV_CALL.finditer(code):
        literal_at(match, f"std::env::{match.group('helper')}")
    for match in NAMED_ENV_FILTER.finditer(code):
        literal_at(match, "EnvFilter::from_env")
    for match in DEFAULT_ENV_FILTER.finditer(code):
        reads.setdefault("RUST_LOG", []).append(line_of(match.start()) + " (EnvFilter default)")
    for table in SDK_TABLE.finditer(code):
        body = table.group("body")
        names = LITERAL.findall(body)
        if not names or re.sub(r'"[^"]*"|[\s,]', "", body):
            raise ContractError(f"{line_of(table.start())}: READ_BY_THE_SDK must list string literals only")
        for name in names:
            if not VARIABLE_NAME.match(name):
                raise ContractError(f"{line_of(table.start())}: READ_BY_THE_SDK lists {name!r}, not a variable name")
            reads.setdefault(name, []).append(line_of(table.start()) + " (read by the OpenTelemetry SDK)")
    return reads, required


# --- the contract ------------------------------------------------------------------------------


@dataclass
class Contract:
    binary: str
    reads: dict[str, list[str]] = field(default_factory=dict)  # variable -> where it is read
    required: set[str] = field(default_factory=set)  # must always be set
    conditional: dict[str, str] = field(default_factory=dict)  # variable -> variable that requires it
    rules: list[Rule] = field(default_factory=list)


def _read(root: Path, rel: str) -> str:
    path = root / rel
    if not path.is_file():
        raise ContractError(f"{rel} is missing: update BINARIES in scripts/env_contract.py")
    return path.read_text(encoding="utf-8")


def _merge(into: dict[str, list[str]], reads: dict[str, list[str]]) -> None:
    for name, where in reads.items():
        into.setdefault(name, []).extend(where)


RENAMED_TABLE = re.compile(r"pub const RENAMED: &\[\(&str, &str\)\] = &\[(?P<body>.*?)\];", re.S)
RENAMED_PAIR = re.compile(r'\(\s*"(?P<new>[A-Z0-9_]+)"\s*,\s*"(?P<old>[A-Z0-9_]+)"\s*\)')


@functools.lru_cache(maxsize=None)
def renamed(root: Path = ROOT) -> dict[str, str]:
    """Old name -> new name, from `RENAMED` in shared/runtime/src/config.rs. The services still
    read an old name (with a warning) for one release, but a deployment must use the new one."""
    text = _read(Path(root), "shared/runtime/src/config.rs")
    table = RENAMED_TABLE.search(text)
    if table is None:
        raise ContractError("shared/runtime/src/config.rs has no RENAMED table: update scripts/env_contract.py")
    return {m.group("old"): m.group("new") for m in RENAMED_PAIR.finditer(table.group("body"))}


@functools.lru_cache(maxsize=None)
def load(root: Path = ROOT) -> dict[str, Contract]:
    """Binary name -> Contract, from the sources under `root`. Raises ContractError."""
    root = Path(root)
    shared_reads: dict[str, tuple[dict[str, list[str]], set[str]]] = {}
    for path in sorted((root / "shared").glob("*/src/**/*.rs")):
        rel = path.relative_to(root).as_posix()
        shared_reads[path.relative_to(root / "shared").as_posix()] = extract(_read(root, rel), rel)

    mapped = {name for binary in BINARIES.values() for name in binary.shared}
    if not SDK_TABLE.search(strip_comments(_read(root, f"shared/{TELEMETRY}"))):
        raise ContractError(
            f"shared/{TELEMETRY} has no READ_BY_THE_SDK table: the variables the OpenTelemetry SDK "
            "reads would be invisible; update scripts/env_contract.py"
        )
    for name in sorted(mapped):
        if name not in shared_reads:
            raise ContractError(f"shared/{name} is missing: update BINARIES in scripts/env_contract.py")
        if not shared_reads[name][0]:
            raise ContractError(f"shared/{name} yields no environment variable: update scripts/env_contract.py")
    for name, (reads, _) in sorted(shared_reads.items()):
        unexplained = set(reads) - EXCLUDED.keys()
        if name not in mapped and unexplained:
            raise ContractError(
                f"shared/{name} reads {', '.join(sorted(unexplained))} but is mapped to no binary: "
                "update BINARIES (or EXCLUDED) in scripts/env_contract.py"
            )
    for name, type_name in SETTINGS_TYPES.items():
        if name in shared_reads and not re.search(rf"\bimpl\s+{type_name}\b", _read(root, f"shared/{name}")):
            raise ContractError(f"shared/{name} no longer implements {type_name}: update SETTINGS_TYPES")

    contracts: dict[str, Contract] = {}
    for binary_name, binary in BINARIES.items():
        contract = Contract(binary_name)
        crate_files = sorted((root / binary.crate / "src").rglob("*.rs"))
        if not crate_files:
            raise ContractError(f"{binary.crate}/src has no .rs files: update BINARIES in scripts/env_contract.py")
        crate_code = ""
        for path in crate_files:
            rel = path.relative_to(root).as_posix()
            text = _read(root, rel)
            crate_code += strip_comments(text)
            reads, required = extract(text, rel)
            _merge(contract.reads, reads)
            contract.required |= required
        if not contract.reads:
            raise ContractError(f"{binary.crate}/src yields no environment variable: update scripts/env_contract.py")

        composed = {t for t in SETTINGS_TYPES.values() if re.search(rf"\b{t}::from_env\s*\(", crate_code)}
        expected = {SETTINGS_TYPES[name] for name in binary.shared if name in SETTINGS_TYPES}
        if composed != expected:
            raise ContractError(
                f"{binary_name} ({binary.crate}) loads {sorted(composed)} but BINARIES maps it to "
                f"{sorted(expected)}: update BINARIES in scripts/env_contract.py"
            )
        calls_init = re.search(r"\btelemetry::init\s*\(", crate_code) is not None
        if calls_init != (TELEMETRY in binary.shared):
            raise ContractError(f"{binary_name}: telemetry::init() call and BINARIES disagree")

        for name in binary.shared:
            reads, required = shared_reads[name]
            _merge(contract.reads, reads)
            contract.required |= required
        for name in EXCLUDED:
            contract.reads.pop(name, None)
        for name, why in ANNOUNCED.get(binary_name, {}).items():
            if name in contract.reads:
                raise ContractError(
                    f"{binary_name} now reads {name} ({contract.reads[name][0]}): remove it from "
                    "ANNOUNCED in scripts/env_contract.py"
                )
            contract.reads[name] = [f"announced ({why})"]
        for name in AWS_SDK_ENV:
            contract.reads.setdefault(name, []).append("aws-config (the AWS SDK's standard variables)")
        contracts[binary_name] = contract

    _apply_rules(root, contracts)
    return contracts


def _apply_rules(root: Path, contracts: dict[str, Contract]) -> None:
    for rule in RULES:
        if not re.search(rule.anchor, strip_comments(_read(root, rule.source))):
            raise ContractError(f"rule '{rule.describe()}' no longer matches {rule.source}: review RULES")
        targets = rule.binaries or tuple(
            name for name, c in contracts.items() if set(rule.names) <= c.reads.keys()
        )
        if not targets:
            raise ContractError(f"rule '{rule.describe()}' applies to no binary: review RULES")
        for name in targets:
            missing = set(rule.names) - contracts[name].reads.keys()
            if missing:
                raise ContractError(f"rule '{rule.describe()}': {name} does not read {sorted(missing)}")
            contracts[name].rules.append(rule)

    source, anchor = CONDITIONAL_SOURCE
    if not re.search(anchor, strip_comments(_read(root, source))):
        raise ContractError(f"CONDITIONAL_REQUIRED no longer matches {source}: review it")
    for contract in contracts.values():
        for name, trigger in CONDITIONAL_REQUIRED.items():
            if trigger in contract.reads:
                if name not in contract.required:
                    raise ContractError(f"{name} is no config::required call of {contract.binary}: review CONDITIONAL_REQUIRED")
                contract.required.discard(name)
                contract.conditional[name] = trigger
        for rule in contract.rules:
            # A variable of an either/or rule is not required by itself.
            contract.required -= set(rule.names)


# --- the check the deployment checkers share ---------------------------------------------------


def env_problems(
    binary: str,
    names: set[str],
    *,
    aws: bool = True,
    not_applicable: dict[str, str] | None = None,
    contracts: dict[str, Contract] | None = None,
) -> list[str]:
    """What is wrong with a deployment of `binary` that sets exactly `names`.

    aws: the deployment runs in AWS (AWS_FORBIDDEN applies, rules take their AWS form).
    not_applicable: variable -> reason, variables the binary reads but this kind of deployment
    must not set (e.g. PORT under Lambda).
    """
    contracts = load() if contracts is None else contracts
    contract = contracts.get(binary)
    if contract is None:
        return [f"unknown binary {binary!r} (scripts/env_contract.py knows {', '.join(sorted(contracts))})"]
    not_applicable = dict(not_applicable or {})
    if aws:
        not_applicable.update(AWS_FORBIDDEN)
    problems: list[str] = []
    for name in sorted(names):
        if name in not_applicable:
            problems.append(f"sets {name}, which {not_applicable[name]}")
        elif name in renamed() and renamed()[name] in contract.reads:
            problems.append(f"sets {name}, an old name: rename it {renamed()[name]} (runtime/src/config.rs, RENAMED)")
        elif name not in contract.reads:
            problems.append(f"sets {name}, which {binary} does not read")
    for name in sorted(contract.required - names):
        problems.append(f"does not set {name}, which {binary} requires")
    for name, trigger in sorted(contract.conditional.items()):
        if trigger in names and name not in names:
            problems.append(f"sets {trigger} but not {name}, which {binary} then requires")
    for rule in contract.rules:
        has = names & set(rule.names)
        if aws and rule.aws_only:
            for name in sorted(set(rule.aws_only) - names):
                problems.append(f"does not set {name}, which {binary} requires in AWS ({rule.source})")
        elif rule.exactly and len(has) != 1:
            problems.append(f"needs exactly one of {list(rule.names)}, has {sorted(has)} ({rule.source})")
        elif not rule.exactly and not has:
            problems.append(f"needs at least one of {list(rule.names)} ({rule.source})")
    return problems


# --- command line ------------------------------------------------------------------------------


def print_contracts(contracts: dict[str, Contract]) -> None:
    for contract in contracts.values():
        print(f"{contract.binary} ({BINARIES[contract.binary].crate})")
        print("  required:")
        for name in sorted(contract.required):
            print(f"    {name}")
        for rule in contract.rules:
            print(f"    {rule.describe()}")
        for name, trigger in sorted(contract.conditional.items()):
            print(f"    {name} when {trigger} is set  [{CONDITIONAL_SOURCE[0]}]")
        print(f"  reads ({len(contract.reads)}):")
        width = max(len(name) for name in contract.reads)
        for name in sorted(contract.reads):
            print(f"    {name:<{width}}  {contract.reads[name][0]}")
        print()
    for binary, names in ANNOUNCED.items():
        for name, why in names.items():
            print(f"announced for {binary}, not read yet: {name} ({why})")
    print("never set by a deployment: " + ", ".join(f"{k} ({v})" for k, v in EXCLUDED.items()))
    print("never set in AWS: " + ", ".join(f"{k} ({v})" for k, v in AWS_FORBIDDEN.items()))


def self_test() -> int:
    """Negative tests: the deployment checkers must reject stale and missing variables."""
    failures: list[str] = []

    def expect(what: str, condition: bool, detail: object = "") -> None:
        print(f"  {'ok  ' if condition else 'FAIL'} {what}" + ("" if condition else f": {detail}"))
        if not condition:
            failures.append(what)

    # The extractor itself, on a snippet with the shapes the sources use.
    snippet = (
        "// config::optional(\"IN_A_COMMENT\")\n"
        "use crate::config::{self, optional};\n"
        "let a = config::parsed_or::<u64>(\n    \"MULTI_LINE\",\n    72,\n)?;\n"
        "let b = tandem_runtime::config::required(\"NEEDED\", \"a hint // not a comment\")?;\n"
        "let c = optional(\"IMPORTED\"); let d = other.flag(\"A_METHOD\");\n"
        "let e = std::env::var_os(\"DIRECT\"); let f = EnvFilter::try_from_default_env();\n"
        "pub const READ_BY_THE_SDK: &[&str] = &[\n    \"BY_SDK\", // why\n    \"ALSO_BY_SDK\",\n];\n"
    )
    reads, required = extract(snippet, "snippet.rs")
    expect(
        "extract: literals of qualified, multi-line, turbofish, imported and std::env calls, and READ_BY_THE_SDK",
        set(reads) == {"MULTI_LINE", "NEEDED", "IMPORTED", "DIRECT", "RUST_LOG", "BY_SDK", "ALSO_BY_SDK"}
        and required == {"NEEDED"},
        (sorted(reads), sorted(required)),
    )
    try:
        extract("pub const READ_BY_THE_SDK: &[&str] = &[NAME_CONST];", "snippet.rs")
        expect("extract: a READ_BY_THE_SDK entry that is not a literal fails loudly", False, "no ContractError")
    except ContractError:
        expect("extract: a READ_BY_THE_SDK entry that is not a literal fails loudly", True)
    try:
        extract("let x = config::optional(NAME_CONST);", "snippet.rs")
        expect("extract: a non-literal variable name fails loudly", False, "no ContractError")
    except ContractError:
        expect("extract: a non-literal variable name fails loudly", True)

    # The EKS rule of check_manifests.py, on in-memory Deployments.
    import check_manifests  # noqa: PLC0415 - needs PyYAML/jsonschema, only for the self-test

    def deployment(name: str, env: list[str]) -> dict:
        container = {
            "name": "app",
            "image": name,
            "env": [{"name": var, "value": "x"} for var in env],
            "envFrom": [{"configMapRef": {"name": "self-test"}}],
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}},
            "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
        }
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {"template": {"spec": {"terminationGracePeriodSeconds": 30, "containers": [container]}}},
        }

    def manifest_problems(name: str, env: list[str], config_map: dict[str, str]) -> list[str]:
        checker = check_manifests.Checker(overlay=False)
        checker.check_deployment("self-test", deployment(name, env), {"self-test": config_map})
        return checker.problems

    write_env = ["DATABASE_SECRET_ID", "TANDEM_JWKS_URL", "TANDEM_REGION"]
    write_map = {"REDIS_URL": "rediss://cache:6379", "RUST_LOG": "info"}
    relay_env = ["DATABASE_SECRET_ID", "KAFKA_BROKERS", "RELAY_BATCH_SIZE"]

    found = manifest_problems("tandem-write", write_env, write_map)
    expect("manifests: a complete tandem-write Deployment passes", not found, found)
    found = manifest_problems("tandem-outbox-relay", relay_env, {})
    expect("manifests: a complete tandem-outbox-relay Deployment passes", not found, found)

    found = manifest_problems("tandem-write", write_env + ["KAFKA_BROKERS"], write_map)
    expect(
        "manifests: stale KAFKA_BROKERS on tandem-write (read only by relay/consumer) is rejected",
        any("KAFKA_BROKERS" in p and "does not read" in p for p in found),
        found,
    )
    found = manifest_problems("tandem-outbox-relay", relay_env, {"TANDEM_MIGRATE_ON_START": "false"})
    expect(
        "manifests: stale TANDEM_MIGRATE_ON_START (via envFrom) on tandem-outbox-relay is rejected",
        any("TANDEM_MIGRATE_ON_START" in p and "does not read" in p for p in found),
        found,
    )
    found = manifest_problems("tandem-outbox-relay", relay_env + ["OUTBOX_RETENTION_HOURS"], {})
    expect(
        "manifests: a setting under its old name (OUTBOX_RETENTION_HOURS) is rejected with the new one",
        any("OUTBOX_RETENTION_HOURS" in p and "RELAY_OUTBOX_RETENTION_HOURS" in p for p in found),
        found,
    )
    found = manifest_problems("tandem-write", write_env, {k: v for k, v in write_map.items() if k != "REDIS_URL"})
    expect(
        "manifests: tandem-write missing the required REDIS_URL is rejected",
        any("REDIS_URL" in p and "requires" in p for p in found),
        found,
    )
    found = manifest_problems("tandem-outbox-relay", [v for v in relay_env if v != "KAFKA_BROKERS"], {})
    expect(
        "manifests: tandem-outbox-relay missing the required KAFKA_BROKERS is rejected",
        any("KAFKA_BROKERS" in p and "requires" in p for p in found),
        found,
    )
    found = manifest_problems("tandem-write", [v for v in write_env if v != "DATABASE_SECRET_ID"], write_map)
    expect(
        "manifests: tandem-write without a database credential source is rejected",
        any("exactly one of" in p for p in found),
        found,
    )
    found = manifest_problems("tandem-write", [v for v in write_env if v != "TANDEM_JWKS_URL"] + ["TANDEM_JWT_HS256_SECRET"], write_map)
    expect(
        "manifests: tandem-write with TANDEM_JWT_HS256_SECRET instead of TANDEM_JWKS_URL is rejected",
        any("TANDEM_JWT_HS256_SECRET" in p for p in found) and any("TANDEM_JWKS_URL" in p for p in found),
        found,
    )

    # The Lambda rule of check_terraform.py (needs python-hcl2, as that script does; the
    # virtualenv of scripts/check-deploy.sh has it).
    try:
        import check_terraform  # noqa: PLC0415
    except ModuleNotFoundError as error:
        print(f"  skip terraform: {error} (scripts/check-deploy.sh runs this with python-hcl2)")
        check_terraform = None

    if check_terraform is not None:
        lambda_env = {"TANDEM_REGION", "DATABASE_IAM_HOST", "DATABASE_IAM_USER", "DATABASE_IAM_DBNAME", "REDIS_URL", "TANDEM_JWKS_URL"}
        found = check_terraform.lambda_env_problems("tandem-write", lambda_env)
        expect("terraform: a complete Write Lambda environment passes", not found, found)
        found = check_terraform.lambda_env_problems("tandem-read", lambda_env | {"KAFKA_TOPIC", "PORT"})
        expect(
            "terraform: stale KAFKA_TOPIC and Lambda-ignored PORT on the Read Lambda are rejected",
            any("KAFKA_TOPIC" in p for p in found) and any("PORT" in p for p in found),
            found,
        )
        found = check_terraform.lambda_env_problems("tandem-read", lambda_env - {"DATABASE_IAM_DBNAME"})
        expect(
            "terraform: DATABASE_IAM_HOST without DATABASE_IAM_DBNAME on the Read Lambda is rejected",
            any("DATABASE_IAM_DBNAME" in p for p in found),
            found,
        )

        # The same rule through module inputs: a module (like modules/region) that calls
        # modules/lambda with an environment merged from its own variables is checked with what
        # each call of it passes, on small trees written for the test...
        module_tf = """
module "lambda_write" {
  source        = "../lambda"
  function_name = "${var.name}-write"
  zip_path      = var.lambda_zip_paths["write"]
  environment = merge(var.function_environment, var.extra_environment, {
    TANDEM_REGION       = var.name
    DATABASE_IAM_HOST   = "proxy"
    DATABASE_IAM_USER   = "tandem"
    DATABASE_IAM_DBNAME = "tandem"
    REDIS_URL           = "rediss://cache:6379"
  })
}
"""
        variables_tf = """
variable "name" {}
variable "lambda_zip_paths" {}
variable "function_environment" {}
variable "extra_environment" {
  default = {}
}
"""

        def deployment(environment: str) -> str:
            return f"""
locals {{
  environment = {environment}
}}

module "region1" {{
  source               = "../../modules/region"
  name                 = "region1"
  lambda_zip_paths     = {{ write = "write.zip" }}
  function_environment = local.environment
}}
"""

        def tree_problems(files: dict[str, str]) -> list[str]:
            with tempfile.TemporaryDirectory() as directory:
                root = Path(directory) / "terraform"
                for name, text in files.items():
                    (root / name).parent.mkdir(parents=True, exist_ok=True)
                    (root / name).write_text(text, encoding="utf-8")
                checker = check_terraform.Checker(root.resolve())
                checker.parse_all()
                checker.check_lambda_environments()
                return checker.problems

        region = {"modules/region/main.tf": module_tf, "modules/region/variables.tf": variables_tf}
        good = '{ TANDEM_JWKS_URL = "https://issuer/jwks.json", RUST_LOG = "info" }'
        found = tree_problems({**region, "deployments/x/main.tf": deployment(good)})
        expect("terraform: a module's Write Lambda, complete through the caller's input, passes", not found, found)
        stale = '{ TANDEM_JWKS_URL = "https://issuer/jwks.json", KAFKA_BROKERS = "b:9096" }'
        found = tree_problems({**region, "deployments/x/main.tf": deployment(stale)})
        expect(
            "terraform: stale KAFKA_BROKERS passed through a module input is rejected, naming the call",
            any("KAFKA_BROKERS" in p and 'via terraform/deployments/x/main.tf module "region1"' in p for p in found),
            found,
        )
        found = tree_problems({**region, "deployments/x/main.tf": deployment('merge({ RUST_LOG = "info" })')})
        expect(
            "terraform: the required TANDEM_JWKS_URL missing from a module input is rejected",
            any("TANDEM_JWKS_URL" in p and "requires" in p for p in found),
            found,
        )
        found = tree_problems(region)
        expect(
            "terraform: an environment input that no call passes is rejected, not skipped",
            any("nothing calls" in p and "var.function_environment" in p for p in found),
            found,
        )
        found = tree_problems({**region, "deployments/x/main.tf": deployment('jsondecode("{}")')})
        expect(
            "terraform: an environment whose keys cannot be seen is rejected, not skipped",
            any("cannot tell the keys" in p for p in found),
            found,
        )

        # ...and on a copy of this repository's own tree, whose Lambda functions live in
        # modules/region: a stale and a missing variable in the deployment's shared
        # environment must fail every function of both regions that gets it.
        source = ROOT / "terraform"
        deployment_main = "deployments/tandem/main.tf"
        text = (source / deployment_main).read_text(encoding="utf-8")
        stale_anchor = "  lambda_base_env = {\n"
        missing_line = re.search(r"^ *TANDEM_JWKS_URL *= *local\.jwks_url\n", text, re.M)
        expect(
            "terraform: the deployment still sets lambda_base_env and TANDEM_JWKS_URL (self-test anchors)",
            stale_anchor in text and missing_line is not None,
        )
        if stale_anchor in text and missing_line is not None:
            with tempfile.TemporaryDirectory() as directory:
                root = Path(directory) / "terraform"
                shutil.copytree(source, root, ignore=shutil.ignore_patterns(".terraform"))
                mutated = text.replace(missing_line.group(0), "")
                mutated = mutated.replace(stale_anchor, stale_anchor + '    KAFKA_BROKERS = "b:9096"\n')
                (root / deployment_main).write_text(mutated, encoding="utf-8")
                checker = check_terraform.Checker(root.resolve())
                checker.parse_all()
                checker.check_lambda_environments()
                found = checker.problems
            for call in ("region1", "region2"):
                via = f'via terraform/deployments/tandem/main.tf module "{call}"'
                expect(
                    f"terraform: this tree with stale KAFKA_BROKERS in lambda_base_env fails {call}'s Read function",
                    any("lambda_read" in p and via in p and "KAFKA_BROKERS" in p for p in found),
                    found,
                )
            expect(
                "terraform: this tree without TANDEM_JWKS_URL fails Region 1's Write function",
                any(
                    "lambda_write" in p and 'module "region1"' in p and "TANDEM_JWKS_URL" in p and "requires" in p
                    for p in found
                ),
                found,
            )

    if failures:
        print(f"env_contract self-test: {len(failures)} failure(s)")
        return 1
    print("env_contract self-test: ok")
    return 0


def main(argv: list[str]) -> int:
    args = argv[1:]
    if args not in ([], ["--self-test"]):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        contracts = load()
        if args == ["--self-test"]:
            return self_test()
        print_contracts(contracts)
        return 0
    except ContractError as error:
        print(f"env_contract: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
