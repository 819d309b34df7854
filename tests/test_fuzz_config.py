"""Property-based fuzzing (hypothesis) of the config validator: random edits of the real presets of config.yaml
(a value of another type, a number out of range, non-finite or huge, a missing key, an extra key, a value turned
into a string as nested ``--config`` values arrive) either pass or raise ConfigError naming a key, never another
exception, at each level the workflow and the jobs use:

* a job's keys: ``build_config(section_keys(preset, mode), mode)`` (what ``train`` resolves);
* the workflow: ``normalise_cli_values``, the JSON schema (``schema_problems``), then ``check_preset``;
* ``check_preset`` alone (it runs the schema first itself).

Example counts are small for CI (a few seconds in all); ``TCM_FUZZ_SCALE=50`` runs fifty times as many.
"""

from __future__ import annotations

import copy
import math
import os
from functools import cache
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from training_helpers import REPO

from tcm_core import presets
from tcm_core.errors import ConfigError
from tcm_core.training.config import FIELD_NAMES, MODES

SCALE = int(os.environ.get("TCM_FUZZ_SCALE", "1"))
PRESETS = ("tiny", "ci")  # the small ones: their architecture checks take milliseconds


def _settings(examples: int):
    return settings(max_examples=examples * SCALE, deadline=None, database=None, derandomize=SCALE == 1,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@cache
def _config() -> dict[str, Any]:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path below ``node`` (mappings only; lists are edited whole)."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            out.append((*prefix, key))
            out += _paths(value, (*prefix, key))
    return out


NUMBERS = st.one_of(
    st.sampled_from([0, -1, 1, 2, 10**9, 10**30, -(10**30), 0.5, 1e-300, 1e300, -1e300, math.inf, -math.inf,
                     math.nan, 2**63, 1.5]),
    st.integers(-(10**6), 10**6), st.floats(allow_nan=True, allow_infinity=True))
VALUES = st.one_of(
    NUMBERS, st.booleans(), st.none(), st.text(max_size=8),
    st.sampled_from(["0.5", "1e-4", "nan", "inf", "-1", "[1, 2]", "{a: 1}", "null", "true", "80,1.0", ""]),
    st.lists(NUMBERS, max_size=3), st.dictionaries(st.sampled_from(["a", "lr", "preset", "kind"]), NUMBERS,
                                                   max_size=2))


@st.composite
def mutated(draw) -> tuple[dict[str, Any], str]:
    """(a config with 1-3 random edits inside one preset, that preset's name)."""
    config = copy.deepcopy(_config())
    name = draw(st.sampled_from(PRESETS))
    config["preset"] = name
    block = config["presets"][name]
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(block)
        path = draw(st.sampled_from(paths))
        parent = block
        for key in path[:-1]:
            parent = parent[key]
        kind = draw(st.sampled_from(["replace", "replace", "delete", "extra", "extra_field", "stringify"]))
        if kind == "replace":
            parent[path[-1]] = draw(VALUES)
        elif kind == "delete":
            del parent[path[-1]]
        elif kind == "extra":
            parent[draw(st.sampled_from(["lrr", "x", "0", "preset"]))] = draw(VALUES)
        elif kind == "extra_field":  # a real TrainConfig key, maybe in the wrong section
            parent[draw(st.sampled_from(FIELD_NAMES))] = draw(VALUES)
        else:
            parent[path[-1]] = str(parent[path[-1]])
    return config, name


def _passes_or_config_error(check, *args) -> None:
    try:
        check(*args)
    except ConfigError as error:
        assert "\n" not in error.line()


@pytest.mark.parametrize("mode", MODES)
@_settings(25)
@given(case=mutated())
def test_job_keys_pass_or_raise_config_error(mode, case):
    config, name = case
    block = config["presets"][name]
    try:
        keys = presets.section_keys(block, mode)
    except ConfigError:
        return
    _passes_or_config_error(presets.build_config, keys, mode)


@_settings(20)
@given(case=mutated())
def test_workflow_check_passes_or_raises_config_error(case):
    config, name = case
    config = presets.normalise_cli_values(config)
    problems = presets.schema_problems(config)
    assert all(isinstance(p, ConfigError) for p in problems)
    if not problems:
        _passes_or_config_error(presets.check_preset, config, name, None)


@_settings(20)
@given(case=mutated())
def test_check_preset_alone_passes_or_raises_config_error(case):
    config, name = case
    _passes_or_config_error(presets.check_preset, config, name)


def test_the_real_presets_pass():
    for name in ("tiny", "ci", "cifar10"):  # the ImageNet presets need their dataset path from an overlay
        config = copy.deepcopy(_config())
        config["preset"] = name
        assert presets.schema_problems(config) == []
        presets.check_preset(config, name)
