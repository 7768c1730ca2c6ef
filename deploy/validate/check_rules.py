"""Checks deploy/monitoring/prometheus-rules.yaml against what the daemon exports, so that no
alert waits on a metric that never comes:

- every `hybrid_*` series an expression names is one src/telemetry/metrics.rs registers
  (prefix `hybrid_`; counters end in `_total`, histograms in `_bucket`, `_sum`, `_count`), or one
  listed in ANNOUNCED below;
- every other series is one of FOREIGN (metrics of other components, with why they are there);
- every `outcome` the expressions match is one the engine records (src/engine);
- each rule has an alert name, an expression with balanced brackets, a `for` that Terraform can
  turn into ISO 8601 (a number and s, m or h), a severity of critical, warning or info, and a
  summary and description (both Prometheus and Azure Monitor show them).

Usage: check_rules.py [RULES.yaml]
"""

import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
# Series of other components the rules use.
FOREIGN = {
    "keda_scaler_metrics_value": "KEDA's operator: the jobs queue's active messages as the scaler reads them",
}
# Daemon metrics being added in parallel to this file: accepted with a note until registered.
ANNOUNCED = {
    "daemon_faults": "the daemon-fault counter (labels: stage), issue 12 item 4",
}
PROMQL_WORDS = {
    "sum", "by", "without", "rate", "increase", "irate", "max", "min", "avg", "count", "and", "or", "unless",
    "on", "ignoring", "group_left", "group_right", "vector", "bool", "offset", "histogram_quantile", "absent",
    "le", "humanize", "humanizePercentage",
}


def registered_metrics() -> dict:
    source = (REPO / "src/telemetry/metrics.rs").read_text()
    names = {}
    for name in re.findall(r'register\(\s*"([a-z_]+)"', source):
        names[name] = {f"hybrid_{name}", f"hybrid_{name}_total", f"hybrid_{name}_bucket",
                       f"hybrid_{name}_sum", f"hybrid_{name}_count"}
    return names


def recorded_outcomes() -> set:
    """The outcome labels: the string arms of the match that names how a job ended, in the
    statement that ends in `job_ended(…)` (src/engine/mod.rs)."""
    source = (REPO / "src/engine/mod.rs").read_text()
    end = source.find(".job_ended(")
    start = source.rfind("let ended", 0, end)
    if end < 0 or start < 0:
        return set()
    pattern = r'=>\s*"([a-z_]+)"|^\s*"([a-z_]+)"\s*$'
    return {arm or block for arm, block in re.findall(pattern, source[start:end], re.M)}


def main() -> int:
    path = (Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "deploy/monitoring/prometheus-rules.yaml").resolve()
    errors, notes = [], []
    doc = yaml.safe_load(path.read_text())
    registered = registered_metrics()
    known = set().union(*registered.values())
    outcomes = recorded_outcomes()
    if not outcomes:
        errors.append("src/engine/mod.rs: cannot find the job outcomes (`let ended = …` before `job_ended(`)")
    rules = [r for g in doc.get("groups", []) for r in g.get("rules", [])]
    if not rules:
        errors.append("no rules")
    for rule in rules:
        where = rule.get("alert", "<unnamed rule>")
        expr = rule.get("expr", "")
        if "alert" not in rule:
            errors.append(f"{where}: no alert name")
        if not expr:
            errors.append(f"{where}: no expr")
        for open_, close in ("()", "[]", "{}"):
            if expr.count(open_) != expr.count(close):
                errors.append(f"{where}: unbalanced {open_}{close} in expr")
        if not re.fullmatch(r"[1-9][0-9]*[smh]", str(rule.get("for", ""))):
            errors.append(f"{where}: for {rule.get('for')!r} must be like 1m or 15m (Terraform makes it PT15M)")
        if rule.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
            errors.append(f"{where}: labels.severity must be critical, warning or info")
        for key in ("summary", "description"):
            if not rule.get("annotations", {}).get(key):
                errors.append(f"{where}: annotations.{key} is missing")
        bare = re.sub(r'"[^"]*"', '""', expr)
        bare = re.sub(r"\{[^}]*\}", "", bare)
        bare = re.sub(r"\[[^\]]*\]", "", bare)
        bare = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", bare)
        for series in sorted(set(re.findall(r"\b[a-zA-Z_][a-zA-Z0-9_]*\b", bare)) - PROMQL_WORDS):
            if series.startswith("hybrid_"):
                if series in known:
                    continue
                announced = next((a for a in ANNOUNCED if series in {f"hybrid_{a}", f"hybrid_{a}_total"}), None)
                if announced in registered:
                    notes.append(f"{where}: {series} is registered now: {announced!r} can leave ANNOUNCED")
                elif announced:
                    notes.append(f"{where}: {series} is not registered yet ({ANNOUNCED[announced]})")
                else:
                    errors.append(f"{where}: {series} is not a metric the daemon exports (src/telemetry/metrics.rs)")
            elif series not in FOREIGN and not re.fullmatch(r"[0-9.e]+", series):
                errors.append(f"{where}: {series} is neither a daemon metric nor a known foreign one")
        for value in re.findall(r'outcome\s*[!=]~?\s*"([^"]+)"', expr):
            for outcome in value.split("|"):
                if outcome not in outcomes:
                    errors.append(f"{where}: outcome {outcome!r} is not one the engine records")
    for n in notes:
        print(f"  note: {n}")
    for e in errors:
        print(f"  FAIL {e}")
    if errors:
        print(f"{path.relative_to(REPO)}: {len(errors)} problem(s)")
        return 1
    print(f"{path.relative_to(REPO)}: ok ({len(rules)} alert rules; every daemon metric they name is exported)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
