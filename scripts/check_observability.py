#!/usr/bin/env python3
"""Checks of the Grafana dashboard and the Prometheus alert rules in eks/base/observability.

Everything they query must exist: every series an expression selects is one a binary exports
(scripts/metrics_contract.py derives those from the Rust sources) or Prometheus' own `up`, and
every label it names (matchers, `by`/`without`, `on`/`ignoring`/`group_*`, `label_replace`
sources, legends, `{{ $labels.x }}` in annotations) is a label of that series or a target label
the ServiceMonitor gives every scraped series. Beyond names:

* PromQL syntax and types, with promql-parser (PyPI; a Rust port of Prometheus' parser: unknown
  functions, a range where a vector is due, unbalanced parentheses); promtool itself is a Go
  binary from GitHub releases, which this machine cannot download;
* matcher values the code never produces (`outcome="dead_letterd"`, `route="/v1/docs"`,
  `job="tandem-api"`), and a `job` that does not export the metric it is asked for;
* counter functions (rate, irate, increase, resets) only on counters and histogram series,
  gauge functions (delta, idelta, deriv, predict_linear) only on gauges, histogram_quantile only
  over `_bucket` series that keep `le`; the sides of a binary operation without on()/ignoring()
  have the same labels (else they match nothing);
* the rule file's structure as Prometheus loads it (promtool check rules: known keys only, one of
  alert/record, durations, label names, unique group names, balanced templates), and this
  project's policy: every alert has `for`, a `severity` of warning or critical, a summary, a
  description and a `runbook_url` whose README.md anchor exists;
* prometheusrule.yaml is exactly the rule file wrapped in a PrometheusRule (--write regenerates
  it), so there is one source of truth;
* the dashboard: unique panel ids, panels inside the 24-column grid, the `${datasource}`
  variable on every panel and target, unique refIds, defined template variables.

Usage:
  check_observability.py              check eks/base/observability against the Rust sources
  check_observability.py --write      regenerate prometheusrule.yaml from tandem.rules.yaml
  check_observability.py --self-test  plant faults (an unknown metric, label or value, a wrong
                                      job, rate() of a gauge, a syntax error, a stale
                                      PrometheusRule, ...) and check that each one fails
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import promql_parser as promql
import yaml

import metrics_contract
from env_contract import ContractError

ROOT = Path(__file__).resolve().parent.parent
OBSERVABILITY = "eks/base/observability"
RULES_FILE = f"{OBSERVABILITY}/tandem.rules.yaml"
PROMETHEUS_RULE_FILE = f"{OBSERVABILITY}/prometheusrule.yaml"
DASHBOARD_FILE = f"{OBSERVABILITY}/tandem-dashboard.json"
SERVICE_MONITOR_FILE = f"{OBSERVABILITY}/servicemonitor.yaml"
README = "README.md"

# Series Prometheus makes itself for every target (not exported by a binary).
PROMETHEUS_SERIES = {"up": "1 when the target's last scrape succeeded, 0 when it failed"}
# Target labels the Prometheus Operator sets on every series a ServiceMonitor scrapes.
OPERATOR_TARGET_LABELS = {"job", "instance", "namespace", "service", "pod", "container", "endpoint"}

COUNTER_FUNCTIONS = {"rate", "irate", "increase", "resets"}
GAUGE_FUNCTIONS = {"delta", "idelta", "deriv", "predict_linear"}
SEVERITIES = {"warning", "critical"}
REQUIRED_ANNOTATIONS = ("summary", "description", "runbook_url")

# Grafana's own variables, replaced by a sample value before parsing.
GRAFANA_BUILTINS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h", "__range_s": "3600"}

LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LITERAL_ALTERNATION = re.compile(r"^[A-Za-z0-9_./{}-]+(?:\|[A-Za-z0-9_./{}-]+)*$")
RULE_FILE_KEYS = {"groups"}
GROUP_KEYS = {"name", "interval", "rules", "limit", "query_offset", "labels"}
RULE_KEYS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}


def sanitize(label: str) -> str:
    """A Kubernetes label key as the Prometheus Operator turns it into a Prometheus label."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


# --- what the scrape adds -----------------------------------------------------------------------


@dataclass
class Targets:
    labels: set[str]  # target labels on every scraped series
    jobs: dict[str, str]  # job value -> binary
    values: dict[str, set[str]] = field(default_factory=dict)  # target label -> known values


