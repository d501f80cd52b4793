#!/usr/bin/env python3
"""Schema validation of every Kubernetes object the project ships or emits.

Each YAML document of each file is checked by what it is:

* built-in kinds (Deployment, Service, RBAC, the CRD object itself, ...): kubernetes-validate in
  strict mode (unknown fields are errors) against a fixed Kubernetes version;
* GLMModel: JSON Schema validation against the openAPIV3Schema of our own CRD, made strict the way
  the API server's field validation is (unknown fields are errors), then every CEL rule
  (x-kubernetes-validations) evaluated with cel-python where its field is present, `self` bound
  as the API server binds it. kubernetes-validate cannot do this: it only knows built-in kinds.
  Transition rules (`oldSelf`) need a stored object and are not evaluated (the CRD has none);
* other custom kinds (e.g. monitoring.coreos.com ServiceMonitor): no schema is available offline, so
  they are reported as SKIPPED, never silently passed.

Exit status 1 when anything fails; a summary line is always printed.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import celpy
import jsonschema
import kubernetes_validate
import yaml

# Custom kinds we emit on purpose but cannot validate offline.
KNOWN_UNVALIDATABLE = {("monitoring.coreos.com", "ServiceMonitor")}


@dataclass
class Report:
    passed: int = 0
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def ok(self, what: str, how: str, quiet: bool) -> None:
        self.passed += 1
        if not quiet:
            print(f"PASS {what} ({how})")

    def skip(self, what: str, why: str) -> None:
        self.skipped.append(what)
        print(f"SKIP {what}: {why}")

    def fail(self, what: str, why: str) -> None:
        self.failed.append(what)
        print(f"FAIL {what}: {why}")


def load_documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def describe(path: Path, doc: dict[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    name = meta.get("name", "?")
    namespace = meta.get("namespace")
    qualified = f"{namespace}/{name}" if namespace else name
    return f"{path}: {doc.get('kind', '?')} {qualified}"


def group_of(api_version: str) -> str:
    return api_version.split("/", 1)[0] if "/" in api_version else ""


def strict_schema(schema: Any) -> Any:
    """Forbid unknown fields wherever the API server would (fieldValidation=Strict, kubectl's
    default): in every object schema listing properties, unless it preserves unknown fields."""
    if isinstance(schema, dict):
        schema = {key: strict_schema(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    return schema


class CelRules:
    """Evaluates a CRD schema's x-kubernetes-validations rules on an object, as the API server
    does: each rule on the value at its schema node (absent optional fields are not checked)."""

    def __init__(self) -> None:
        self.env = celpy.Environment()
        self.programs: dict[str, Any] = {}

    def program(self, rule: str) -> Any:
        if rule not in self.programs:
            self.programs[rule] = self.env.program(self.env.compile(rule))
        return self.programs[rule]

    def errors(self, schema: Any, value: Any, path: str) -> list[str]:
        if not isinstance(schema, dict):
            return []
        found = []
        for rule in schema.get("x-kubernetes-validations") or []:
            if "oldSelf" in rule["rule"]:
                continue
            try:
                ok = self.program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)})
            except Exception as err:  # noqa: BLE001 - a rule that cannot evaluate is a failure
                ok = f"error: {err}"
            if ok is not True and str(ok) != "True":
                where = path + rule.get("fieldPath", "")
                message = rule.get("message") or f"failed rule: {rule['rule']}"
                found.append(f"{where or '<root>'}: Invalid value: {message}")
        if isinstance(value, dict):
            properties = schema.get("properties") or {}
            extra = schema.get("additionalProperties")
            for key, item in value.items():
                sub = properties.get(key, extra if isinstance(extra, dict) else None)
                found += self.errors(sub, item, f"{path}.{key}" if path else key)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                found += self.errors(schema.get("items"), item, f"{path}[{index}]")
        return found


CEL = CelRules()


class CrdSchemas:
    """openAPIV3Schema of each served version of a CRD, keyed by (group, version, kind)."""

    def __init__(self, crd: dict[str, Any]):
        spec = crd["spec"]
        self.group = spec["group"]
        self.kind = spec["names"]["kind"]
        self.schemas: dict[str, Any] = {}
        self.raw: dict[str, Any] = {}
        for version in spec["versions"]:
            if version.get("served", True):
                self.raw[version["name"]] = version["schema"]["openAPIV3Schema"]
                schema = strict_schema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
                # Every object has these; the API server checks metadata itself, so a CRD schema
                # may omit them (kube-rs does).
                properties = schema.setdefault("properties", {})
                properties.setdefault("apiVersion", {"type": "string"})
                properties.setdefault("kind", {"type": "string"})
                properties.setdefault("metadata", {"type": "object"})
                self.schemas[version["name"]] = schema

    def validate(self, doc: dict[str, Any]) -> None:
        api_version = doc.get("apiVersion", "")
        group, _, version = api_version.partition("/")
        if group != self.group or version not in self.schemas:
            served = ", ".join(f"{self.group}/{v}" for v in self.schemas)
            raise jsonschema.ValidationError(f"apiVersion {api_version!r} is not served (served: {served})")
        name = (doc.get("metadata") or {}).get("name")
        if not name:
            raise jsonschema.ValidationError("metadata.name is required")
        # Kubernetes quantities and int-or-strings carry no type; Draft 7 treats them as "any".
        validator = jsonschema.Draft7Validator(self.schemas[version])
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        if errors:
            first = errors[0]
            where = ".".join(str(p) for p in first.absolute_path) or "<root>"
            raise jsonschema.ValidationError(f"{where}: {first.message} ({len(errors)} error(s))")
        rule_errors = CEL.errors(self.raw[version], doc, "")
        if rule_errors:
            raise jsonschema.ValidationError("; ".join(rule_errors))


def validate_doc(
    path: Path, doc: dict[str, Any], crds: list[CrdSchemas], k8s_version: str, report: Report, quiet: bool
) -> None:
    what = describe(path, doc)
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        report.fail(what, "apiVersion and kind are required")
        return
    group = group_of(api_version)

    for crd in crds:
        if crd.group == group and crd.kind == kind:
            try:
                crd.validate(doc)
            except jsonschema.ValidationError as err:
                report.fail(what, err.message)
            else:
                report.ok(what, "CRD openAPIV3Schema, strict, and its CEL rules", quiet)
            return

    try:
        version = kubernetes_validate.validate(doc, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as err:
        where = ".".join(str(p) for p in err.path) or "<root>"
        report.fail(what, f"{where}: {err.message}")
    except kubernetes_validate.SchemaNotFoundError:
        if (group, kind) in KNOWN_UNVALIDATABLE:
            report.skip(what, f"{kind} is a {group} custom resource: no schema available offline")
        else:
            report.fail(what, f"no schema for {api_version} {kind} in Kubernetes {k8s_version}")
    else:
        report.ok(what, f"kubernetes-validate strict, Kubernetes {version}", quiet)


def run(files: Iterable[Path], crd_files: Iterable[Path], k8s_version: str, quiet: bool) -> Report:
    report = Report()
    crds = []
    for crd_file in crd_files:
        for doc in load_documents(crd_file):
            if doc.get("kind") == "CustomResourceDefinition":
                crds.append(CrdSchemas(doc))
    for path in files:
        try:
            docs = load_documents(path)
        except (OSError, yaml.YAMLError) as err:
            report.fail(str(path), f"cannot read YAML: {err}")
            continue
        if not docs:
            report.fail(str(path), "no Kubernetes object in file")
        for doc in docs:
            if not isinstance(doc, dict):
                report.fail(str(path), "document is not a mapping")
                continue
            validate_doc(path, doc, crds, k8s_version, report, quiet)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="YAML files (multi-document allowed)")
    parser.add_argument("--crd", action="append", type=Path, default=[],
                        help="CRD file whose custom kinds are validated by its schema (repeatable)")
    parser.add_argument("--kubernetes-version", default="1.33.0")
    parser.add_argument("--quiet", action="store_true", help="print failures and skips only")
    args = parser.parse_args(argv)

    report = run(args.files, args.crd, args.kubernetes_version, args.quiet)
    print(f"validate: {report.passed} passed, {len(report.failed)} failed, {len(report.skipped)} skipped")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
