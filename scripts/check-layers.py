#!/usr/bin/env python3
"""The workspace's layering, checked over `cargo metadata` (run by `make lint` and `make test`).

Crates may depend only on crates in lower layers (README, "Layout"):

    0  tandem-core               the domain, no I/O
       tandem-workspace-hack     no code: feature pins for the Lambda packages built alone
    1  tandem-runtime            configuration, secrets, telemetry, metrics, shutdown, Kafka client
    2  tandem-store              every SQL statement and Redis script
    3  tandem-http               the HTTP edge, the Lambda-or-HTTP adapter, the workers' shell
    4  tandem-region2-apply      Region 2's apply (the consumer's and the Lambda's)
    5  tandem-write, tandem-read, tandem-outbox-relay, tandem-region2-consumer, tandem-cli
    6  tandem-tests
    7  tandem-bench

tandem-core may not depend, directly or through any crate it pulls in, on a crate that does
I/O (database, cache, Kafka, HTTP, async runtime, cloud SDK); tandem-runtime may not depend on
a database, cache or HTTP-server crate, and tandem-store not on an HTTP-server crate (those
belong one layer up).

Usage:
    scripts/check-layers.py                  check this workspace
    scripts/check-layers.py --self-test      prove the check fails on bad graphs
    scripts/check-layers.py --metadata F [--full-metadata G]
                                             check saved `cargo metadata` output instead

Exits 0 when the layering holds, 1 with one line per violation when it does not.
Standard library only.
"""

import json
import subprocess
import sys

LAYERS = [
    ["tandem-core", "tandem-workspace-hack"],
    ["tandem-runtime"],
    ["tandem-store"],
    ["tandem-http"],
    ["tandem-region2-apply"],
    [
        "tandem-write",
        "tandem-read",
        "tandem-outbox-relay",
        "tandem-region2-consumer",
        "tandem-cli",
    ],
    ["tandem-tests"],
    ["tandem-bench"],
]
LAYER_OF = {name: level for level, names in enumerate(LAYERS) for name in names}
CORE = "tandem-core"
IO_CRATES = {
    "tokio",
    "tokio-postgres",
    "deadpool-postgres",
    "redis",
    "rdkafka",
    "axum",
    "lambda_http",
    "lambda_runtime",
    "reqwest",
    "refinery",
}
IO_PREFIXES = ("aws-",)
# Third-party crates a shared layer may not use directly: they belong to a layer above it.
STORAGE_CRATES = {"tokio-postgres", "deadpool-postgres", "redis", "refinery"}
HTTP_SERVER_CRATES = {"axum", "lambda_http", "lambda_runtime", "tower-http", "jsonwebtoken"}
FORBIDDEN = {
    "tandem-runtime": STORAGE_CRATES | HTTP_SERVER_CRATES,
    "tandem-store": HTTP_SERVER_CRATES,
}


def is_io(name):
    return name in IO_CRATES or name.startswith(IO_PREFIXES)


def kind_label(kind):
    return {None: "", "dev": " (dev)", "build": " (build)"}.get(kind, f" ({kind})")


def layer_violations(metadata):
    """Workspace crates out of the table, and dependencies that do not point down."""
    members = {p["name"]: p for p in metadata["packages"]}
    problems = []
    for name in sorted(members):
        if name not in LAYER_OF:
            problems.append(
                f"{name}: not in any layer; add it to LAYERS in scripts/check-layers.py "
                "and to README's layout"
            )
    for name in sorted(members):
        level = LAYER_OF.get(name)
        for dep in members[name]["dependencies"]:
            if dep["name"] not in members or level is None:
                continue
            dep_level = LAYER_OF.get(dep["name"])
            if dep_level is not None and dep_level >= level:
                where = "a higher" if dep_level > level else "the same"
                problems.append(
                    f"{name} (layer {level}) depends on {dep['name']} (layer {dep_level}, "
                    f"{where} layer){kind_label(dep.get('kind'))}: dependencies must point down"
                )
    return problems


def core_direct_io(metadata):
    """I/O crates tandem-core declares itself (any kind: normal, dev or build)."""
    problems = []
    for package in metadata["packages"]:
        if package["name"] != CORE:
            continue
        for dep in package["dependencies"]:
            if is_io(dep["name"]):
                problems.append(
                    f"{CORE} depends on {dep['name']}{kind_label(dep.get('kind'))}: "
                    "the domain crate does no I/O"
                )
    return problems