def load_targets(root: Path, catalogue: metrics_contract.Catalogue, problems: list[str]) -> Targets:
    monitor = yaml.safe_load((root / SERVICE_MONITOR_FILE).read_text(encoding="utf-8"))
    spec = monitor.get("spec", {})
    job_label = spec.get("jobLabel")
    selector = spec.get("selector", {}).get("matchLabels", {})
    ports = {endpoint.get("port") for endpoint in spec.get("endpoints", [])}
    extra = [*spec.get("podTargetLabels", []), *spec.get("targetLabels", [])]
    targets = Targets(labels=OPERATOR_TARGET_LABELS | {sanitize(label) for label in extra}, jobs={})
    if not job_label or not selector:
        problems.append(f"{SERVICE_MONITOR_FILE}: needs a jobLabel and a selector.matchLabels")
        return targets

    # The Services it selects, as the base renders them (part-of comes from each kustomization).
    for path in sorted((root / "eks/base").glob("*/service.yaml")):
        service = yaml.safe_load(path.read_text(encoding="utf-8"))
        kustomization = yaml.safe_load((path.parent / "kustomization.yaml").read_text(encoding="utf-8"))
        labels = dict(service.get("metadata", {}).get("labels", {}))
        for entry in kustomization.get("labels", []):
            labels.update(entry.get("pairs", {}))
        if not selector.items() <= labels.items():
            continue
        rel = path.relative_to(root).as_posix()
        job = labels.get(job_label)
        if job not in catalogue.binaries:
            problems.append(f"{rel}: job {job!r} ({job_label}) is no binary of scripts/env_contract.py")
            continue
        if not catalogue.binaries[job]:
            problems.append(f"{rel}: the ServiceMonitor scrapes {job}, which serves no /metrics")
        if not ports & {p.get("name") for p in service.get("spec", {}).get("ports", [])}:
            problems.append(f"{rel}: has no port named {sorted(ports)} for the ServiceMonitor")
        targets.jobs[job] = job
    if not targets.jobs:
        problems.append(f"{SERVICE_MONITOR_FILE}: selects no Service of eks/base")
    targets.values["job"] = set(targets.jobs)

    # Values of the pod labels the overlays set (tandem/region: regionN).
    for label in extra:
        values = set()
        for path in sorted((root / "eks/overlays").glob("*/kustomization.yaml")):
            for entry in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("labels", []):
                if label in entry.get("pairs", {}):
                    values.add(str(entry["pairs"][label]))
        if values:
            targets.values[sanitize(label)] = values
    return targets


# --- PromQL ------------------------------------------------------------------------------------

UNKNOWN = None  # a subexpression whose labels cannot be known (an unknown metric, reported once)


@dataclass
class Result:
    labels: frozenset[str] | None  # None: a scalar or string, or unknown
    series: tuple[metrics_contract.Series | str, ...] = ()  # the selected series ("up" for Prometheus')


