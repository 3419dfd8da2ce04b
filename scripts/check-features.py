#!/usr/bin/env python3
"""Each Lambda function's package, built alone, uses the third-party crates with the same
features as the workspace build (run by `make lint` and `make test`).

`cargo lambda watch` builds one package (`cargo run --bin tandem-write` in functions/write),
and Cargo unifies features over the packages it builds: a crate whose features differ from the
workspace build's (`cargo build --workspace --bins`, what `make test` runs in the same `dev`
profile) is compiled a second time, and so is everything above it, which made the first
`cargo lambda invoke` wait minutes. `tandem-workspace-hack` (shared/workspace-hack) enables the missing features in
every function package; this check says which crate needs a line there when a dependency
change brings a difference back. Workspace crates may differ (`tandem-runtime`'s `kafka`
feature stays out of the HTTP functions on purpose): rebuilding them takes seconds.

Usage:
    scripts/check-features.py       compare each function package with the workspace

Exits 0 when the features agree, 1 with one line per difference. Standard library only.
"""

import subprocess
import sys

# The packages `cargo lambda watch` builds alone (README, "Running the functions locally as
# Lambda").
FUNCTION_PACKAGES = ["tandem-write", "tandem-read", "tandem-region2-apply"]


def features(*selection):
    """{package: set of features} over the normal and build dependencies of `selection`, as
    `cargo build --bins` resolves them (dev-dependencies left out, as that build does)."""
    out = subprocess.run(
        ["cargo", "tree", "--locked", "-e", "no-dev", "--prefix", "none",
         "-f", "{p}|{f}", *selection],
        check=True, capture_output=True, text=True,
    ).stdout
    found = {}
    for line in out.splitlines():
        if "|" not in line:
            continue
        package, feature_list = line.split("|", 1)
        package = package.replace(" (proc-macro)", "").strip()
        if "(/" in package:  # a workspace crate: `name vX (/path)`
            continue
        names = feature_list.replace(" (*)", "").strip()
        found.setdefault(package, set()).update(f for f in names.split(",") if f)
    return found


def main():
    workspace = features("--workspace")
    problems = []
    for function in FUNCTION_PACKAGES:
        alone = features("-p", function)
        for package in sorted(alone):
            missing = workspace.get(package, set()) - alone[package]
            if missing:
                problems.append(
                    f"{function} built alone compiles {package} without features "
                    f"{', '.join(sorted(missing))} (the workspace build has them): add them "
                    "to shared/workspace-hack/Cargo.toml"
                )
    for problem in problems:
        print(f"check-features: {problem}", file=sys.stderr)
    if problems:
        return 1
    print("check-features: every function package built alone reuses the workspace build's "
          "third-party crates")
    return 0


if __name__ == "__main__":
    sys.exit(main())
