"""Adapter configs: JSON round trips and field-by-field validation with errors that name the field."""
from __future__ import annotations

import json
import math

import pytest

import fastadapters as fa
from fastadapters.config import AdapterConfig, make_config

CONFIGS = [
    fa.LoRAConfig(),
    fa.LoRAConfig(r=5, alpha=7.5, dropout=0.1, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    fa.SeriesConfig(),
    fa.SeriesConfig(variant="pfeiffer", bottleneck_size=3, non_linearity="relu", scaling="learned",
                    dropout=0.2, init="zero_up", target_modules=["down_proj"]),
    fa.ParallelConfig(),
    fa.ParallelConfig(bottleneck_size=7, non_linearity="sigmoid", scaling=2.5, init="zero_up"),
    fa.PrefixConfig(),
    fa.PrefixConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{type(c).__name__}")
def test_json_round_trip(cfg):
    cfg.validate()
    s = cfg.to_json()
    d = json.loads(s)
    assert d["adapter_type"] == cfg.adapter_type
    for back in (type(cfg).from_json(s), AdapterConfig.from_json(s), AdapterConfig.from_dict(d)):
        assert type(back) is type(cfg)
        assert back == cfg
        assert back.to_json() == s


def test_make_config_and_lora_scaling():
    assert make_config("lora", r=4, alpha=8).scaling == 2.0
    assert make_config("lora", r=4, alpha=8, use_rslora=True).scaling == pytest.approx(8 / math.sqrt(4))
    assert isinstance(make_config("series", variant="pfeiffer"), fa.SeriesConfig)
    assert fa.LoRAConfig(target_modules="q_proj").validate().target_modules == ["q_proj"]


BAD = [
    # (class, field, bad value)
    (fa.LoRAConfig, "r", 0),
    (fa.LoRAConfig, "r", -3),
    (fa.LoRAConfig, "r", 2.5),
    (fa.LoRAConfig, "r", True),
    (fa.LoRAConfig, "r", "8"),
    (fa.LoRAConfig, "alpha", -1.0),
    (fa.LoRAConfig, "alpha", float("nan")),
    (fa.LoRAConfig, "alpha", float("inf")),
    (fa.LoRAConfig, "alpha", "16"),
    (fa.LoRAConfig, "dropout", -0.1),
    (fa.LoRAConfig, "dropout", 1.0),
    (fa.LoRAConfig, "dropout", None),
    (fa.LoRAConfig, "use_rslora", 1),
    (fa.LoRAConfig, "use_rslora", "yes"),
    (fa.LoRAConfig, "target_modules", []),
    (fa.LoRAConfig, "target_modules", [""]),
    (fa.LoRAConfig, "target_modules", [3]),
    (fa.LoRAConfig, "target_modules", 7),
    (fa.SeriesConfig, "bottleneck_size", 0),
    (fa.SeriesConfig, "bottleneck_size", 1.5),
    (fa.SeriesConfig, "non_linearity", "softmax"),
    (fa.SeriesConfig, "non_linearity", None),
    (fa.SeriesConfig, "scaling", "learn"),
    (fa.SeriesConfig, "scaling", float("nan")),
    (fa.SeriesConfig, "scaling", None),
    (fa.SeriesConfig, "dropout", 1.5),
    (fa.SeriesConfig, "init", "xavier"),
    (fa.SeriesConfig, "variant", "adapterh"),
    (fa.SeriesConfig, "target_modules", ()),
    (fa.ParallelConfig, "bottleneck_size", -1),
    (fa.ParallelConfig, "non_linearity", "Tanh"),
    (fa.ParallelConfig, "scaling", float("-inf")),
    (fa.ParallelConfig, "scaling", True),
    (fa.SeriesConfig, "dropout", False),
    (fa.ParallelConfig, "dropout", -1),
    (fa.ParallelConfig, "init", ""),
    (fa.PrefixConfig, "num_virtual_tokens", 0),
    (fa.PrefixConfig, "num_virtual_tokens", 2.0),
    (fa.PrefixConfig, "encoder_hidden_size", 0),
    (fa.PrefixConfig, "prefix_projection", "true"),
    (fa.PrefixConfig, "target_modules", ["q_proj"]),
]


@pytest.mark.parametrize("cls,name,value", BAD, ids=lambda v: repr(v) if not isinstance(v, type) else v.__name__)
def test_bad_field_names_the_field(cls, name, value):
    with pytest.raises(ValueError) as e:
        cls(**{name: value}).validate()
    msg = str(e.value)
    assert name in msg and "valid" in msg, msg
    # the same error through make_config (what fa.patch calls) and through JSON
    with pytest.raises(ValueError, match=name):
        make_config(cls.adapter_type, **{name: value})
    d = cls().to_dict()
    d[name] = value
    if not (isinstance(value, float) and not math.isfinite(value)):  # JSON has no nan/inf
        with pytest.raises(ValueError, match=name):
            AdapterConfig.from_json(json.dumps(d))


def test_unknown_fields_and_types_list_valid():
    with pytest.raises(ValueError, match=r"adapter: got 'loraa'; valid: lora, series, houlsby, pfeiffer, parallel, prefix"):
        make_config("loraa")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rank'\].*valid"):
        make_config("lora", rank=4)
    with pytest.raises(ValueError, match=r"adapter_type: got 'ia3'; valid"):
        AdapterConfig.from_dict({"adapter_type": "ia3"})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bogus'\]"):
        AdapterConfig.from_dict({"adapter_type": "series", "bogus": 1})
    with pytest.raises(ValueError, match="adapter_type"):
        fa.LoRAConfig.from_dict({"adapter_type": "series"})


@pytest.mark.parametrize("value", [0.0, -1.0, 0.5, "learned"])
def test_good_scaling_values(value):
    assert fa.ParallelConfig(scaling=value).validate().scaling == value
