#!/usr/bin/env python3
"""The Prometheus metrics each Tandem binary exports, derived from the Rust sources.

Which series a binary serves on `/metrics` is not written down here: it is extracted from the
code, so the dashboard and the alert rules (scripts/check_observability.py) cannot drift from it,
in the spirit of scripts/env_contract.py (whose comment stripper and binary list this reuses).

What counts as an exported metric (string literals only; comments are ignored):

* every `.register("name", "help", metric)` call in shared/, functions/ and consumers/ sources;
  the registry is the one `Registry::with_prefix("tandem")` of shared/runtime/src/metrics.rs, so
  each name is exported as `tandem_<name>`;
* its type, from the metric argument: a struct field (`self.published.clone()`), a local
  (`let lag_gauge = Gauge::default()`), or a method returning one (`self.role.gauge()`, found by
  its `fn gauge(&self) -> Gauge`). prometheus-client writes a Counter as `<name>_total`, a Gauge
  as `<name>`, a Histogram as `<name>_bucket` (label `le`), `<name>_sum` and `<name>_count`;
* its labels: the fields of the `#[derive(EncodeLabelSet)]` struct of a `Family<Labels, _>`, or
  the literal keys of the one `get_or_create(&vec![("key".to_owned(), ..)])` of a
  `Family<Vec<(String, String)>, _>`;
* the values of a `&'static str` label field, from the literals that reach it: the calls of the
  method that builds the label set (`metrics.cache("hit")`, `record(outcome.label())` through the
  literals of `fn label`), or the literal tuples a `for (state, value) in [..]` loop walks; the
  `route` label's values are the routers' `.route("..")` templates plus `unmatched`, the
  `method` label's the methods `track` in shared/http/src/http.rs names plus `OTHER`. Other labels
  (numbers, free strings) are open.

Which binary exports what: a binary serves `/metrics` when its crate calls `Metrics::new(..)`
(tandem-region2-apply-lambda does not: a Lambda function has no `/metrics`). It exports the
registrations of shared/runtime/src/metrics.rs, those of its own crate, and those of another
crate's type it builds and registers (`ConsumerMetrics::new()` + `.register(&metrics)` in the
consumer). A file that registers metrics but reaches no binary, a registration whose type or
labels cannot be read, a unit or sub-registry this module does not model: each fails loudly
(ContractError) rather than guess.

Usage:
  metrics_contract.py   print, per binary, the series it exports with their labels
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import env_contract
from env_contract import ContractError, strip_comments

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("shared", "functions", "consumers")
REGISTRY_FILE = "shared/runtime/src/metrics.rs"
REGISTRY_TYPE = "Metrics"
KINDS = ("Counter", "Gauge", "Histogram")


@dataclass(frozen=True)
class Metric:
    family: str  # exported family name, prefix included: tandem_relay_events_published
    kind: str  # counter | gauge | histogram
    labels: tuple[str, ...]
    help: str
    where: str  # path:line of the registration

    def series(self) -> dict[str, frozenset[str]]:
        """Series name -> its labels, as prometheus-client writes them."""
        labels = frozenset(self.labels)
        if self.kind == "counter":
            return {f"{self.family}_total": labels}
        if self.kind == "histogram":
            return {
                f"{self.family}_bucket": labels | {"le"},
                f"{self.family}_sum": labels,
                f"{self.family}_count": labels,
            }
        return {self.family: labels}


@dataclass(frozen=True)
class Series:
    name: str
    metric: Metric
    labels: frozenset[str]

    @property
    def counter_like(self) -> bool:
        """rate()/increase() apply: a counter, or a histogram's _bucket/_sum/_count."""
        return self.metric.kind in ("counter", "histogram")


@dataclass
class Catalogue:
    prefix: str
    metrics: dict[str, Metric] = field(default_factory=dict)  # family -> Metric
    series: dict[str, Series] = field(default_factory=dict)  # series name -> Series
    binaries: dict[str, set[str]] = field(default_factory=dict)  # binary -> families it exports
    # (family, label) -> the values the code gives that label; absent: open (any value)
    values: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)

    def exporters(self, family: str) -> set[str]:
        return {binary for binary, families in self.binaries.items() if family in families}


