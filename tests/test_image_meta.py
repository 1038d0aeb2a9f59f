"""A1111 "parameters" text and provenance survive a round trip through a PNG."""

import json

import pytest
from PIL import Image

from workbench.pipeline.image_meta import (format_parameters, lora_hashes_field, parse_parameters,
                                       read_png_metadata, save_png)
from workbench.errors import OutputExistsError


def sample_text():
    return format_parameters(
        "wbstyle, a lighthouse at dusk, (oil painting:1.2)", "blurry, low quality",
        Steps=20, Sampler="DPM++ 2M Karras", **{"CFG scale": 7.0}, Seed=1234, Size="512x768",
        **{"Model hash": "1a2b3c4d5e", "Model": "dreamy-v2",
           "Lora hashes": lora_hashes_field({"my-style": "0123456789ab", "other": "ba9876543210"})},
        Version="workbench 0.1.0")


def test_format_is_a1111s():
    lines = sample_text().split("\n")
    assert lines[0] == "wbstyle, a lighthouse at dusk, (oil painting:1.2)"
    assert lines[1] == "Negative prompt: blurry, low quality"
    assert lines[2].startswith("Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.0, Seed: 1234, "
                               "Size: 512x768, Model hash: 1a2b3c4d5e, Model: dreamy-v2, ")
    # a value with commas and colons is quoted as A1111 does
    assert 'Lora hashes: "my-style: 0123456789ab, other: ba9876543210"' in lines[2]


def test_parse_round_trip():
    parsed = parse_parameters(sample_text())
    assert parsed["prompt"] == "wbstyle, a lighthouse at dusk, (oil painting:1.2)"
    assert parsed["negative_prompt"] == "blurry, low quality"
    assert parsed["Steps"] == "20" and parsed["Sampler"] == "DPM++ 2M Karras"
    assert parsed["CFG scale"] == "7.0" and parsed["Seed"] == "1234" and parsed["Size"] == "512x768"
    assert parsed["Lora hashes"] == "my-style: 0123456789ab, other: ba9876543210"


def test_parse_multiline_prompt_and_no_negative():
    text = format_parameters("line one\nline two", Steps=4, Sampler="LCM", Seed=7)
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "line one\nline two" and parsed["negative_prompt"] == ""
    assert parsed["Sampler"] == "LCM"


def test_png_carries_parameters_and_provenance(tmp_path):
    img = Image.new("RGB", (16, 16), "teal")
    prov = {"recipe": {"text": "kind: generate"}, "inputs": {"model": {"sha256": "ab" * 32}}}
    path = save_png(img, tmp_path / "cell.png", sample_text(), prov)
    with Image.open(path) as back:
        assert back.text["parameters"] == sample_text()  # what A1111's PNG Info tab reads
        assert back.size == (16, 16)
    params, provenance = read_png_metadata(path)
    assert params["Model hash"] == "1a2b3c4d5e" and provenance == json.loads(json.dumps(prov))
    with pytest.raises(OutputExistsError):
        save_png(img, path, "x")
    assert not list(tmp_path.glob("*.tmp"))
