"""Every YAML example of docs/cookbook.md is a valid configuration (as `check-config` sees it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from dicomgate.config import parse_config

COOKBOOK = Path(__file__).resolve().parents[2] / "docs" / "cookbook.md"
BLOCKS = re.findall(r"^```yaml\n(.*?)^```", COOKBOOK.read_text(encoding="utf-8"), re.S | re.M)


def test_the_cookbook_has_its_four_scenarios() -> None:
    assert len(BLOCKS) == 4


@pytest.mark.parametrize("block", BLOCKS, ids=[f"scenario-{i + 1}" for i in range(len(BLOCKS))])
def test_cookbook_example_is_a_valid_config(block: str) -> None:
    config = parse_config(yaml.safe_load(block), environ={"DEID_SECRET": "cookbook-secret-0123"})
    assert config.routes, "each scenario routes something"
    for route in config.routes:
        assert set(route.to) <= set(config.destinations)
