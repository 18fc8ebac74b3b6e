"""Every metric and label that deploy/grafana/*.json and deploy/prometheus/*.yml use exists in
what the gateway's ``/metrics`` exposes.

The exposition is the real one: :class:`Metrics` with its scrape-time collector, every
labelled series touched once, rendered and parsed back with prometheus-client's parser. The
integration test (test_metrics_audit.py) checks names after a workload; this one checks
labels too, for every file in deploy/, without a gateway.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from dicomgate.observability.metrics import GatewayCollector, Metrics, QueueFigures, build_info

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# Labels Prometheus adds to every series it scrapes, not the gateway.
_TARGET_LABELS = {"job", "instance"}
_REFERENCE = re.compile(r"\b(dicomgate_[a-zA-Z0-9_]+)(?:\{([^}]*)\})?")
_SELECTOR_LABEL = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def exposed_series() -> dict[str, set[str]]:
    """Series name -> label names, from a rendered exposition with every series present."""
    metrics = Metrics()
    build_info(metrics.registry, "0.0.0", "node")
    metrics.add_collector(
        GatewayCollector(
            queue_depth=lambda: {"d": QueueFigures({"pending": 1}, datetime.now(UTC))},
            destinations=lambda: {"d": {"breaker_open": 0, "schedule_open": 1}},
            store_path=Path("/"),
            destination_names=["d"],
        )
    )
    for metric in vars(metrics).values():
        names = getattr(metric, "_labelnames", None)
        if not names:
            continue
        child = metric.labels(*["x"] * len(names))
        if hasattr(child, "observe"):
            child.observe(1)
        elif hasattr(child, "inc"):
            child.inc()
        else:
            child.set(1)
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.render()[0].decode()):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def deploy_expressions() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and alert rule in deploy/."""

    def walk(node: Any, where: str) -> Iterator[tuple[str, str]]:
        if isinstance(node, dict):
            title = node.get("title")
            here = f"{where} / {title}" if isinstance(title, str) else where
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    yield here, value
                else:
                    yield from walk(value, here)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item, where)

    for path in sorted(DEPLOY.glob("grafana/*.json")):
        yield from walk(json.loads(path.read_text()), path.name)
    for path in sorted(DEPLOY.glob("prometheus/*.y*ml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                yield f"{path.name} / {rule.get('alert') or rule.get('record')}", rule["expr"]


def problems(expr: str, series: dict[str, set[str]]) -> list[str]:
    """Metrics of ``expr`` not exposed, and labels no metric of ``expr`` has."""
    found: list[str] = []
    used_labels: set[str] = set()
    expr_labels: set[str] = set()
    for match in _REFERENCE.finditer(expr):
        name, selector = match.group(1), match.group(2) or ""
        if name not in series:
            found.append(f"metric {name} is not exposed")
            continue
        expr_labels |= series[name]
        missing = set(_SELECTOR_LABEL.findall(selector)) - series[name] - _TARGET_LABELS
        found += [f"{name} has no label {label!r}" for label in sorted(missing)]
    for grouping in _GROUPING.findall(expr):
        used_labels |= {label.strip() for label in grouping.split(",") if label.strip()}
    # by (...) may name a label of any metric of the expression (joins, on/group_left).
    found += [
        f"no metric of the expression has label {label!r} (by/without)"
        for label in sorted(used_labels - expr_labels - _TARGET_LABELS - {"le"})
    ]
    return found


@pytest.fixture(scope="module")
def series() -> dict[str, set[str]]:
    return exposed_series()


def test_deploy_files_reference_only_exposed_metrics_and_labels(
    series: dict[str, set[str]],
) -> None:
    expressions = list(deploy_expressions())
    assert len(expressions) >= 10, "no dashboard panels or alert rules found in deploy/"
    references = [m.group(1) for _, e in expressions for m in _REFERENCE.finditer(e)]
    assert len(references) >= 10
    bad = [f"{where}: {p}" for where, expr in expressions for p in problems(expr, series)]
    assert not bad, "\n".join(bad)


def test_the_check_catches_a_wrong_name_or_label(series: dict[str, set[str]]) -> None:
    assert (
        problems(
            'sum by (destination) (rate(dicomgate_deliveries_total{outcome="done"}[5m]))', series
        )
        == []
    )
    assert problems("rate(dicomgate_deliverys_total[5m])", series) == [
        "metric dicomgate_deliverys_total is not exposed"
    ]
    assert problems('dicomgate_queue_jobs{state="dead", dest="x"}', series) == [
        "dicomgate_queue_jobs has no label 'dest'"
    ]
    assert problems("sum by (calling_ae) (dicomgate_queue_jobs)", series) == [
        "no metric of the expression has label 'calling_ae' (by/without)"
    ]