def forbidden_direct(metadata):
    """Third-party crates a shared layer declares although they belong to a layer above it."""
    problems = []
    for package in metadata["packages"]:
        banned = FORBIDDEN.get(package["name"], set())
        for dep in package["dependencies"]:
            if dep["name"] in banned:
                problems.append(
                    f"{package['name']} depends on {dep['name']}{kind_label(dep.get('kind'))}: "
                    "that belongs to a higher layer"
                )
    return problems


def core_transitive_io(full):
    """I/O crates reachable from tandem-core through normal and build dependencies."""
    names = {p["id"]: p["name"] for p in full["packages"]}
    nodes = {n["id"]: n for n in (full.get("resolve") or {}).get("nodes", [])}
    roots = [pid for pid, name in names.items() if name == CORE and pid in nodes]
    problems = []
    for root in roots:
        paths = {root: [CORE]}
        queue = [root]
        while queue:
            current = queue.pop(0)
            for dep in nodes[current].get("deps", []):
                kinds = {k.get("kind") for k in dep.get("dep_kinds", [{"kind": None}])}
                if not kinds & {None, "build"}:
                    continue
                target = dep["pkg"]
                if target in paths or target not in names:
                    continue
                paths[target] = paths[current] + [names[target]]
                # Direct ones are core_direct_io's to report.
                if is_io(names[target]) and len(paths[target]) > 2:
                    problems.append(
                        f"{CORE} pulls in {names[target]} "
                        f"({' -> '.join(paths[target])}): the domain crate does no I/O"
                    )
                if target in nodes:
                    queue.append(target)
    return problems


def check(metadata, full=None):
    problems = layer_violations(metadata) + core_direct_io(metadata) + forbidden_direct(metadata)
    if full is not None:
        problems += core_transitive_io(full)
    return problems


def cargo_metadata(*extra):
    out = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", *extra],
        check=True,
        stdout=subprocess.PIPE,
    ).stdout
    return json.loads(out)


def report(problems):
    if not problems:
        print("check-layers: the layering holds (dependencies point down; tandem-core does no I/O)")
        return 0
    print(f"check-layers: {len(problems)} violation(s) of the workspace's layering:", file=sys.stderr)
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)
    print("  (layers: README, Layout; rules: scripts/check-layers.py)", file=sys.stderr)
    return 1


# --- self-test ------------------------------------------------------------------------------


def synthetic(edges):
    """`--no-deps` metadata for {crate: [(dependency, kind)]}."""
    return {
        "packages": [
            {"name": name, "dependencies": [{"name": d, "kind": k} for d, k in deps]}
            for name, deps in edges.items()
        ]
    }


def synthetic_full(edges):
    """Full metadata (packages and resolve) for {crate: [(dependency, kind)]}."""
    names = set(edges) | {d for deps in edges.values() for d, _ in deps}
    return {
        "packages": [{"id": f"id:{n}", "name": n} for n in sorted(names)],
        "resolve": {
            "nodes": [
                {
                    "id": f"id:{n}",
                    "deps": [
                        {"pkg": f"id:{d}", "dep_kinds": [{"kind": k}]}
                        for d, k in edges.get(n, [])
                    ],
                }
                for n in sorted(names)
            ]
        },
    }


GOOD = {
    "tandem-core": [("serde", None), ("uuid", None)],
    "tandem-runtime": [("tandem-core", None), ("tokio", None), ("rdkafka", None)],
    "tandem-store": [("tandem-runtime", None), ("tokio-postgres", None), ("redis", None)],
    "tandem-http": [("tandem-store", None), ("tandem-core", None), ("axum", None)],
    "tandem-region2-apply": [("tandem-core", None), ("tandem-http", None)],
    "tandem-write": [("tandem-core", None), ("tandem-http", None)],
    "tandem-read": [("tandem-http", None)],
    "tandem-outbox-relay": [("tandem-store", None), ("rdkafka", None)],
    "tandem-region2-consumer": [("tandem-region2-apply", None)],
    "tandem-cli": [("tandem-store", None), ("tandem-runtime", None), ("tandem-core", None)],
    "tandem-tests": [("tandem-write", None), ("tandem-read", None)],
    "tandem-bench": [("tandem-tests", None), ("tandem-outbox-relay", None)],
}


