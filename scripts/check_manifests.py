#!/usr/bin/env python3
"""Checks of rendered Kubernetes manifests that neither kubernetes-validate nor checkov make.

* TargetGroupBinding (a CRD of the AWS Load Balancer Controller, for which kubernetes-validate
  has no schema) is validated against the schema below, strictly.
* ServiceMonitor and PrometheusRule (CRDs of the Prometheus Operator) are validated against the
  schemas below, strictly; a ServiceMonitor selects some Service of the render that has its
  endpoint port; a Grafana dashboard ConfigMap (label grafana_dashboard: "1") holds JSON
  dashboards with a uid and stays under the 262,144 bytes `kubectl apply` can record. What the
  dashboard and the rules query is checked by check_observability.py.
* Each Deployment's environment (env plus the ConfigMaps it pulls in with envFrom) sets only the
  variables its binary reads and every variable it requires, as derived from the Rust sources by
  env_contract.py (no stale, no missing setting): exactly one database credential source, never
  TANDEM_JWT_HS256_SECRET (local development only), TANDEM_JWKS_URL for the Write API.
* A DATABASE_CA_FILE a Deployment sets lies under one of its container's volumeMounts: the image
  carries no RDS CA bundle (the build fetches nothing outside the package registries), the
  Deployments mount it from the operator-created ConfigMap tandem-rds-ca.
* Each Deployment probes /healthz (liveness) and /readyz (readiness) and has a preStop sleep
  shorter than its termination grace period.
* No NetworkPolicy ingress rule admits everything: each names its sources (`from`), no ipBlock
  is wider than a /16 (a VPC's largest size: 0.0.0.0/0 and 10.0.0.0/8 are refused) and no
  namespaceSelector is empty (every namespace). The API pods take traffic from the load balancer
  subnets only, which each overlay appends as ipBlocks (patches/network-policies.yaml).
* With --overlay: every pod template carries the labels a ServiceMonitor copies onto its series
  (podTargetLabels: tandem/region, which the dashboard and the alerts group by).
* With --overlay: no `set-by-overlay` placeholder is left, images name a registry and a tag,
  IRSA annotations and target group ARNs look like real ARNs, and the pods behind every
  TargetGroupBinding admit some ipBlock (the load balancer subnets) on the Service's target port,
  or the ALB could not reach them.

Usage: check_manifests.py [--overlay] RENDERED.yaml...
"""

from __future__ import annotations

import ipaddress
import json
import re
import sys
from pathlib import Path

import jsonschema
import yaml

import env_contract

PLACEHOLDER = "set-by-overlay"
# No subnet of an AWS VPC is larger than the VPC's largest size, /16; a wider ingress ipBlock
# admits addresses that are not the load balancer's (0.0.0.0/0, 10.0.0.0/8, 172.16.0.0/12).
MIN_INGRESS_PREFIX = 16

TARGET_GROUP_ARN = r"^arn:aws[a-z-]*:elasticloadbalancing:[a-z0-9-]+:[0-9]{12}:targetgroup/[A-Za-z0-9-]{1,32}/[0-9a-f]{16}$"
ROLE_ARN = r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]+$"

# elbv2.k8s.aws/v1beta1 TargetGroupBinding, the fields this project may use.
TARGET_GROUP_BINDING_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "elbv2.k8s.aws/v1beta1"},
        "kind": {"const": "TargetGroupBinding"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "minLength": 1}},
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["serviceRef"],
            "oneOf": [{"required": ["targetGroupARN"]}, {"required": ["targetGroupName"]}],
            "properties": {
                "targetGroupARN": {"type": "string", "minLength": 1},
                "targetGroupName": {"type": "string", "minLength": 1},
                "targetType": {"enum": ["instance", "ip"]},
                "ipAddressType": {"enum": ["ipv4", "ipv6"]},
                "vpcID": {"type": "string"},
                "multiClusterTargetGroup": {"type": "boolean"},
                "serviceRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name", "port"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "port": {"type": ["integer", "string"]},
                    },
                },
                "nodeSelector": {"type": "object"},
                "networking": {"type": "object"},
            },
        },
    },
}


DURATION = {"type": "string", "pattern": r"^(?:[0-9]+(?:ms|[smhdwy]))+$"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

# monitoring.coreos.com/v1 ServiceMonitor, the fields this project may use.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["matchLabels"],
                    "properties": {"matchLabels": {**STRING_MAP, "minProperties": 1}},
                },
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string", "minLength": 1},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string", "minLength": 1},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": DURATION,
                            "scrapeTimeout": DURATION,
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                        },
                    },
                },
            },
        },
    },
}

