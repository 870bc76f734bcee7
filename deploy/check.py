#!/usr/bin/env python3
"""Static checks of everything in deploy/, run by the test command.

No image can be pulled and no cloud reached here, so the deploy files are checked as
files: YAML style (yamllint), Prometheus rules (promtool check and unit tests),
Dockerfile and Terraform security findings (checkov: none may fail; every skip carries
its reason in a comment), Terraform syntax (python-hcl2), the compose file against our
own policy, and the Grafana dashboards against their generator. Exits non-zero on the
first failing check, saying which and why.
"""
import json
import pathlib
import re
import subprocess
import sys

import hcl2
import yaml

HERE = pathlib.Path(__file__).resolve().parent
failures = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail and not ok else ""))
    if not ok:
        failures.append(name)


def run(name, cmd, cwd=HERE):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    check(name, out.returncode == 0, (out.stdout + out.stderr)[-4000:])
    return out


# Run as modules of this Python, so a pip scripts folder missing from PATH does not matter.
run("yamllint", [sys.executable, "-m", "yamllint", "-s", "-c", ".yamllint.yaml", "compose.yaml", "prometheus", "grafana/provisioning"])
run("promtool check rules", ["promtool", "check", "rules", "prometheus/rules.yml"])
run("promtool check config", ["promtool", "check", "config", "--syntax-only", "prometheus/prometheus.yml"])
run("promtool test rules", ["promtool", "test", "rules", "rules_test.yml"], cwd=HERE / "prometheus")

# checkov: --skip-download keeps it off the network (it cannot reach its API here).
for framework, target in [("dockerfile", ["-f", "Dockerfile"]), ("terraform", ["-d", "terraform"])]:
    out = run(
        f"checkov {framework}",
        [sys.executable, "-m", "checkov.main", *target, "--framework", framework, "--compact", "--quiet", "--skip-download", "-o", "json"],
    )
    try:
        report = json.loads(out.stdout)
        reports = report if isinstance(report, list) else [report]
        for r in reports:
            skipped = r.get("results", {}).get("skipped_checks", [])
            for s in skipped:
                reason = (s.get("check_result") or {}).get("suppress_comment", "")
                check(f"checkov skip {s['check_id']} on {s['resource']} has a reason", len(reason) > 20, reason)
    except json.JSONDecodeError:
        pass

# Terraform parses, every variable is documented and typed, every output described.
tf = {}
for path in sorted((HERE / "terraform").glob("*.tf")):
    try:
        with open(path) as f:
            tf[path.name] = hcl2.load(f)
        check(f"hcl2 parses {path.name}", True)
    except Exception as e:  # noqa: BLE001 — the parser's error is the message
        check(f"hcl2 parses {path.name}", False, str(e))
for block in tf.get("variables.tf", {}).get("variable", []):
    for name, body in block.items():
        check(f"variable {name} documented", bool(body.get("description")) and "type" in body)
for block in tf.get("outputs.tf", {}).get("output", []):
    for name, body in block.items():
        check(f"output {name} documented", bool(body.get("description")))
declared = {n for b in tf.get("variables.tf", {}).get("variable", []) for n in b}
used = set()
for path in (HERE / "terraform").glob("*.tf*"):
    used |= set(re.findall(r"\bvar\.([a-z0-9_]+)", path.read_text()))
check("every var.* used is declared", used <= declared, str(used - declared))
check("every variable declared is used", declared <= used, str(declared - used))
example = (HERE / "terraform" / "terraform.tfvars.example").read_text()
required = {
    n for b in tf.get("variables.tf", {}).get("variable", []) for n, body in b.items() if "default" not in body
}
check("the example sets every required variable", all(re.search(rf"^{n}\s*=", example, re.M) for n in required))

# compose: our policy for a one-host install.
compose = yaml.safe_load((HERE / "compose.yaml").read_text())
for name, svc in compose["services"].items():
    check(f"compose {name}: no-new-privileges", "no-new-privileges:true" in svc.get("security_opt", []))
    check(f"compose {name}: not privileged", not svc.get("privileged", False))
    for port in svc.get("ports", []):
        check(f"compose {name}: port {port} bound to 127.0.0.1", str(port).startswith("127.0.0.1:"))
    for key, value in (svc.get("environment") or {}).items():
        secretish = re.search(r"PASSWORD|SECRET|TOKEN", key) and not key.endswith("_FILE") and not key.endswith("__FILE")
        check(f"compose {name}: {key} is not a secret in plain text", not secretish)
    if name not in ("minio-init",):
        check(f"compose {name}: has a health check", "healthcheck" in svc)
    image = svc.get("image", "")
    check(f"compose {name}: image pinned", "build" in svc or (":" in image and not image.endswith(":latest")))
quiver = compose["services"]["quiver"]
check("compose quiver: read-only root, capabilities dropped", quiver.get("read_only") and quiver.get("cap_drop") == ["ALL"])
check("compose quiver: on the S3-compatible store", quiver["environment"]["QUIVER_STORE"].startswith("s3://"))
mounted = " ".join(compose["services"]["prometheus"]["volumes"])
check("compose prometheus: loads rules.yml", "rules.yml" in mounted)

# Grafana: the dashboards are what the generator writes, parse, and query Prometheus.
sys.path.insert(0, str(HERE / "grafana"))
import generate  # noqa: E402

for name, text in generate.render().items():
    path = HERE / "grafana" / "dashboards" / name
    check(f"grafana {name} matches generate.py", path.exists() and path.read_text() == text)
    board = json.loads(path.read_text())
    check(f"grafana {name} has panels with queries", all(p["targets"] for p in board["panels"]) and board["panels"])
for ds in yaml.safe_load((HERE / "grafana/provisioning/datasources/quiver.yaml").read_text())["datasources"]:
    if ds["uid"] == "quiver":
        check("grafana Quiver data source speaks Postgres to port 5433", "postgres" in ds["type"] and ds["url"].endswith(":5433"))

if failures:
    print(f"\n{len(failures)} deploy check(s) failed: {', '.join(failures)}")
    sys.exit(1)
print("\nall deploy checks passed")