# --- small Rust scanning helpers ---------------------------------------------------------------

LITERAL = re.compile(r'"((?:[^"\\]|\\.)*)"')
STRUCT = re.compile(r"\bstruct\s+(?P<name>\w+)\s*\{")
IMPL = re.compile(r"\bimpl(?:\s*<[^>]*>)?\s+(?:[\w:]+\s+for\s+)?(?P<name>\w+)\b[^{;]*\{")
FN = re.compile(r"\bfn\s+(?P<name>\w+)\s*(?:<[^>]*>)?\s*\((?P<params>[^)]*)\)")


def line_of(code: str, rel: str, offset: int) -> str:
    return f"{rel}:{code.count(chr(10), 0, offset) + 1}"


def matching(code: str, start: int, open_: str = "(", close: str = ")") -> int:
    """Offset just past the bracket closing the one at `start` (strings skipped)."""
    depth, i, n = 0, start, len(code)
    while i < n:
        c = code[i]
        if c == '"':
            i += 1
            while i < n and code[i] != '"':
                i += 2 if code[i] == "\\" else 1
        elif c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ContractError(f"unbalanced {open_}{close} at offset {start}")


def split_top(text: str, sep: str = ",") -> list[str]:
    """Splits at `sep` outside (), [], {}, <> and strings; drops a trailing empty part."""
    parts, depth, current, i = [], 0, "", 0
    while i < len(text):
        c = text[i]
        if c == '"':
            j = i + 1
            while j < len(text) and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            current += text[i : j + 1]
            i = j + 1
            continue
        if c in "([{<":
            depth += 1
        elif c in ")]}>" and not (c == ">" and text[i - 1 : i] == "-"):
            depth -= 1
        if c == sep and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += c
        i += 1
    if current.strip():
        parts.append(current.strip())
    return parts


def block_after(code: str, offset: int) -> tuple[int, int]:
    """(start, end) of the {...} block whose `{` is the first at or after `offset`."""
    start = code.index("{", offset)
    return start, matching(code, start, "{", "}")


def enclosing(pattern: re.Pattern, code: str, offset: int) -> re.Match | None:
    """The last match of `pattern` before `offset` whose block contains `offset`."""
    found = None
    for match in pattern.finditer(code, 0, offset):
        try:
            start, end = block_after(code, match.end() - 1)
        except (ValueError, ContractError):
            continue
        if start <= offset < end:
            found = match
    return found


@dataclass
class Source:
    rel: str
    code: str  # comments stripped


@functools.lru_cache(maxsize=None)
def sources(root: Path = ROOT) -> tuple[Source, ...]:
    found = []
    for top in SOURCE_DIRS:
        for path in sorted((Path(root) / top).glob("**/src/**/*.rs")):
            rel = path.relative_to(root).as_posix()
            found.append(Source(rel, strip_comments(path.read_text(encoding="utf-8"))))
    if not found:
        raise ContractError(f"no Rust sources under {', '.join(SOURCE_DIRS)} of {root}")
    return tuple(found)


def struct_fields(all_sources: tuple[Source, ...], name: str) -> tuple[Source, dict[str, str]]:
    """The fields (name -> type) of `struct name`, which must be defined exactly once."""
    hits = []
    for source in all_sources:
        for match in STRUCT.finditer(source.code):
            if match.group("name") == name:
                start, end = block_after(source.code, match.end() - 1)
                body = source.code[start + 1 : end - 1]
                fields = {}
                for part in split_top(body):
                    m = re.fullmatch(r"(?:pub(?:\([^)]*\))?\s+)?(\w+)\s*:\s*(.+)", part.strip(), re.S)
                    if m:
                        fields[m.group(1)] = " ".join(m.group(2).split())
                hits.append((source, fields, match.start()))
    if len(hits) != 1:
        raise ContractError(f"struct {name} is defined {len(hits)} times in the sources: cannot read its fields")
    source, fields, _ = hits[0]
    return source, fields


