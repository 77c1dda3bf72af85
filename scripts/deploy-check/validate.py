"""Validates rendered manifests: built-in kinds against Kubernetes' OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail) at each Kubernetes version given,
custom resources with validate-crs.mjs. An object of an unknown kind or API version
fails. Usage: validate.py CRS_DIR VERSION[,VERSION...] FILE...; prints only problems."""

import json
import subprocess
import sys
import tempfile

import yaml
from kubernetes_validate import utils

CUSTOM = {
    "cert-manager.io/v1/Certificate",
    "cert-manager.io/v1/ClusterIssuer",
    "cert-manager.io/v1/Issuer",
    "keda.sh/v1alpha1/ScaledObject",
    "monitoring.coreos.com/v1/ServiceMonitor",
}


def main() -> int:
    crs_dir, versions, files = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
    failed, custom = 0, []
    for path in files:
        with open(path) as f:
            objects = [o for o in yaml.safe_load_all(f) if o]
        if not objects:
            print(f"ERROR {path}: no object")
            failed += 1
        for obj in objects:
            name = f"{path}: {obj.get('kind', '?').lower()}/{obj.get('metadata', {}).get('name')}"
            if f"{obj.get('apiVersion')}/{obj.get('kind')}" in CUSTOM:
                custom.append(obj)
                continue
            for version in versions:
                try:
                    utils.validate(obj, version, strict=True)
                except utils.ValidationError as e:
                    where = ".".join(str(p) for p in e.path)
                    print(f"ERROR {name} (Kubernetes {version}): {where}: {e.message}")
                    failed += 1
                except utils.SchemaNotFoundError as e:
                    print(f"ERROR {name}: {e.message}")
                    failed += 1
    if custom:
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            json.dump(custom, f)
            f.flush()
            result = subprocess.run(["node", "validate-crs.mjs", f.name], cwd=crs_dir)
            failed += result.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