def self_test():
    failures = []

    def expect(label, problems, fragment):
        if fragment is None:
            if problems:
                failures.append(f"{label}: expected no violation, got {problems}")
        elif not any(fragment in p for p in problems):
            failures.append(f"{label}: expected a violation mentioning {fragment!r}, got {problems}")

    def variant(**changes):
        edges = {name: list(deps) for name, deps in GOOD.items()}
        for name, deps in changes.items():
            edges[name.replace("_", "-")] = deps
        return edges

    expect("a good graph", check(synthetic(GOOD), synthetic_full(GOOD)), None)

    upward = variant(tandem_http=[("tandem-core", None), ("tandem-write", None)])
    expect("http -> write", check(synthetic(upward)), "tandem-http (layer 3) depends on tandem-write")

    store_up = variant(tandem_store=[("tandem-runtime", None), ("tandem-http", None)])
    expect("store -> http", check(synthetic(store_up)), "tandem-store (layer 2) depends on tandem-http")

    runtime_up = variant(tandem_runtime=[("tandem-store", None)])
    expect("runtime -> store", check(synthetic(runtime_up)), "tandem-runtime (layer 1) depends on tandem-store")

    core_up = variant(tandem_core=[("tandem-runtime", None)])
    expect("core -> runtime", check(synthetic(core_up)), "tandem-core (layer 0) depends on tandem-runtime")

    sideways = variant(tandem_write=[("tandem-http", None), ("tandem-read", None)])
    expect("write -> read", check(synthetic(sideways)), "the same layer")

    cli_sideways = variant(tandem_cli=[("tandem-store", None), ("tandem-region2-consumer", None)])
    expect("cli -> consumer", check(synthetic(cli_sideways)), "tandem-cli (layer 5) depends on tandem-region2-consumer")

    dev_up = variant(tandem_region2_apply=[("tandem-http", None), ("tandem-tests", "dev")])
    expect("apply -dev-> tests", check(synthetic(dev_up)), "depends on tandem-tests (layer 6")

    for crate, dep in [
        ("tandem-runtime", "tokio-postgres"),
        ("tandem-runtime", "redis"),
        ("tandem-runtime", "axum"),
        ("tandem-store", "axum"),
        ("tandem-store", "lambda_http"),
    ]:
        bad = variant(**{crate.replace("-", "_"): GOOD[crate] + [(dep, None)]})
        expect(f"{crate} -> {dep}", check(synthetic(bad)), f"{crate} depends on {dep}")

    for io in ["tokio-postgres", "rdkafka", "axum", "lambda_http", "aws-config", "tokio"]:
        bad = variant(tandem_core=[("serde", None), (io, None)])
        expect(f"core -> {io}", check(synthetic(bad)), f"tandem-core depends on {io}")

    hidden = variant(tandem_core=[("serde", None), ("innocent", None)])
    hidden["innocent"] = [("redis", None)]
    no_deps = synthetic({k: v for k, v in hidden.items() if k != "innocent"})
    expect("core -> innocent -> redis", check(no_deps, synthetic_full(hidden)), "tandem-core -> innocent -> redis")

    dev_only = variant(tandem_core=[("serde", None), ("helper", "dev")])
    dev_only["helper"] = [("tokio", None)]
    no_deps = synthetic({k: v for k, v in dev_only.items() if k != "helper"})
    expect("core -dev-> helper -> tokio (tests only)", check(no_deps, synthetic_full(dev_only)), None)

    stray = dict(GOOD, **{"tandem-new": [("tandem-core", None)]})
    expect("a crate in no layer", check(synthetic(stray)), "tandem-new: not in any layer")

    if failures:
        print("check-layers self-test FAILED:", file=sys.stderr)
        for failure in failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    print("check-layers self-test: every bad graph was caught, the good one passed")
    return 0


def main(argv):
    if argv[1:] == ["--self-test"]:
        return self_test()
    args = dict(zip(argv[1::2], argv[2::2]))
    if len(argv[1:]) % 2 or set(args) - {"--metadata", "--full-metadata"}:
        print(__doc__, file=sys.stderr)
        return 2
    if "--metadata" in args:
        with open(args["--metadata"]) as f:
            metadata = json.load(f)
        full = None
        if "--full-metadata" in args:
            with open(args["--full-metadata"]) as f:
                full = json.load(f)
        return report(check(metadata, full))
    # The resolved graph for this machine's platform only: no other platform's crates to fetch.
    host = next(
        line.split(":", 1)[1].strip()
        for line in subprocess.run(
            ["rustc", "-vV"], check=True, stdout=subprocess.PIPE, text=True
        ).stdout.splitlines()
        if line.startswith("host:")
    )
    return report(
        check(cargo_metadata("--no-deps"), cargo_metadata("--filter-platform", host))
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv))