def method_return_type(all_sources: tuple[Source, ...], method: str) -> str:
    types = set()
    for source in all_sources:
        for match in re.finditer(rf"\bfn\s+{method}\s*\(\s*&self\s*\)\s*->\s*([\w:<>, ]+?)\s*\{{", source.code):
            types.add(match.group(1).strip())
    if len(types) != 1:
        raise ContractError(f"fn {method}(&self) returns {sorted(types) or 'nothing found'}: cannot tell the metric type")
    return types.pop()


# --- the registrations -------------------------------------------------------------------------


@dataclass
class Registration:
    name: str
    help: str
    kind: str
    labels: tuple[str, ...]
    label_type: str | None  # the EncodeLabelSet struct, if any
    where: str
    registrar: str  # the type whose impl makes the call (`Metrics`, `RelayMetrics`, ...)


def metric_type(type_text: str, where: str) -> tuple[str, str | None]:
    """(kind, label type or None) of a Rust metric type such as `Family<HttpLabels, Counter>`."""
    text = " ".join(type_text.replace("::<", "<").split())
    family = re.fullmatch(r"(?:[\w:]*::)?Family\s*<(?P<args>.*)>", text)
    label_type = None
    if family:
        args = split_top(family.group("args"))
        if len(args) < 2:
            raise ContractError(f"{where}: cannot read the Family type {type_text!r}")
        label_type, text = args[0], args[1]
    base = re.fullmatch(r"(?:[\w:]*::)?(?P<kind>\w+)(?:\s*<.*>)?", text)
    if base is None or base.group("kind") not in KINDS:
        raise ContractError(f"{where}: {type_text!r} is no metric type this module knows ({', '.join(KINDS)})")
    return base.group("kind").lower(), label_type


def type_of_argument(all_sources: tuple[Source, ...], source: Source, offset: int, expr: str, where: str) -> str:
    expr = re.sub(r"\s+", "", expr)
    expr = re.sub(r"\.clone\(\)$", "", expr)
    if m := re.fullmatch(r"self\.(\w+)", expr):
        struct = enclosing(IMPL, source.code, offset)
        if struct is None:
            raise ContractError(f"{where}: `{expr}` outside an impl block")
        _, fields = struct_fields(all_sources, struct.group("name"))
        if m.group(1) not in fields:
            raise ContractError(f"{where}: {struct.group('name')} has no field {m.group(1)}")
        return fields[m.group(1)]
    if m := re.fullmatch(r"(?:self\.)?[\w.]*?(\w+)\(\)", expr):
        return method_return_type(all_sources, m.group(1))
    if m := re.fullmatch(r"(\w+)", expr):
        name = m.group(1)
        lets = list(
            re.finditer(
                rf"\blet\s+(?:mut\s+)?{name}\s*(?::\s*(?P<ann>[^=]+?))?\s*=\s*(?P<init>[^;]+);",
                source.code[:offset],
            )
        )
        if not lets:
            raise ContractError(f"{where}: cannot find `let {name}` before the registration")
        let = lets[-1]
        if let.group("ann"):
            return let.group("ann")
        init = let.group("init").strip()
        ctor = re.match(r"(?P<type>.+?)::(?:default|new|new_with_constructor)\s*\(", init, re.S)
        if ctor is None:
            raise ContractError(f"{where}: cannot tell the type of `{name}` from `{init[:60]}`")
        return ctor.group("type")
    raise ContractError(f"{where}: cannot tell the metric type of `{expr}`")


def dynamic_labels(source: Source, offset: int, expr: str, where: str) -> tuple[str, ...]:
    """The literal keys of the one `var.get_or_create(&vec![..])` of a Vec<(String, String)> family."""
    var = re.sub(r"\.clone\(\)$", "", re.sub(r"\s+", "", expr))
    if not re.fullmatch(r"\w+", var):
        raise ContractError(f"{where}: a Family<Vec<(String, String)>, _> must be a local to read its labels")
    calls = list(re.finditer(rf"\b{var}\s*\.\s*get_or_create\s*\(\s*&\s*vec!\s*\[", source.code[:offset]))
    if len(calls) != 1:
        raise ContractError(f"{where}: {var} needs exactly one get_or_create(&vec![..]) before it is registered")
    start = calls[0].end() - 1
    body = source.code[start + 1 : matching(source.code, start, "[", "]") - 1]
    keys = []
    for pair in split_top(body):
        m = re.fullmatch(r'\(\s*"(\w+)"\s*\.to_(?:owned|string)\(\)\s*,.*\)', pair.strip(), re.S)
        if m is None:
            raise ContractError(f"{where}: label pair {pair[:40]!r} does not name its label with a literal")
        keys.append(m.group(1))
    return tuple(keys)