class ExprChecker:
    def __init__(self, catalogue: metrics_contract.Catalogue, targets: Targets) -> None:
        self.catalogue = catalogue
        self.targets = targets
        self.problems: list[str] = []
        self.expressions = 0

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def check(self, text: str, where: str) -> frozenset[str] | None:
        """Problems go to self.problems; returns the labels of the result (None: unknown)."""
        self.expressions += 1
        try:
            tree = promql.parse(text)
        except ValueError as error:
            self.problem(where, f"PromQL does not parse: {error} in `{' '.join(text.split())}`")
            return None
        result = self.infer(tree, where)
        return result.labels

    # Each node kind returns the labels of its result.
    def infer(self, node, where: str) -> Result:
        kind = type(node).__name__
        if kind == "VectorSelector":
            return self.selector(node, where)
        if kind == "MatrixSelector":
            return self.selector(node.vector_selector, where)
        if kind in ("ParenExpr", "UnaryExpr", "SubqueryExpr"):
            return self.infer(node.expr, where)
        if kind in ("NumberLiteral", "StringLiteral"):
            return Result(None)
        if kind == "Call":
            return self.call(node, where)
        if kind == "AggregateExpr":
            return self.aggregate(node, where)
        if kind == "BinaryExpr":
            return self.binary(node, where)
        self.problem(where, f"unexpected PromQL node {kind}")
        return Result(None)

    def selector(self, node, where: str) -> Result:
        matchers = list(node.matchers.matchers)
        name = node.name
        for matcher in matchers:
            if matcher.name == "__name__":
                if str(matcher.op) != "MatchOp.Equal":
                    self.problem(where, f"select metrics by name only with `=`, not {{__name__{matcher.op}...}}")
                    return Result(UNKNOWN)
                name = matcher.value
        if node.matchers.or_matchers:
            self.problem(where, "`or` inside a selector's braces is not standard PromQL")
        if name is None:
            self.problem(where, "a selector without a metric name")
            return Result(UNKNOWN)
        if name in PROMETHEUS_SERIES:
            labels = frozenset(self.targets.labels)
            family, series = None, name
        elif name in self.catalogue.series:
            series = self.catalogue.series[name]
            family = series.metric.family
            labels = series.labels | self.targets.labels
        else:
            hint = ""
            base = re.sub(r"_(total|bucket|sum|count)$", "", name)
            if base in self.catalogue.metrics:
                hint = f" (exported as {', '.join(self.catalogue.metrics[base].series())})"
            self.problem(where, f"{name} is not a metric the binaries export{hint} (scripts/metrics_contract.py)")
            return Result(UNKNOWN)
        for matcher in matchers:
            if matcher.name == "__name__":
                continue
            if matcher.name not in labels:
                self.problem(where, f"{name} has no label {matcher.name!r} (it has {', '.join(sorted(labels))})")
                continue
            self.check_value(name, family, matcher, where)
        return Result(labels, (series,))

    def known_values(self, name: str, family: str | None, label: str) -> set[str] | None:
        if label == "job":
            if family is None:
                return set(self.targets.jobs)
            exporters = self.catalogue.exporters(family) & set(self.targets.jobs)
            return exporters
        if label in self.targets.values:
            return self.targets.values[label]
        if family is not None and (family, label) in self.catalogue.values:
            return set(self.catalogue.values[(family, label)])
        return None

    def check_value(self, name: str, family: str | None, matcher, where: str) -> None:
        label, value, op = matcher.name, matcher.value, str(matcher.op).split(".")[-1]
        if label == "status" and op in ("Equal", "NotEqual") and not re.fullmatch(r"[1-5][0-9][0-9]", value):
            self.problem(where, f"{name}{{status{'=' if op == 'Equal' else '!='}{value!r}}}: a status is a 3-digit code")
        known = self.known_values(name, family, label)
        if known is None or value == "":
            return
        what = f"{name}{{{label}}}"
        if label == "job" and family is not None:
            what = f"{name} is exported by {', '.join(sorted(known)) or 'no scraped job'}, so {{job}}"
        if op in ("Equal", "NotEqual"):
            if value not in known:
                self.problem(where, f"{what} is never {value!r} (the code gives {', '.join(sorted(known))})")
            return
        try:
            pattern = re.compile(f"(?:{value})\\Z")
        except re.error as error:
            self.problem(where, f"{name}{{{label}=~{value!r}}}: not a regular expression: {error}")
            return
        if LITERAL_ALTERNATION.match(value):
            for alternative in value.split("|"):
                if alternative not in known:
                    self.problem(where, f"{what} is never {alternative!r} (the code gives {', '.join(sorted(known))})")
        elif not any(pattern.match(v) for v in known):
            self.problem(where, f"{what}: /{value}/ matches none of {', '.join(sorted(known))}")

    def series_of(self, node) -> list:
        found = []

        def visit(n):
            if type(n).__name__ == "VectorSelector":
                name = n.name or next((m.value for m in n.matchers.matchers if m.name == "__name__"), None)
                if name in self.catalogue.series:
                    found.append(self.catalogue.series[name])
                elif name in PROMETHEUS_SERIES:
                    found.append(name)
            return True

        promql.walk(node, visit)
        return found

    def call(self, node, where: str) -> Result:
        name = node.func.name
        args = list(node.args)
        results = [self.infer(arg, where) for arg in args]
        vectors = [r for r in results if r.labels is not None or r.series]
        if name in COUNTER_FUNCTIONS | GAUGE_FUNCTIONS:
            for series in self.series_of(args[0]):
                counter = series != "up" and series.counter_like
                if name in COUNTER_FUNCTIONS and not counter:
                    shown = series if isinstance(series, str) else series.name
                    self.problem(where, f"{name}() of {shown}, which is not a counter (use delta/deriv on gauges)")
                if name in GAUGE_FUNCTIONS and counter:
                    self.problem(where, f"{name}() of the counter {series.name} (use rate/increase)")
        if name == "histogram_quantile":
            inner = results[1]
            buckets = [s for s in self.series_of(args[1])]
            if not buckets or any(isinstance(s, str) or not s.name.endswith("_bucket") for s in buckets):
                self.problem(where, "histogram_quantile() over series that are not a histogram's _bucket")
            if inner.labels is not None and "le" not in inner.labels:
                self.problem(where, "histogram_quantile() over an aggregation that drops `le`")
            return Result(None if inner.labels is None else inner.labels - {"le"}, inner.series)
        if name in ("label_replace", "label_join"):
            inner = results[0]
            strings = [getattr(a, "val", None) for a in args[1:]]
            destination = strings[0]
            sources = [strings[3]] if name == "label_replace" else strings[2:]
            if inner.labels is not None:
                for source in sources:
                    if source and source not in inner.labels:
                        self.problem(where, f"{name}() reads label {source!r}, which its input does not have")
            if destination is None or not LABEL_NAME.match(destination):
                self.problem(where, f"{name}() writes an invalid label name {destination!r}")
                return Result(inner.labels, inner.series)
            return Result(None if inner.labels is None else inner.labels | {destination}, inner.series)
        if name in ("vector", "time", "scalar", "pi"):
            return Result(frozenset() if name == "vector" else None)
        if name in ("absent", "absent_over_time"):
            # The result carries the labels the selector pins with `=`.
            selector = args[0].vector_selector if type(args[0]).__name__ == "MatrixSelector" else args[0]
            pinned = {
                m.name
                for m in getattr(getattr(selector, "matchers", None), "matchers", [])
                if str(m.op) == "MatchOp.Equal" and m.name != "__name__"
            }
            return Result(frozenset(pinned))
        return vectors[0] if vectors else Result(None)

    def aggregate(self, node, where: str) -> Result:
        inner = self.infer(node.expr, where)
        op = str(node.op)
        modifier = node.modifier
        grouping = list(modifier.labels) if modifier is not None else []
        if inner.labels is not None:
            for label in grouping:
                if label not in inner.labels:
                    self.problem(where, f"{op} groups by {label!r}, which its input does not have (it has {', '.join(sorted(inner.labels))})")
        if inner.labels is None:
            labels = None
        elif modifier is None:
            labels = frozenset()
        elif str(modifier.type).endswith("By"):
            labels = frozenset(grouping)
        else:
            labels = inner.labels - set(grouping)
        if op in ("topk", "bottomk", "limitk", "limit_ratio"):
            labels = inner.labels
        if op == "count_values" and labels is not None:
            labels = labels | {node.param.val}
        return Result(labels, inner.series)

    def binary(self, node, where: str) -> Result:
        left = self.infer(node.lhs, where)
        right = self.infer(node.rhs, where)
        op = str(node.op)
        if left.labels is None and not left.series:
            return right  # scalar op vector (or unknown)
        if right.labels is None and not right.series:
            return left
        if left.labels is None or right.labels is None:
            return Result(None)
        modifier = node.modifier
        matching = modifier.matching if modifier is not None else None
        card = str(modifier.card).split(".")[-1] if modifier is not None else "OneToOne"
        include = list(modifier.group_labels or []) if modifier is not None else []
        on = matching is not None and str(matching.type).endswith("Include")
        names = list(matching.labels) if matching is not None else []
        if on:
            for label in names:
                for side, labels in (("left", left.labels), ("right", right.labels)):
                    if label not in labels:
                        self.problem(where, f"`{op} on ({', '.join(names)})`: the {side} side has no label {label!r}")
        elif op != "or" and card not in ("ManyToOne", "OneToMany"):
            # Matching on every label (but the ignored ones): different label sets match nothing.
            ignored = set(names)
            if left.labels - ignored != right.labels - ignored:
                self.problem(
                    where,
                    f"the sides of `{op}` have different labels ({', '.join(sorted(left.labels))} / "
                    f"{', '.join(sorted(right.labels))}): they match nothing without on()/ignoring()",
                )
        if card == "ManyToOne":
            for label in include:
                if label not in right.labels:
                    self.problem(where, f"group_left({label}) copies a label the right side does not have")
            return Result(left.labels | set(include), left.series)
        if card == "OneToMany":
            for label in include:
                if label not in left.labels:
                    self.problem(where, f"group_right({label}) copies a label the left side does not have")
            return Result(right.labels | set(include), right.series)
        if op in ("and", "unless"):
            return Result(left.labels, left.series)
        if op == "or":
            return Result(left.labels & right.labels, left.series + right.series)
        if on:
            return Result(frozenset(names), left.series)
        return Result(left.labels - set(names), left.series)


