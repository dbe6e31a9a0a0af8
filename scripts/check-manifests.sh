#!/usr/bin/env bash
# Checks deploy/kubernetes/*.yaml: against Kubernetes' own schemas (kubernetes-validate, pinned,
# installed from PyPI into target/pyk8s, strict: no unknown fields), and against wick itself:
# every probe asks /health on the served port, every environment variable is one `wick --help`
# lists, the grace period covers GRACEFUL_TERMINATION_TIMEOUT, CPU request equals its limit.
#
#   scripts/check-manifests.sh [path/to/wick]      (integration-tests/tests/operations.rs runs it)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
wick=${1:-$root/target/debug/wick}
deps="$root/target/pyk8s"
. "$root/scripts/lib.sh"
pip_pinned "$deps" "kubernetes-validate==1.37.0"

manifests=("$root"/deploy/kubernetes/*.yaml)
PYTHONPATH="$deps" python3 -m kubernetes_validate --strict --quiet "${manifests[@]}"

help=$(mktemp)
trap 'rm -f "$help"' EXIT
"$wick" --help > "$help"
PYTHONPATH="$deps" python3 - "$help" "${manifests[@]}" <<'PY'
import re
import sys

import yaml

help_text = open(sys.argv[1]).read()
known_env = set(re.findall(r"\[env: ([A-Z0-9_]+)=", help_text)) | {"HF_HOME", "API_KEY"}
problems = []
workloads = 0
for path in sys.argv[2:]:
    for doc in yaml.safe_load_all(open(path)):
        if not doc or doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        workloads += 1
        name = f'{doc["kind"]}/{doc["metadata"]["name"]}'
        pod = doc["spec"]["template"]["spec"]
        for c in pod["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            for var in env:
                if var not in known_env:
                    problems.append(f"{name}: wick does not read {var}")
            port = int(env.get("PORT", "80"))
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                get = c.get(probe, {}).get("httpGet")
                if not get:
                    problems.append(f"{name}: no {probe} over HTTP")
                    continue
                target = ports.get(get["port"], get["port"])
                if get["path"] != "/health" or target != port:
                    problems.append(f"{name}: {probe} asks {get['path']} on {target}, not /health on {port}")
            grace = pod.get("terminationGracePeriodSeconds", 30)
            drain = int(env.get("GRACEFUL_TERMINATION_TIMEOUT", "90"))
            if grace < drain + 10:
                problems.append(f"{name}: grace period {grace}s < drain {drain}s + 10s")
            resources = c.get("resources", {})
            if resources.get("requests", {}).get("cpu") != resources.get("limits", {}).get("cpu"):
                problems.append(f"{name}: CPU request and limit differ")
if workloads == 0:
    problems.append("no Deployment or StatefulSet")
for p in problems:
    print(p, file=sys.stderr)
sys.exit(1 if problems else 0)
PY
echo "manifests ok: ${manifests[*]}"
