"""Embed specs: the shipped examples validate; errors name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from eoprep.embed import load_embed_spec, parse_embed_spec
from eoprep.errors import SpecError

PIPELINES = Path(__file__).parents[2] / "pipelines"


def test_demo_spec_validates_and_its_hash_ignores_paths_and_runtime():
    spec = load_embed_spec(PIPELINES / "embed-demo.yaml")
    assert spec.encoder.name == "mosaiks" and spec.input.mask.band == "SCL"
    moved = spec.model_copy(update={"output": spec.output.model_copy(update={"path": "elsewhere"})})
    assert moved.spec_hash() == spec.spec_hash()
    other = spec.model_copy(update={"encoder": spec.encoder.model_copy(update={"params": {"seed": 1}})})
    assert other.spec_hash() != spec.spec_hash()


@pytest.mark.parametrize("name", ["prithvi", "clay", "vit"])
def test_foundation_model_examples_need_only_their_local_checkpoint(name, tmp_path):
    data = yaml.safe_load((PIPELINES / f"embed-{name}.yaml").read_text())
    with pytest.raises(SpecError, match=rf"embed-{name}.yaml: encoder.checkpoint: .* does not exist"):
        load_embed_spec(PIPELINES / f"embed-{name}.yaml")
    (tmp_path / data["encoder"]["checkpoint"]).write_bytes(b"")
    spec = parse_embed_spec(data, origin="x.yaml", base=tmp_path)
    assert Path(spec.encoder.checkpoint).is_absolute()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"encoder": {"name": "resnet"}}, r"f.yaml: encoder.name: unknown encoder 'resnet'; choose one of"),
        ({"encoder": {"name": "vit", "checkpoint": "missing.pt"}}, r"encoder.checkpoint: .*missing.pt does not exist"),
        ({"runtime": {"batch_size": 0}}, r"runtime.batch_size"),
        ({"runtime": {"chips_per_task": 0}}, r"runtime.chips_per_task: .*positive integer or 'auto'"),
        ({"runtime": {"read_threads": "many"}}, r"runtime.read_threads"),
        ({"input": {"path": "o", "group": "s2", "mask": {"band": "SCL"}}}, r"input.mask.invalid: Field required"),
    ],
)
def test_errors_name_file_and_key(change, message, tmp_path):
    data = {
        "name": "t",
        "input": {"path": "o", "group": "s2"},
        "encoder": {"name": "mosaiks"},
        "output": {"path": "f"},
        **change,
    }
    path = tmp_path / "f.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match=message):
        load_embed_spec(path)