# monitoring.coreos.com/v1 PrometheusRule: a rule file's groups under spec.
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": DURATION,
                            "query_offset": DURATION,
                            "limit": {"type": "integer"},
                            "labels": STRING_MAP,
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["expr"],
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    "properties": {
                                        "alert": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"},
                                        "record": {"type": "string", "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": DURATION,
                                        "keep_firing_for": DURATION,
                                        "labels": STRING_MAP,
                                        "annotations": STRING_MAP,
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}

# kubectl apply (client side) keeps the whole object in an annotation, limited to 256 KiB.
MAX_APPLIED_BYTES = 262144


class Checker:
    def __init__(self, overlay: bool) -> None:
        self.overlay = overlay
        # Which variables each binary reads and requires comes from the Rust sources, never from
        # a list kept here (raises env_contract.ContractError when it cannot be derived).
        self.contracts = env_contract.load()
        self.problems: list[str] = []

    def problem(self, source: str, obj: dict, message: str) -> None:
        kind = obj.get("kind", "?")
        name = obj.get("metadata", {}).get("name", "?")
        self.problems.append(f"{source}: {kind}/{name}: {message}")

    def check_file(self, path: Path) -> int:
        docs = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
        source = path.name
        config_maps = {
            doc["metadata"]["name"]: doc.get("data", {}) or {}
            for doc in docs
            if doc.get("kind") == "ConfigMap"
        }
        services = {doc["metadata"]["name"] for doc in docs if doc.get("kind") == "Service"}
        if self.overlay:
            self.check_load_balancer_reachability(source, docs)
        self.check_service_monitors(source, docs)
        for doc in docs:
            if self.overlay and PLACEHOLDER in yaml.safe_dump(doc):
                self.problem(source, doc, f"still contains the placeholder {PLACEHOLDER!r}")
            kind = doc.get("kind")
            if kind == "TargetGroupBinding":
                self.check_target_group_binding(source, doc, services)
            elif kind == "Deployment":
                self.check_deployment(source, doc, config_maps)
            elif kind == "NetworkPolicy":
                self.check_network_policy(source, doc)
            elif kind == "PrometheusRule":
                self.check_schema(source, doc, PROMETHEUS_RULE_SCHEMA)
            elif kind == "ConfigMap" and (doc.get("metadata", {}).get("labels") or {}).get("grafana_dashboard") == "1":
                self.check_dashboard_config_map(source, doc)
            elif kind == "ServiceAccount" and self.overlay:
                arn = doc.get("metadata", {}).get("annotations", {}).get("eks.amazonaws.com/role-arn")
                if arn is None or not re.match(ROLE_ARN, arn):
                    self.problem(source, doc, f"eks.amazonaws.com/role-arn is not an IAM role ARN: {arn!r}")
        return len(docs)

    def check_schema(self, source: str, doc: dict, schema: dict) -> None:
        for error in jsonschema.Draft202012Validator(schema).iter_errors(doc):
            where = "/".join(str(part) for part in error.absolute_path) or "(root)"
            self.problem(source, doc, f"schema: {where}: {error.message}")

    def check_service_monitors(self, source: str, docs: list[dict]) -> None:
        services = [d for d in docs if d.get("kind") == "Service"]
        templates = [d["spec"]["template"] for d in docs if d.get("kind") == "Deployment"]
        for monitor in (d for d in docs if d.get("kind") == "ServiceMonitor"):
            self.check_schema(source, monitor, SERVICE_MONITOR_SCHEMA)
            spec = monitor.get("spec", {})
            selector = (spec.get("selector") or {}).get("matchLabels") or {}
            ports = {e.get("port") for e in spec.get("endpoints") or []}
            selected = [
                s for s in services if selector and selector.items() <= (s["metadata"].get("labels") or {}).items()
            ]
            if not selected:
                self.problem(source, monitor, f"selects no Service of the render (matchLabels {selector})")
            for service in selected:
                names = {p.get("name") for p in service.get("spec", {}).get("ports", [])}
                if not ports & names:
                    self.problem(source, monitor, f"Service {service['metadata']['name']} has no port named {sorted(ports)}")
                job_label = spec.get("jobLabel")
                if job_label and job_label not in (service["metadata"].get("labels") or {}):
                    self.problem(source, monitor, f"Service {service['metadata']['name']} has no label {job_label} (jobLabel)")
            if self.overlay:
                for label in spec.get("podTargetLabels") or []:
                    for template in templates:
                        labels = template.get("metadata", {}).get("labels") or {}
                        if label not in labels:
                            name = labels.get("app.kubernetes.io/name", "?")
                            self.problem(source, monitor, f"pods of {name} lack the label {label} (podTargetLabels)")

    def check_dashboard_config_map(self, source: str, doc: dict) -> None:
        data = doc.get("data") or {}
        if not data:
            self.problem(source, doc, "a grafana_dashboard ConfigMap without dashboards")
        for key, text in data.items():
            if not key.endswith(".json"):
                self.problem(source, doc, f"data key {key!r}: Grafana's sidecar loads *.json dashboards")
                continue
            try:
                dashboard = json.loads(text)
            except json.JSONDecodeError as error:
                self.problem(source, doc, f"{key} is not JSON: {error}")
                continue
            if not isinstance(dashboard, dict) or not dashboard.get("uid") or not dashboard.get("title"):
                self.problem(source, doc, f"{key} is no dashboard with a uid and a title")
        size = len(json.dumps(doc, separators=(",", ":")).encode("utf-8"))
        if size >= MAX_APPLIED_BYTES:
            self.problem(source, doc, f"{size} bytes: kubectl apply cannot record more than {MAX_APPLIED_BYTES}")

    def check_network_policy(self, source: str, doc: dict) -> None:
        for number, rule in enumerate(doc.get("spec", {}).get("ingress") or [], start=1):
            peers = (rule or {}).get("from") or []
            if not peers:
                self.problem(source, doc, f"ingress rule {number} has no `from`: it admits every source")
                continue
            for peer in peers:
                block = peer.get("ipBlock")
                if block is not None:
                    try:
                        network = ipaddress.ip_network(str(block.get("cidr")), strict=False)
                    except ValueError:
                        self.problem(source, doc, f"ingress rule {number}: ipBlock {block.get('cidr')!r} is not a CIDR")
                        continue
                    if network.prefixlen < MIN_INGRESS_PREFIX:
                        self.problem(
                            source,
                            doc,
                            f"ingress rule {number} admits {network} (wider than /{MIN_INGRESS_PREFIX}); admit the "
                            "load balancer subnets only (terraform output load_balancer_subnet_cidrs)",
                        )
                if "namespaceSelector" in peer and not (peer["namespaceSelector"] or {}):
                    self.problem(source, doc, f"ingress rule {number} has an empty namespaceSelector: every namespace")

    def check_load_balancer_reachability(self, source: str, docs: list[dict]) -> None:
        """Overlay rule: the pods behind each TargetGroupBinding admit an ipBlock on the target port."""
        by_kind: dict[str, dict[str, dict]] = {}
        for doc in docs:
            by_kind.setdefault(doc.get("kind", ""), {})[doc.get("metadata", {}).get("name", "")] = doc
        policies = list(by_kind.get("NetworkPolicy", {}).values())
        for binding in by_kind.get("TargetGroupBinding", {}).values():
            ref = binding.get("spec", {}).get("serviceRef", {})
            service = by_kind.get("Service", {}).get(ref.get("name"))
            if service is None:
                continue  # reported by check_target_group_binding
            selector = service.get("spec", {}).get("selector") or {}
            port = next(
                (p for p in service["spec"].get("ports", []) if ref.get("port") in (p.get("port"), p.get("name"))),
                None,
            )
            if port is None:
                self.problem(source, binding, f"serviceRef port {ref.get('port')!r} is not a port of Service {ref.get('name')}")
                continue
            target = port.get("targetPort", port.get("port"))
            # The pod template labels and the container port the target port names.
            pods = [
                d["spec"]["template"]
                for d in by_kind.get("Deployment", {}).values()
                if selector and selector.items() <= (d["spec"]["template"]["metadata"].get("labels") or {}).items()
            ]
            for template in pods:
                labels = template["metadata"].get("labels") or {}
                numbers = {target} | {
                    c_port.get("containerPort")
                    for container in template["spec"].get("containers", [])
                    for c_port in container.get("ports", [])
                    if c_port.get("name") == target
                }
                admitted = False
                for policy in policies:
                    match = policy.get("spec", {}).get("podSelector", {}).get("matchLabels") or {}
                    if not match.items() <= labels.items():
                        continue
                    for rule in policy["spec"].get("ingress") or []:
                        if not any("ipBlock" in peer for peer in rule.get("from") or []):
                            continue
                        ports = rule.get("ports") or []
                        if not ports or any(p.get("port") in numbers for p in ports):
                            admitted = True
                if not admitted:
                    self.problem(
                        source,
                        binding,
                        f"no NetworkPolicy admits the load balancer (an ipBlock ingress on port {target}) to the pods "
                        f"of Service {service['metadata']['name']}: add the load balancer subnets "
                        "(patches/network-policies.yaml in the overlay)",
                    )

    def check_target_group_binding(self, source: str, doc: dict, services: set[str]) -> None:
        self.check_schema(source, doc, TARGET_GROUP_BINDING_SCHEMA)
        spec = doc.get("spec", {})
        service = spec.get("serviceRef", {}).get("name")
        if service not in services:
            self.problem(source, doc, f"serviceRef names Service {service!r}, which is not in the render")
        arn = spec.get("targetGroupARN", "")
        if self.overlay and not re.match(TARGET_GROUP_ARN, arn):
            self.problem(source, doc, f"targetGroupARN is not a target group ARN: {arn!r}")

    def check_deployment(self, source: str, doc: dict, config_maps: dict[str, dict]) -> None:
        name = doc["metadata"]["name"]
        if name not in self.contracts:
            self.problem(source, doc, "unknown workload (no binary of that name in scripts/env_contract.py)")
            return
        pod = doc["spec"]["template"]["spec"]
        grace = pod.get("terminationGracePeriodSeconds", 30)
        for container in pod.get("containers", []):
            names: set[str] = set()
            # Literal values as the container sees them: later envFrom sources win, env wins over all.
            values: dict[str, str] = {}
            for source_ref in container.get("envFrom", []):
                ref = source_ref.get("configMapRef", {}).get("name")
                if ref is None:
                    self.problem(source, doc, "envFrom other than a ConfigMap (secrets come from Secrets Manager)")
                    continue
                if ref not in config_maps:
                    self.problem(source, doc, f"envFrom ConfigMap {ref!r} is not in the render")
                    continue
                names |= set(config_maps[ref])
                values.update({key: str(value) for key, value in config_maps[ref].items()})
            for entry in container.get("env", []):
                names.add(entry["name"])
                if "value" in entry:
                    values[entry["name"]] = str(entry["value"])
            # The EKS workloads run in AWS: no TANDEM_JWT_HS256_SECRET, TANDEM_JWKS_URL for Write.
            for message in env_contract.env_problems(name, names, aws=True, contracts=self.contracts):
                self.problem(source, doc, message)

            # The image has no RDS CA bundle: the file must come from a mounted volume.
            ca_file = values.get("DATABASE_CA_FILE")
            if ca_file:
                mounts = [m.get("mountPath", "").rstrip("/") for m in container.get("volumeMounts", [])]
                if not any(mount and ca_file.startswith(mount + "/") for mount in mounts):
                    self.problem(
                        source,
                        doc,
                        f"DATABASE_CA_FILE {ca_file!r} is under none of the container's volumeMounts "
                        "(the image carries no CA bundle; mount the ConfigMap tandem-rds-ca)",
                    )

            liveness = container.get("livenessProbe", {}).get("httpGet", {}).get("path")
            readiness = container.get("readinessProbe", {}).get("httpGet", {}).get("path")
            if liveness != "/healthz":
                self.problem(source, doc, f"liveness probe path is {liveness!r}, expected /healthz")
            if readiness != "/readyz":
                self.problem(source, doc, f"readiness probe path is {readiness!r}, expected /readyz")
            pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
            if pre_stop is None:
                self.problem(source, doc, "no preStop sleep")
            elif pre_stop >= grace:
                self.problem(source, doc, f"preStop sleep {pre_stop}s is not shorter than the grace period {grace}s")

            image = container.get("image", "")
            if self.overlay and not re.match(r"^[^/]+\.[^/]+/.+:[^:/]+$|@sha256:[0-9a-f]{64}$", image):
                self.problem(source, doc, f"image {image!r} names no registry and tag (set images: in the overlay)")

    def run(self, paths: list[Path]) -> int:
        total = 0
        for path in paths:
            total += self.check_file(path)
        mode = "overlay" if self.overlay else "base"
        print(f"check_manifests: {total} objects in {len(paths)} file(s) checked ({mode} rules)")
        for line in self.problems:
            print(f"  FAIL {line}")
        if self.problems:
            print(f"check_manifests: {len(self.problems)} problem(s)")
            return 1
        print("check_manifests: ok")
        return 0


def main(argv: list[str]) -> int:
    args = argv[1:]
    overlay = "--overlay" in args
    files = [Path(arg) for arg in args if arg != "--overlay"]
    if not files:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        checker = Checker(overlay)
    except env_contract.ContractError as error:
        print(f"check_manifests: cannot derive the environment contract from the sources: {error}")
        return 1
    return checker.run(files)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
