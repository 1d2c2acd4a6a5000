"""The shipped config sample documents every key with its default; bad values are clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from l2tp_marker.config import ConfigError, DaemonConfig, config_from_dict, load_config
from l2tp_marker.engine import EngineConfig

SAMPLE = Path(__file__).resolve().parents[2] / "l2tp_marker" / "data" / "l2tp-marker.toml"


def test_sample_holds_every_key_with_its_default():
    cfg = load_config(SAMPLE)
    assert cfg == DaemonConfig()
    text = SAMPLE.read_text()
    for f in dataclasses.fields(DaemonConfig):
        if f.name != "engine":
            assert f"\n{f.name} = " in text, f"{f.name} undocumented"
    for f in dataclasses.fields(EngineConfig):
        assert f"{f.name} = " in text, f"engine.{f.name} undocumented"


@pytest.mark.parametrize("data,message", [
    ({"queue_in": 70000}, "queue_in"),
    ({"queue_in": 5, "queue_out": 5}, "must differ"),
    ({"inbound_match": "maybe"}, "inbound_match"),
    ({"bogus": 1}, "unknown key"),
    ({"engine": {"enforce": "kill"}}, "enforce"),
    ({"engine": {"nope": 1}}, "unknown key"),
    ({"engine": {"mark_mask": 0}}, "mark_mask"),
    ({"fastpath": "maybe"}, "fastpath must be 'auto', 'on' or 'off'"),
    ({"fastpath": True}, "fastpath must be"),
    ({"fastpath_bit": 3}, "fastpath_bit must be one bit"),
    ({"fastpath_bit": 0}, "fastpath_bit"),
    ({"fastpath_bit": 0x100000000}, "fastpath_bit"),
    ({"fastpath_bit": -0x80000000}, "fastpath_bit"),
    ({"fastpath_bit": True}, "fastpath_bit"),
    ({"fastpath_bit": "0x80000000"}, "fastpath_bit"),
])
def test_bad_values_are_clear_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_unreadable_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("queue_in = [")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(bad)


@pytest.mark.parametrize("data", [{"fastpath": "on"}, {"fastpath": "off", "fastpath_bit": 1},
                                  {"fastpath_bit": 0x100}, {"fastpath_bit": 0x80000000}])
def test_good_fastpath_settings(data):
    cfg = config_from_dict(data)
    assert {k: getattr(cfg, k) for k in data} == data
