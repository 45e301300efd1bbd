"""Write deploy/prometheusrule.yaml: each deploy/alerts/*.rules.yaml as a PrometheusRule.

Why: the rule files are plain Prometheus rule files (promtool checks them, any
Prometheus loads them), but the Prometheus operator on Kubernetes takes rules
only as PrometheusRule objects, and kustomize cannot wrap a file into one. So
the objects are made here and checked in; tests/test_k8s_manifests.py fails
when they no longer match the rule files. Run after editing a rule file:

    .venv/bin/python deploy/render_rules.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ALERTS = HERE / "alerts"
OUT = HERE / "prometheusrule.yaml"
HEADER = ("# Made by deploy/render_rules.py from deploy/alerts/*.rules.yaml: edit those and\n"
          "# re-run it (tests/test_k8s_manifests.py checks that this file is current).\n")


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None  # PromQL and descriptions stay readable
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    docs = []
    for path in sorted(ALERTS.glob("*.rules.yaml")):
        groups = yaml.safe_load(path.read_text())["groups"]
        docs.append({
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {"name": path.name.removesuffix(".rules.yaml"),
                         "labels": {"app.kubernetes.io/part-of": "tiermem"}},
            "spec": {"groups": groups},
        })
    body = yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=100, explicit_start=True)
    return HEADER + body


def main() -> int:
    OUT.write_text(render())
    print(f"wrote {OUT.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
