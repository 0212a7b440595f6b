from __future__ import annotations

import pytest
from pydantic import ValidationError

from eoprep.codecs import CodecSpec


def test_lossless_only_codecs_imply_lossless() -> None:
    assert CodecSpec(name="zstd").lossless
    assert CodecSpec.model_validate({"name": "ffv1"}).lossless


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "h264", "bit_depth": 12}, "codec.bit_depth: h264 supports bit depths 8, 10; got 12"),
        ({"name": "av1", "bit_depth": 12}, "codec.bit_depth: av1 supports"),
        ({"name": "h265", "quality": 20, "target_bpppb": 0.1}, "codec.target_bpppb: set only one"),
        ({"name": "zstd", "lossless": False}, "codec.lossless: zstd is lossless only"),
        ({"name": "h265", "max_error": 1.0}, "codec.max_error: only lerc"),
        ({"name": "zstd", "level": 40}, "codec.level: zstd compression level is 1–22, got 40"),
        ({"name": "av1", "lossless": True}, "codec.lossless: SVT-AV1 has no lossless mode"),
        ({"name": "webp"}, "name"),
        ({"name": "h265", "target_bpppb": -1}, "target_bpppb"),
    ],
)
def test_invalid_specs_name_the_field(data: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        CodecSpec.model_validate(data)


def test_spec_round_trips_through_json() -> None:
    spec = CodecSpec(name="h265", target_bpppb=0.1, bit_depth=12, nodata=0)
    assert CodecSpec.model_validate_json(spec.model_dump_json()) == spec
