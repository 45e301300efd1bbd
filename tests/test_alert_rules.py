"""The shipped alert rules parse and name only metrics the services export."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

import shared.metrics  # noqa: F401 - registers every tiermem metric

RULES = Path(__file__).resolve().parents[1] / "deploy" / "alerts"
METRIC = re.compile(r"\b(tiermem_[a-z_]+)\b")


def exported_names() -> set[str]:
    return {sample.name for family in REGISTRY.collect() for sample in family.samples
            if sample.name.startswith("tiermem_")} | {
        f"{family.name}{suffix}" for family in REGISTRY.collect()
        for suffix in ("_total", "_bucket", "_sum", "_count", "")
        if family.name.startswith("tiermem_")}


def test_every_rule_file_parses_and_each_alert_names_exported_metrics():
    files = sorted(RULES.glob("*.rules.yaml"))
    assert files, f"no rule files under {RULES}"
    exported = exported_names()
    alerts = 0
    for path in files:
        groups = yaml.safe_load(path.read_text())["groups"]
        for group in groups:
            for rule in group["rules"]:
                alerts += 1
                assert rule["alert"] and rule["expr"] and rule["annotations"]["summary"]
                names = set(METRIC.findall(rule["expr"]))
                assert names, f"{rule['alert']} names no tiermem metric"
                assert names <= exported, (rule["alert"], names - exported)
    assert alerts >= 2