# --- the rule file -----------------------------------------------------------------------------


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if in_code or not heading:
            continue
        text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.group(1))
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def template_labels(text: str, where: str, problems: list[str]) -> set[str]:
    if text.count("{{") != text.count("}}"):
        problems.append(f"{where}: unbalanced {{{{ }}}} in {text[:60]!r}")
    return set(re.findall(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)", text))


def check_rules(rules: object, checker: ExprChecker, readme: str, source: str = RULES_FILE) -> int:
    """Structure (as Prometheus loads a rule file) and policy; returns the number of rules."""
    problems = checker.problems
    anchors = github_anchors(readme)
    if not isinstance(rules, dict) or set(rules) != RULE_FILE_KEYS:
        problems.append(f"{source}: a rule file has exactly one top-level key, groups")
        return 0
    groups = rules["groups"]
    if not isinstance(groups, list) or not groups:
        problems.append(f"{source}: groups must be a non-empty list")
        return 0
    count = 0
    group_names: set[str] = set()
    alert_names: set[str] = set()
    for group in groups:
        name = group.get("name") if isinstance(group, dict) else None
        where = f"{source}: group {name!r}"
        if not isinstance(group, dict) or not isinstance(name, str) or not name:
            problems.append(f"{source}: every group needs a name")
            continue
        if name in group_names:
            problems.append(f"{where}: group name used twice")
        group_names.add(name)
        for key in set(group) - GROUP_KEYS:
            problems.append(f"{where}: unknown key {key!r}")
        if "interval" in group:
            check_duration(group["interval"], f"{where} interval", problems)
        if not isinstance(group.get("rules"), list) or not group["rules"]:
            problems.append(f"{where}: rules must be a non-empty list")
            continue
        for rule in group["rules"]:
            count += 1
            if not isinstance(rule, dict):
                problems.append(f"{where}: a rule is not a mapping")
                continue
            title = rule.get("alert") or rule.get("record")
            rule_where = f"{source}: {title or '(unnamed rule)'}"
            for key in set(rule) - RULE_KEYS:
                problems.append(f"{rule_where}: unknown key {key!r}")
            if ("alert" in rule) == ("record" in rule):
                problems.append(f"{rule_where}: exactly one of alert and record")
                continue
            expr = rule.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                problems.append(f"{rule_where}: expr missing")
                continue
            output = checker.check(expr, rule_where)
            for key in ("for", "keep_firing_for"):
                if key in rule:
                    check_duration(rule[key], f"{rule_where} {key}", problems)
            labels = rule.get("labels") or {}
            annotations = rule.get("annotations") or {}
            for kind, mapping in (("labels", labels), ("annotations", annotations)):
                if not isinstance(mapping, dict):
                    problems.append(f"{rule_where}: {kind} must be a mapping")
                    continue
                for key, value in mapping.items():
                    if not isinstance(key, str) or not LABEL_NAME.match(key):
                        problems.append(f"{rule_where}: invalid {kind} name {key!r}")
                    if not isinstance(value, str):
                        problems.append(f"{rule_where}: {kind} {key} must be a string, not {value!r}")
                        continue
                    for label in template_labels(value, f"{rule_where} {kind}.{key}", problems):
                        if output is not None and label not in output:
                            problems.append(
                                f"{rule_where}: {kind}.{key} uses $labels.{label}, which the expression's "
                                f"result does not have (it has {', '.join(sorted(output)) or 'none'})"
                            )
            if "record" in rule:
                if not METRIC_NAME.match(str(rule["record"])):
                    problems.append(f"{rule_where}: invalid record name")
                continue
            alert = rule["alert"]
            if not isinstance(alert, str) or not LABEL_NAME.match(alert):
                problems.append(f"{rule_where}: invalid alert name")
            if alert in alert_names:
                problems.append(f"{rule_where}: alert name used twice")
            alert_names.add(alert)
            if "for" not in rule:
                problems.append(f"{rule_where}: no `for` (one bad scrape would page)")
            if labels.get("severity") not in SEVERITIES:
                problems.append(f"{rule_where}: labels.severity must be one of {sorted(SEVERITIES)}, not {labels.get('severity')!r}")
            for key in REQUIRED_ANNOTATIONS:
                if not str(annotations.get(key, "")).strip():
                    problems.append(f"{rule_where}: no annotations.{key}")
            runbook = str(annotations.get("runbook_url", ""))
            if runbook:
                target = re.fullmatch(rf"{re.escape(README)}#([\w-]+)", runbook)
                if target is None:
                    problems.append(f"{rule_where}: runbook_url must be {README}#<section>, not {runbook!r}")
                elif target.group(1) not in anchors:
                    problems.append(f"{rule_where}: runbook_url names #{target.group(1)}, which is no heading of {README}")
    return count


def check_duration(value: object, where: str, problems: list[str]) -> None:
    if not isinstance(value, str) or not re.fullmatch(r"(?:\d+(?:ms|[smhdwy]))+", value):
        problems.append(f"{where}: {value!r} is not a Prometheus duration")
        return
    try:
        promql.parse_duration(value)
    except ValueError as error:
        problems.append(f"{where}: {value!r}: {error}")


def prometheus_rule(rules: dict) -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "tandem", "labels": {"app.kubernetes.io/name": "tandem-alerts"}},
        "spec": rules,
    }


