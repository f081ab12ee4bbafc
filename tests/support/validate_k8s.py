#!/usr/bin/env python3
"""Validate Kubernetes manifests offline against the OpenAPI schemas of one Kubernetes release.

Every document of every file is checked in strict mode (unknown fields are errors) with the
schemas bundled in the kubernetes-validate package, pinned in tests/drivers/requirements.txt
and installed by scripts/setup.sh into target/driver-venv:

    target/driver-venv/bin/python tests/support/validate_k8s.py config/kubernetes/*.yaml
    target/driver-venv/bin/python tests/support/validate_k8s.py -k 1.29 config/kubernetes/*.yaml

Beyond the schemas, restartPolicy values are checked (the schemas take any string there).
Prints one line per document and one per error (file, document index, kind/name, path,
message); exits 1 if any document has an error, 2 on a usage error.
"""

import argparse
import importlib.resources
import json
import re
import sys

import jsonschema
import kubernetes_validate
import referencing
import yaml
from kubernetes_validate.utils import all_versions
from packaging.version import InvalidVersion, Version

# The OpenAPI schema types these as plain strings; the API server rejects anything else.
RESTART_POLICIES = {"Always", "OnFailure", "Never"}


def pick_version(wanted):
    """The bundled schema version for `wanted` ("1.33", "v1.33.0"), or the newest bundled."""
    bundled = sorted(set(all_versions()), key=Version)
    if wanted is None:
        return bundled[-1]
    try:
        minor = Version(wanted.lstrip("v")).release[:2]
    except InvalidVersion:
        minor = None
    for v in bundled:
        if Version(v).release[:2] == minor:
            return v
    print(f"validate_k8s: no schema for Kubernetes {wanted}; kubernetes-validate "
          f"{kubernetes_validate.__version__} bundles {', '.join(bundled)}", file=sys.stderr)
    sys.exit(2)


class Schemas:
    def __init__(self, version):
        self.dir = (importlib.resources.files("kubernetes_validate")
                    / "kubernetes-json-schema" / f"v{version}-local-strict")
        defs = json.loads((self.dir / "_definitions.json").read_text())
        self.registry = referencing.Resource.from_contents(defs) @ referencing.Registry()
        self.validators = {}

    def validator(self, api_version, kind):
        """A validator for apiVersion/kind, or None when the release has no such type."""
        # apps/v1 -> apps-v1, autoscaling/v2 -> autoscaling-v2, policy/v1 -> policy-v1, v1 -> v1
        group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
        name = f"{kind.lower()}-{group}.json"
        if name not in self.validators:
            path = self.dir / name
            validator = None
            if path.is_file():
                schema = json.loads(path.read_text())
                registry = referencing.Resource.from_contents(schema) @ self.registry
                validator = jsonschema.Draft202012Validator(schema, registry=registry)
            self.validators[name] = validator
        return self.validators[name]


def pod_specs(doc):
    """(path, pod spec) of the pod templates in a workload document."""
    spec = doc.get("spec") or {}
    kind = doc.get("kind")
    if kind == "Pod":
        yield "spec", spec
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        yield "spec.template.spec", (spec.get("template") or {}).get("spec") or {}
    elif kind == "CronJob":
        job = (spec.get("jobTemplate") or {}).get("spec") or {}
        yield "spec.jobTemplate.spec.template.spec", (job.get("template") or {}).get("spec") or {}


def restart_policy_errors(doc):
    """restartPolicy values the schema lets through and the API server refuses."""
    for path, pod in pod_specs(doc):
        policy = pod.get("restartPolicy")
        if policy is not None and policy not in RESTART_POLICIES:
            yield f"{path}.restartPolicy", f"{policy!r} is not one of {sorted(RESTART_POLICIES)}"
        for field in ("initContainers", "containers"):
            for i, c in enumerate(pod.get(field) or []):
                policy = c.get("restartPolicy") if isinstance(c, dict) else None
                if policy is not None and policy not in RESTART_POLICIES:
                    yield (f"{path}.{field}.{i}.restartPolicy",
                           f"{policy!r} is not one of {sorted(RESTART_POLICIES)}")


def document_errors(schemas, doc):
    if not isinstance(doc, dict):
        return [("", f"a manifest is a mapping, not {type(doc).__name__}")]
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return [("", "apiVersion and kind must both be set")]
    if api_version == "v1" and kind == "List":
        # kubectl's client-side list has no schema of its own: each item must pass.
        items = doc.get("items")
        if not isinstance(items, list):
            return [("items", "a List needs a list of items")]
        return sorted((f"items.{i}.{path}".rstrip("."), message)
                      for i, item in enumerate(items)
                      for path, message in document_errors(schemas, item))
    validator = schemas.validator(api_version, kind)
    if validator is None:
        return [("", f"no schema for {api_version} {kind} in this Kubernetes release")]
    errors = [(".".join(str(p) for p in e.absolute_path), e.message)
              for e in validator.iter_errors(doc)]
    errors.extend(restart_policy_errors(doc))
    return sorted(errors)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", "--kubernetes-version",
                        help="Kubernetes release to validate against, e.g. 1.33 "
                             "(default: the newest kubernetes-validate bundles)")
    parser.add_argument("files", nargs="+", metavar="FILE")
    args = parser.parse_args()

    version = pick_version(args.kubernetes_version)
    schemas = Schemas(version)
    print(f"validate_k8s: Kubernetes {version} schemas, strict, "
          f"kubernetes-validate {kubernetes_validate.__version__}")
    passed = failed = 0
    for name in args.files:
        try:
            with open(name, encoding="utf-8") as f:
                docs = list(yaml.safe_load_all(f))
        except (OSError, yaml.YAMLError) as e:
            print(f"FAIL {name}: {e}")
            failed += 1
            continue
        for index, doc in enumerate(docs, start=1):
            if doc is None:  # an empty document, e.g. after a trailing ---
                continue
            what = "?"
            if isinstance(doc, dict):
                meta = doc.get("metadata") or {}
                what = f"{doc.get('kind', '?')}/{meta.get('name', '?') if isinstance(meta, dict) else '?'}"
            errors = document_errors(schemas, doc)
            print(f"{'FAIL' if errors else 'ok  '} {name} document {index} {what}")
            for path, message in errors:
                print(f"       {path or '(document)'}: {message}")
            failed += bool(errors)
            passed += not errors
    print(f"validate_k8s: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