def registrations(all_sources: tuple[Source, ...], source: Source) -> list[Registration]:
    found = []
    for match in re.finditer(r"\.\s*register\s*\(", source.code):
        start = match.end() - 1
        args = split_top(source.code[start + 1 : matching(source.code, start) - 1])
        where = line_of(source.code, source.rel, match.start())
        if len(args) == 1:
            continue  # a registrar: `relay.metrics.register(&metrics)`
        if len(args) != 3:
            raise ContractError(f"{where}: register() with {len(args)} arguments")
        name = LITERAL.fullmatch(args[0])
        if name is None:
            if source.rel == REGISTRY_FILE and args[0] == "name":
                continue  # Metrics::register itself
            raise ContractError(f"{where}: register({args[0]}, ..) does not name its metric with a string literal")
        help_text = LITERAL.fullmatch(args[1])
        kind, label_type = metric_type(type_of_argument(all_sources, source, match.start(), args[2], where), where)
        if label_type is None:
            labels: tuple[str, ...] = ()
        elif re.fullmatch(r"Vec\s*<\s*\(\s*String\s*,\s*String\s*\)\s*>", label_type):
            labels, label_type = dynamic_labels(source, match.start(), args[2], where), None
        else:
            _, fields = struct_fields(all_sources, label_type)
            labels = tuple(fields)
        registrar = enclosing(IMPL, source.code, match.start())
        found.append(
            Registration(
                name=name.group(1),
                help=help_text.group(1) if help_text else "",
                kind=kind,
                labels=labels,
                label_type=label_type,
                where=where,
                registrar=registrar.group("name") if registrar else "",
            )
        )
    return found


# --- label values ------------------------------------------------------------------------------


def literals_of_method(all_sources: tuple[Source, ...], method: str, where: str) -> set[str]:
    values: set[str] = set()
    bodies = 0
    for source in all_sources:
        for match in re.finditer(rf"\bfn\s+{method}\s*\(\s*&self\s*\)\s*->\s*&'static\s+str\s*\{{", source.code):
            start, end = block_after(source.code, match.end() - 1)
            values |= {m.group(1) for m in LITERAL.finditer(source.code[start:end])}
            bodies += 1
    if bodies != 1 or not values:
        raise ContractError(f"{where}: fn {method}(&self) -> &'static str must exist once and return literals")
    return values