class LiteralDumper(yaml.SafeDumper):
    pass


def _string(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


LiteralDumper.add_representer(str, _string)

GENERATED_HEADER = """\
# GENERATED from tandem.rules.yaml by `python3 scripts/check_observability.py --write`: edit that
# file, not this one (make test fails when they differ). The same rules as a PrometheusRule for
# the Prometheus Operator; kube-prometheus-stack loads it when its ruleSelector matches (README,
# "Dashboards and alerts").
"""


def render_prometheus_rule(rules: dict) -> str:
    body = yaml.dump(prometheus_rule(rules), Dumper=LiteralDumper, sort_keys=False, width=100, allow_unicode=True)
    return GENERATED_HEADER + body


def check_prometheus_rule(document: object, rules: dict, problems: list[str]) -> None:
    if document != prometheus_rule(rules):
        problems.append(
            f"{PROMETHEUS_RULE_FILE} is not tandem.rules.yaml wrapped in a PrometheusRule: "
            "run python3 scripts/check_observability.py --write"
        )


# --- the dashboard -----------------------------------------------------------------------------


def dashboard_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []) if panel.get("type") == "row" else [])
    return panels


def substitute(text: str, variables: dict[str, str], where: str, problems: list[str]) -> str:
    if "[[" in text:
        problems.append(f"{where}: the deprecated [[var]] syntax")

    def replace(match: re.Match) -> str:
        name = match.group("braced") or match.group("plain")
        if name in GRAFANA_BUILTINS:
            return GRAFANA_BUILTINS[name]
        if name in variables:
            return variables[name]
        problems.append(f"{where}: ${name} is no variable of the dashboard")
        return ".*"

    return re.sub(r"\$\{(?P<braced>\w+)(?::\w+)?\}|\$(?P<plain>[A-Za-z_]\w*)", replace, text)


def check_dashboard(dashboard: object, checker: ExprChecker, source: str = DASHBOARD_FILE) -> int:
    problems = checker.problems
    if not isinstance(dashboard, dict):
        problems.append(f"{source}: not a JSON object")
        return 0
    for key in ("uid", "title", "schemaVersion", "panels", "templating"):
        if key not in dashboard:
            problems.append(f"{source}: no {key}")
    variables: dict[str, str] = {}
    datasource_variable = None
    for variable in dashboard.get("templating", {}).get("list", []):
        name = variable.get("name", "")
        if variable.get("type") == "datasource":
            if variable.get("query") != "prometheus":
                problems.append(f"{source}: data source variable {name} is not of type prometheus")
            datasource_variable = name
            variables[name] = "prometheus"
            continue
        # Label-value variables stand for any value (Grafana's "All" sends allValue or a regex).
        variables[name] = ".*"
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        where = f"{source}: variable {name}"
        values = re.fullmatch(r"\s*label_values\(\s*(?:(?P<expr>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*", query or "")
        if values is None:
            problems.append(f"{where}: only label_values(...) queries are checked; got {query!r}")
            continue
        if values.group("expr"):
            labels = checker.check(values.group("expr"), where)
            if labels is not None and values.group("label") not in labels:
                problems.append(f"{where}: {values.group('expr')} has no label {values.group('label')!r}")
    if datasource_variable is None:
        problems.append(f"{source}: no data source variable (panels must not name a data source uid)")
    expected_ds = f"${{{datasource_variable}}}"

    ids: set[int] = set()
    count = 0
    for panel in dashboard_panels(dashboard):
        title = panel.get("title", "?")
        where = f"{source}: panel {title!r}"
        if panel.get("id") in ids:
            problems.append(f"{where}: id {panel.get('id')} used twice")
        ids.add(panel.get("id"))
        grid = panel.get("gridPos", {})
        if not all(isinstance(grid.get(k), int) for k in "hwxy") or grid["x"] + grid["w"] > 24:
            problems.append(f"{where}: gridPos {grid} is not inside the 24-column grid")
        if panel.get("type") == "row":
            continue
        if (panel.get("datasource") or {}).get("uid") != expected_ds:
            problems.append(f"{where}: datasource must be {expected_ds}")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{where}: no queries")
        refs: set[str] = set()
        for target in targets:
            ref = target.get("refId")
            if ref in refs:
                problems.append(f"{where}: refId {ref} used twice")
            refs.add(ref)
            if (target.get("datasource") or {}).get("uid", expected_ds) != expected_ds:
                problems.append(f"{where} {ref}: datasource must be {expected_ds}")
            expr = target.get("expr", "")
            if not expr.strip():
                problems.append(f"{where} {ref}: empty expr")
                continue
            count += 1
            output = checker.check(substitute(expr, variables, f"{where} {ref}", problems), f"{where} {ref}")
            for label in re.findall(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}", target.get("legendFormat", "")):
                if output is not None and label not in output:
                    problems.append(
                        f"{where} {ref}: the legend uses {{{{{label}}}}}, which the query's result does not have "
                        f"(it has {', '.join(sorted(output)) or 'none'})"
                    )
    return count


