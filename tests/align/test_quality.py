"""Quality masks (SCL classes, QA_PIXEL bits), chip thresholds, temporal matching and the spec sections."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import make_spec
from eoprep.align import QA_PIXEL_BITS, SCL_CLASSES, MaskRule, QualityRules
from eoprep.chips import SlotPlan, _match_dates
from eoprep.errors import SpecError


def test_scl_classes_and_qa_pixel_bits_become_flags():
    scl = MaskRule("SCL", "classes", SCL_CLASSES, exclude=("cloud", "shadow"), cloud=("cloud",))
    layer = np.array([0, 3, 4, 8, 9, 10, 11], np.uint8)
    assert scl.unusable(layer).tolist() == [False, True, False, True, True, True, False]
    assert scl.flagged(layer, ["snow"]).tolist() == [False] * 6 + [True]
    qa = MaskRule("QA_PIXEL", "bits", QA_PIXEL_BITS, exclude=("nodata", "cloud", "shadow"), cloud=("cloud",))
    # Landsat C2: 21824 clear land, 22280 cloud (bit 3), 23888 shadow (bit 4), 1 fill, 55052 cirrus (bit 2).
    words = np.array([21824, 22280, 23888, 1, 55052], np.uint16)
    assert qa.unusable(words).tolist() == [False, True, True, True, True]
    assert qa.cloudy(words).tolist() == [False, True, False, False, True]


def test_thresholds_give_reasons():
    rules = QualityRules(None, max_cloud=0.3, min_valid=0.5)
    assert rules.verdict("s2", 0.9, 0.1) is None
    assert rules.verdict("s2", 0.4, 0.1).startswith("quality: s2 valid_fraction 0.400 < quality.min_valid 0.5")
    assert "cloud_fraction 0.600 > quality.max_cloud 0.3" in rules.verdict("s2", 0.9, 0.6)
    assert rules.verdict("s1", 0.9, float("nan")) is None


def test_each_anchor_date_gets_the_nearest_scene_within_tolerance():
    day = pd.Timestamp("2024-05-01", tz="UTC")
    anchor = [SlotPlan(day + pd.Timedelta(days=d), ({"id": f"s2-{d}"},)) for d in (0, 10, 20)]
    other = [SlotPlan(day + pd.Timedelta(days=d), ({"id": f"s1-{d}"},)) for d in (2, 9, 40)]
    matched = _match_dates({"s2": anchor, "s1": other}, {"s1": pd.Timedelta("3D")})["s1"]
    assert [s.items[0]["id"] if s.items else None for s in matched] == ["s1-2", "s1-9", None]
    assert pd.isna(matched[2].time)


def test_spec_sections_validate_names(tmp_path):
    spec = make_spec(tmp_path, align={"reference": "s2", "bands": {"s2": ["B08"]}}, quality={"max_cloud": 0.4})
    assert spec.align.max_shift == 5 and spec.quality.exclude == ["cloud", "shadow"]
    with pytest.raises(SpecError, match=r"align.reference: \['s3'\] are not collection names"):
        make_spec(tmp_path, align={"reference": "s3"})
    with pytest.raises(SpecError, match=r"align.bands.s2: \['vv'\] are not bands"):
        make_spec(tmp_path, align={"reference": "s2", "bands": {"s2": ["vv"]}})
    with pytest.raises(SpecError, match=r"quality: flags \['haze'\] are defined in neither"):
        make_spec(tmp_path, quality={"exclude": ["haze"]})
    with pytest.raises(SpecError, match="not a duration"):
        make_spec(tmp_path, source__collections=[{"id": "x", "bands": ["a"], "match_tolerance": "soon"}])