def static_label_values(all_sources: tuple[Source, ...], struct: str, label: str) -> set[str]:
    """The literals that reach the `&'static str` field `label` of `struct`."""
    values: set[str] = set()
    sites = 0
    for source in all_sources:
        for match in re.finditer(rf"\b{struct}\s*\{{", source.code):
            if re.search(r"\bstruct\s*$", source.code[max(0, match.start() - 10) : match.start()]):
                continue  # the definition
            start, end = block_after(source.code, match.end() - 1)
            where = line_of(source.code, source.rel, match.start())
            parts = {}
            for part in split_top(source.code[start + 1 : end - 1]):
                key, _, value = part.partition(":")
                parts[key.strip()] = value.strip() if _ else None
            if label not in parts:
                raise ContractError(f"{where}: {struct} built without its field {label}")
            sites += 1
            value = parts[label]
            if value is not None:
                literal = LITERAL.fullmatch(value)
                if literal is None:
                    raise ContractError(f"{where}: {struct}.{label} set from `{value}`, not a literal")
                values.add(literal.group(1))
                continue
            # Shorthand `{ label }`: a parameter of the enclosing fn, or a for-loop binding.
            function = enclosing(FN, source.code, match.start())
            if function and re.search(rf"\b{label}\s*:\s*&'static\s+str\b", function.group("params")):
                calls = 0
                for other in all_sources:
                    # `span.record(field, value)` is a tracing span's field, not a label.
                    for call in re.finditer(rf"(?<!\bspan)\.\s*{function.group('name')}\s*\(", other.code):
                        calls += 1
                        call_where = line_of(other.code, other.rel, call.start())
                        args = split_top(other.code[call.end() : matching(other.code, call.end() - 1) - 1])
                        if len(args) != 1:
                            raise ContractError(f"{call_where}: {function.group('name')}() takes one label")
                        if literal := LITERAL.fullmatch(args[0]):
                            values.add(literal.group(1))
                        elif method := re.fullmatch(r"[\w.]+\.(\w+)\(\)", args[0]):
                            values |= literals_of_method(all_sources, method.group(1), call_where)
                        else:
                            raise ContractError(f"{call_where}: {function.group('name')}({args[0]}) is no literal")
                if not calls:
                    raise ContractError(f"{where}: nothing calls {function.group('name')}(), so {struct}.{label} has no value")
                continue
            if function:
                fn_start, _ = block_after(source.code, function.end())
                loop = None
                for candidate in re.finditer(rf"\bfor\s*\(\s*{label}\s*,[^)]*\)\s*in\s*\[", source.code[fn_start : match.start()]):
                    loop = candidate
                if loop:
                    bracket = fn_start + loop.end() - 1
                    array = source.code[bracket + 1 : matching(source.code, bracket, "[", "]") - 1]
                    for item in split_top(array):
                        first = split_top(item.strip()[1:-1])[0] if item.strip().startswith("(") else ""
                        literal = LITERAL.fullmatch(first)
                        if literal is None:
                            raise ContractError(f"{where}: the loop over {label} walks a non-literal {item[:40]!r}")
                        values.add(literal.group(1))
                    continue
            raise ContractError(f"{where}: cannot tell where {struct}.{label} comes from")
    if sites == 0 or not values:
        raise ContractError(f"{struct}.{label}: no value found in the sources")
    return values


def route_values(all_sources: tuple[Source, ...]) -> set[str]:
    """HttpLabels.route: the routers' templates, plus what `track` reports for no route."""
    http = next((s for s in all_sources if s.rel == "shared/http/src/http.rs"), None)
    if http is None or not re.search(r'\|\|\s*"unmatched"\.to_owned\(\)', http.code):
        raise ContractError("shared/http/src/http.rs no longer labels unrouted requests \"unmatched\": update route_values")
    routes = {m.group(1) for s in all_sources for m in re.finditer(r'\.\s*route\s*\(\s*"([^"]+)"', s.code)}
    return routes | {"unmatched"}


def method_values(all_sources: tuple[Source, ...]) -> set[str]:
    http = next((s for s in all_sources if s.rel == "shared/http/src/http.rs"), None)
    block = re.search(r"let\s+method\s*=\s*match\s+request\.method\(\)\.as_str\(\)\s*\{(?P<body>.*?)\}", http.code if http else "", re.S)
    if block is None or '"OTHER"' not in block.group("body"):
        raise ContractError("shared/http/src/http.rs no longer maps methods in `track`: update method_values")
    return {m.group(1) for m in LITERAL.finditer(block.group("body"))}


# Labels whose values are read from the code by a function of their own (strings the code builds).
SPECIAL_VALUES = {("HttpLabels", "route"): route_values, ("HttpLabels", "method"): method_values}