# --- running ------------------------------------------------------------------------------------


@dataclass
class Inputs:
    rules: dict
    prometheus_rule: object
    dashboard: object
    readme: str


def read_inputs(root: Path) -> Inputs:
    return Inputs(
        rules=yaml.safe_load((root / RULES_FILE).read_text(encoding="utf-8")),
        prometheus_rule=yaml.safe_load((root / PROMETHEUS_RULE_FILE).read_text(encoding="utf-8")),
        dashboard=json.loads((root / DASHBOARD_FILE).read_text(encoding="utf-8")),
        readme=(root / README).read_text(encoding="utf-8"),
    )


def problems_of(inputs: Inputs, root: Path = ROOT) -> tuple[list[str], str]:
    catalogue = metrics_contract.load(root)
    problems: list[str] = []
    targets = load_targets(root, catalogue, problems)
    checker = ExprChecker(catalogue, targets)
    checker.problems = problems
    rules = check_rules(inputs.rules, checker, inputs.readme)
    if isinstance(inputs.rules, dict):
        check_prometheus_rule(inputs.prometheus_rule, inputs.rules, problems)
    queries = check_dashboard(inputs.dashboard, checker)
    summary = (
        f"{rules} rules, {queries} dashboard queries, {checker.expressions} PromQL expressions against "
        f"{len(catalogue.series)} exported series of {sum(1 for f in catalogue.binaries.values() if f)} binaries"
    )
    return problems, summary


def run(root: Path = ROOT) -> int:
    problems, summary = problems_of(read_inputs(root), root)
    print(f"check_observability: {summary}")
    for line in problems:
        print(f"  FAIL {line}")
    if problems:
        print(f"check_observability: {len(problems)} problem(s)")
        return 1
    print("check_observability: ok")
    return 0


def write(root: Path = ROOT) -> int:
    rules = yaml.safe_load((root / RULES_FILE).read_text(encoding="utf-8"))
    (root / PROMETHEUS_RULE_FILE).write_text(render_prometheus_rule(rules), encoding="utf-8")
    print(f"wrote {PROMETHEUS_RULE_FILE}")
    return 0


