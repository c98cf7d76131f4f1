"""Write the openAPIV3Schema of KServe's CRDs that deploy/kserve uses, as JSON data files.

    python deploy/schemas/vendor_kserve.py /path/to/kserve-checkout [COMMIT]

reads `config/crd/full/serving.kserve.io_{clusterservingruntimes,inferenceservices}.yaml` at
COMMIT (default HEAD) with `git show` and writes `deploy/schemas/kserve/<kind>-<version>.json`
(the served storage version's schema, nothing else). tests/e2e/test_deploy.py validates the
manifests against them offline; deploy/schemas/README.md records the source and commit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

CRDS = ("clusterservingruntimes", "inferenceservices")
OUT = Path(__file__).resolve().parent / "kserve"


def main(checkout: str, commit: str = "HEAD") -> None:
    OUT.mkdir(exist_ok=True)
    for plural in CRDS:
        path = f"config/crd/full/serving.kserve.io_{plural}.yaml"
        text = subprocess.run(
            ["git", "-C", checkout, "show", f"{commit}:{path}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        crd = yaml.safe_load(text)
        kind = crd["spec"]["names"]["kind"]
        [version] = [v for v in crd["spec"]["versions"] if v.get("storage")]
        schema = version["schema"]["openAPIV3Schema"]
        target = OUT / f"{kind}-{version['name']}.json"
        target.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
        print(f"{target.name}: {path} at {commit}")


if __name__ == "__main__":
    main(*sys.argv[1:])