# --- the catalogue -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def load(root: Path = ROOT) -> Catalogue:
    """The metrics each binary exports, from the sources under `root`. Raises ContractError."""
    root = Path(root)
    all_sources = sources(root)
    for source in all_sources:
        for banned, why in (
            (r"\bregister_with_unit\s*\(", "a unit suffix"),
            (r"\bsub_registry\w*\s*\(", "a sub-registry"),
            (r"\bRegistry::(?:default|new)\s*\(", "a second registry"),
        ):
            if m := re.search(banned, source.code):
                raise ContractError(f"{line_of(source.code, source.rel, m.start())}: {why}, which scripts/metrics_contract.py does not model")
    registry = next((s for s in all_sources if s.rel == REGISTRY_FILE), None)
    if registry is None:
        raise ContractError(f"{REGISTRY_FILE} is missing: update scripts/metrics_contract.py")
    prefixes = re.findall(r'\bRegistry::with_prefix\s*\(\s*"(\w+)"\s*\)', "".join(s.code for s in all_sources))
    if len(prefixes) != 1:
        raise ContractError(f"expected one Registry::with_prefix(\"..\"), found {prefixes}")
    catalogue = Catalogue(prefix=prefixes[0])

    by_file = {s.rel: registrations(all_sources, s) for s in all_sources}
    by_file = {rel: regs for rel, regs in by_file.items() if regs}
    if not by_file.get(REGISTRY_FILE):
        raise ContractError(f"{REGISTRY_FILE} registers nothing: update scripts/metrics_contract.py")

    reached: set[str] = set()
    for binary, spec in env_contract.BINARIES.items():
        crate = f"{spec.crate}/"
        crate_code = "".join(s.code for s in all_sources if s.rel.startswith(crate))
        if not crate_code:
            raise ContractError(f"{spec.crate} has no sources: update BINARIES in scripts/env_contract.py")
        if not re.search(rf"\b{REGISTRY_TYPE}::new\s*\(", crate_code):
            catalogue.binaries[binary] = set()  # no /metrics (the Lambda apply)
            continue
        files = {REGISTRY_FILE}
        for rel, regs in by_file.items():
            if rel.startswith(crate):
                files.add(rel)
                continue
            registrars = {r.registrar for r in regs}
            if any(
                re.search(rf"\b{t}::new\s*\(", crate_code) and re.search(r"\.\s*register\s*\(\s*&\s*\w+\s*\)", crate_code)
                for t in registrars
                if t
            ):
                files.add(rel)
        families = set()
        for rel in sorted(files):
            for reg in by_file.get(rel, []):
                family = f"{catalogue.prefix}_{reg.name}"
                metric = Metric(family, reg.kind, reg.labels, reg.help, reg.where)
                previous = catalogue.metrics.setdefault(family, metric)
                if previous != metric:
                    raise ContractError(f"{family} is registered twice, differently: {previous.where} and {metric.where}")
                families.add(family)
                for label in reg.labels:
                    if reg.label_type is None:
                        continue
                    special = SPECIAL_VALUES.get((reg.label_type, label))
                    if special:
                        catalogue.values[(family, label)] = frozenset(special(all_sources))
                        continue
                    _, fields = struct_fields(all_sources, reg.label_type)
                    if re.fullmatch(r"&'static\s+str", fields[label]):
                        catalogue.values[(family, label)] = frozenset(
                            static_label_values(all_sources, reg.label_type, label)
                        )
        reached |= files
        catalogue.binaries[binary] = families

    for rel in sorted(set(by_file) - reached):
        names = ", ".join(r.name for r in by_file[rel])
        raise ContractError(f"{rel} registers {names} but no binary serving /metrics reaches it: update scripts/metrics_contract.py")
    for metric in catalogue.metrics.values():
        for name, labels in metric.series().items():
            if name in catalogue.series:
                raise ContractError(f"series {name} comes from two metrics")
            catalogue.series[name] = Series(name, metric, labels)
    return catalogue


def print_catalogue(catalogue: Catalogue) -> None:
    for binary, families in catalogue.binaries.items():
        print(f"{binary}: {len(families)} metric families" + ("" if families else " (no /metrics endpoint)"))
        for family in sorted(families):
            metric = catalogue.metrics[family]
            for name, labels in metric.series().items():
                shown = []
                for label in sorted(labels):
                    values = catalogue.values.get((family, label))
                    shown.append(f"{label}={'|'.join(sorted(values))}" if values else label)
                print(f"    {name}{{{', '.join(shown)}}}  ({metric.kind}, {metric.where})")
        print()


def main(argv: list[str]) -> int:
    if argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        print_catalogue(load())
    except ContractError as error:
        print(f"metrics_contract: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