def self_test() -> int:
    failures: list[str] = []

    def expect(what: str, condition: bool, detail: object = "") -> None:
        print(f"  {'ok  ' if condition else 'FAIL'} {what}" + ("" if condition else f": {detail}"))
        if not condition:
            failures.append(what)

    original = read_inputs(ROOT)
    found, _ = problems_of(original)
    expect("the repository's dashboard and rules pass", not found, found)

    def with_dashboard_expr(expr: str) -> list[str]:
        inputs = copy.deepcopy(original)
        panel = next(p for p in dashboard_panels(inputs.dashboard) if p.get("targets"))
        panel["targets"][0]["expr"] = expr
        return problems_of(inputs)[0]

    def with_rule(change) -> list[str]:
        inputs = copy.deepcopy(original)
        rule = inputs.rules["groups"][0]["rules"][0]
        change(rule)
        inputs.prometheus_rule = prometheus_rule(inputs.rules)  # keep the pair in step
        return problems_of(inputs)[0]

    cases = [
        (
            "dashboard: a planted unknown metric fails",
            with_dashboard_expr('sum(rate(tandem_relay_events_unknown_total{tandem_region=~"$region"}[$__rate_interval]))'),
            "tandem_relay_events_unknown_total is not a metric the binaries export",
        ),
        (
            "dashboard: a counter without its _total suffix fails, naming the exported series",
            with_dashboard_expr("rate(tandem_relay_events_published[5m])"),
            "exported as tandem_relay_events_published_total",
        ),
        (
            "dashboard: a label the metric does not have fails",
            with_dashboard_expr('sum by (route) (tandem_relay_outbox_backlog)'),
            "groups by 'route', which its input does not have",
        ),
        (
            "dashboard: a matcher on an unknown label fails",
            with_dashboard_expr('tandem_consumer_events_total{result="hit"}'),
            "has no label 'result'",
        ),
        (
            "dashboard: a label value the code never produces fails",
            with_dashboard_expr('tandem_consumer_events_total{outcome="dead_letterd"}'),
            "is never 'dead_letterd'",
        ),
        (
            "dashboard: a typo inside a regex alternation fails",
            with_dashboard_expr('tandem_cache_requests_total{result=~"hit|mis|bypass"}'),
            "is never 'mis'",
        ),
        (
            "dashboard: a route no router serves fails",
            with_dashboard_expr('tandem_http_requests_total{route="/v1/documents"}'),
            "is never '/v1/documents'",
        ),
        (
            "dashboard: a job that does not export the metric fails",
            with_dashboard_expr('tandem_relay_leader{job="tandem-read"}'),
            "tandem_relay_leader is exported by tandem-outbox-relay",
        ),
        (
            "dashboard: an undefined template variable fails",
            with_dashboard_expr('tandem_relay_leader{tandem_region=~"$zone"}'),
            "$zone is no variable of the dashboard",
        ),
        (
            "dashboard: a legend label the query drops fails",
            (lambda: (
                inputs := copy.deepcopy(original),
                target := next(p for p in dashboard_panels(inputs.dashboard) if p.get("targets"))["targets"][0],
                target.update(expr="sum(tandem_relay_leader)", legendFormat="{{pod}}"),
                problems_of(inputs)[0],
            )[-1])(),
            "the legend uses {{pod}}",
        ),
        (
            "promql: rate() of a gauge fails",
            with_dashboard_expr("rate(tandem_relay_outbox_backlog[5m])"),
            "rate() of tandem_relay_outbox_backlog, which is not a counter",
        ),
        (
            "promql: deriv() of a counter fails",
            with_dashboard_expr("deriv(tandem_relay_events_published_total[5m])"),
            "deriv() of the counter",
        ),
        (
            "promql: histogram_quantile over an aggregation without le fails",
            with_dashboard_expr("histogram_quantile(0.9, sum by (job) (rate(tandem_relay_batch_size_bucket[5m])))"),
            "drops `le`",
        ),
        (
            "promql: a syntax error fails",
            with_dashboard_expr("sum(rate(tandem_relay_events_published_total[5m])"),
            "PromQL does not parse",
        ),
        (
            "promql: a range where a vector is due fails (type check)",
            with_dashboard_expr("rate(tandem_relay_events_published_total)"),
            "PromQL does not parse",
        ),
        (
            "promql: sides with different labels and no on() fail",
            with_dashboard_expr("sum by (job) (tandem_relay_leader) / sum(tandem_relay_leader)"),
            "match nothing without on()/ignoring()",
        ),
        (
            "promql: on() over a label one side lacks fails",
            with_dashboard_expr("tandem_relay_outbox_backlog and on (route) tandem_relay_leader"),
            "has no label 'route'",
        ),
        (
            "rules: a planted unknown metric fails",
            with_rule(lambda r: r.update(expr="tandem_replication_lag_ms > 5000")),
            "tandem_replication_lag_ms is not a metric the binaries export",
        ),
        (
            "rules: an alert without `for` fails",
            with_rule(lambda r: r.pop("for")),
            "no `for`",
        ),
        (
            "rules: an alert without a severity fails",
            with_rule(lambda r: r["labels"].pop("severity")),
            "labels.severity must be one of",
        ),
        (
            "rules: a runbook_url to a missing README section fails",
            with_rule(lambda r: r["annotations"].update(runbook_url="README.md#no-such-section")),
            "which is no heading of README.md",
        ),
        (
            "rules: an annotation using a label the result lacks fails",
            with_rule(lambda r: r["annotations"].update(summary="{{ $labels.pod }} lags")),
            "uses $labels.pod",
        ),
        (
            "rules: an invalid duration fails",
            with_rule(lambda r: r.update({"for": "5 minutes"})),
            "is not a Prometheus duration",
        ),
        (
            "rules: an unknown rule key fails (Prometheus refuses the file)",
            with_rule(lambda r: r.update(severity="critical")),
            "unknown key 'severity'",
        ),
    ]
    for what, found, needle in cases:
        expect(what, any(needle in p for p in found), found)

    inputs = copy.deepcopy(original)
    inputs.prometheus_rule["spec"]["groups"][0]["rules"][0]["expr"] = "vector(1)"
    found = problems_of(inputs)[0]
    expect("prometheusrule.yaml edited by hand (drifted from the rule file) fails", any("--write" in p for p in found), found)
    rendered = yaml.safe_load(render_prometheus_rule(original.rules))
    expect("--write renders exactly the rule file wrapped in a PrometheusRule", rendered == prometheus_rule(original.rules))

    # The extraction, on a copy of the sources: a registration the code adds shows up with its
    # type's series, and one in a file no binary reaches fails loudly.
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        for top in (*metrics_contract.SOURCE_DIRS, "eks"):
            shutil.copytree(ROOT / top, root / top, ignore=shutil.ignore_patterns("target", "*.json", "*.sql"))
        relay = root / "functions/outbox-relay/src/metrics.rs"
        text = relay.read_text(encoding="utf-8")
        anchor = "    pub fn register(&self, metrics: &tandem_runtime::metrics::Metrics) {\n"
        expect("self-test anchor: RelayMetrics::register", anchor in text)
        relay.write_text(
            text.replace(anchor, anchor + '        metrics.register("planted_seconds", "h", self.publish_seconds.clone());\n'),
            encoding="utf-8",
        )
        catalogue = metrics_contract.load(root)
        expect(
            "extract: a planted histogram registration exports _bucket (with le), _sum and _count",
            {"tandem_planted_seconds_bucket", "tandem_planted_seconds_sum", "tandem_planted_seconds_count"}
            <= set(catalogue.series)
            and "le" in catalogue.series["tandem_planted_seconds_bucket"].labels
            and "tandem_planted_seconds" in catalogue.binaries["tandem-outbox-relay"]
            and "tandem_planted_seconds" not in catalogue.binaries["tandem-read"],
            sorted(catalogue.series),
        )
        orphan = root / "shared/store/src/planted.rs"
        orphan.write_text(
            "use prometheus_client::metrics::counter::Counter;\n"
            "pub struct Planted { pub c: Counter }\n"
            "impl Planted { pub fn register(&self, metrics: &M) {\n"
            '    metrics.register("orphan", "h", self.c.clone());\n} }\n',
            encoding="utf-8",
        )
        metrics_contract.sources.cache_clear()
        metrics_contract.load.cache_clear()
        try:
            metrics_contract.load(root)
            expect("extract: a registration no binary reaches fails loudly", False, "no ContractError")
        except ContractError as error:
            expect("extract: a registration no binary reaches fails loudly", "no binary serving /metrics" in str(error), error)
        metrics_contract.sources.cache_clear()
        metrics_contract.load.cache_clear()

    snippet = metrics_contract.Source(
        "snippet.rs",
        'struct S { pub c: Family<L, Counter> }\n#[derive(EncodeLabelSet)]\nstruct L { pub kind: &\'static str }\n'
        'impl S {\n fn note(&self, kind: &\'static str) { self.c.get_or_create(&L { kind }).inc(); }\n'
        ' fn register(&self, m: &M) { m.register("things", "Things", self.c.clone()); }\n'
        ' fn other(&self) { self.note("alpha"); self.note("beta"); }\n}\n',
    )
    regs = metrics_contract.registrations((snippet,), snippet)
    values = metrics_contract.static_label_values((snippet,), "L", "kind")
    expect(
        "extract: a Family's label struct fields and the literals its builder is called with",
        len(regs) == 1 and regs[0].kind == "counter" and regs[0].labels == ("kind",) and values == {"alpha", "beta"},
        (regs, values),
    )

    # The rules check_manifests.py applies to these objects once rendered.
    import check_manifests  # noqa: PLC0415 - needs jsonschema, as check_manifests.py does

    monitor = yaml.safe_load((ROOT / SERVICE_MONITOR_FILE).read_text(encoding="utf-8"))
    service = yaml.safe_load((ROOT / "eks/base/read/service.yaml").read_text(encoding="utf-8"))
    service["metadata"]["labels"]["app.kubernetes.io/part-of"] = "tandem"
    dashboard_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "tandem-grafana-dashboard", "labels": {"grafana_dashboard": "1"}},
        "data": {"tandem-dashboard.json": json.dumps(original.dashboard)},
    }
    pods = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "tandem-read"},
        "spec": {"template": {"metadata": {"labels": {"app.kubernetes.io/name": "tandem-read"}}, "spec": {"containers": []}}},
    }

    def manifest_problems(docs: list[dict], overlay: bool = False) -> list[str]:
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "rendered.yaml"
            path.write_text(yaml.safe_dump_all(docs), encoding="utf-8")
            checker = check_manifests.Checker(overlay=overlay)
            checker.check_file(path)
            return checker.problems

    good = [monitor, prometheus_rule(original.rules), service, dashboard_map]
    found = manifest_problems(good)
    expect("manifests: the ServiceMonitor, the PrometheusRule and the dashboard ConfigMap pass", not found, found)
    wrong_port = copy.deepcopy(monitor)
    wrong_port["spec"]["endpoints"][0]["port"] = "metrics"
    found = manifest_problems([wrong_port, service])
    expect("manifests: a ServiceMonitor port no selected Service has fails", any("no port named" in p for p in found), found)
    bad_rule = prometheus_rule(copy.deepcopy(original.rules))
    bad_rule["spec"]["groups"][0]["rules"][0]["severity"] = "critical"
    found = manifest_problems([bad_rule])
    expect("manifests: a PrometheusRule with an unknown rule key fails its schema", any("schema" in p for p in found), found)
    broken = copy.deepcopy(dashboard_map)
    broken["data"]["tandem-dashboard.json"] = "{"
    found = manifest_problems([broken])
    expect("manifests: a dashboard ConfigMap that is not JSON fails", any("is not JSON" in p for p in found), found)
    found = manifest_problems([monitor, service, pods], overlay=True)
    expect(
        "manifests (overlay): pods without the ServiceMonitor's podTargetLabels fail",
        any("lack the label tandem/region" in p for p in found),
        found,
    )

    if failures:
        print(f"check_observability self-test: {len(failures)} failure(s)")
        return 1
    print("check_observability self-test: ok")
    return 0


def main(argv: list[str]) -> int:
    args = argv[1:]
    try:
        if args == []:
            return run()
        if args == ["--write"]:
            return write()
        if args == ["--self-test"]:
            return self_test()
    except ContractError as error:
        print(f"check_observability: cannot derive the exported metrics from the sources: {error}")
        return 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
