"""LPIPS and FID Inception weights load from local files only, and fail naming the path."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.vgg import cfgs, make_layers

from provq_lightning.image import pretrained as pt


@pytest.fixture()
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path / "hub" / "checkpoints"


def test_missing_weights_name_the_expected_path(torch_home):
    with pytest.raises(pt.MissingWeights) as err:
        pt.build_lpips()
    assert str(torch_home / pt.VGG16_FILE) in str(err.value) and "lpips_weight: 0" in str(err.value)
    with pytest.raises(pt.MissingWeights, match=pt.FID_INCEPTION_FILE):
        pt.build_fid_inception(disable_hint="eval_fid: false")
    with pytest.raises(pt.MissingWeights, match="/no/such/vgg.pth"):
        pt.build_lpips("/no/such/vgg.pth")


def test_lpips_trunk_is_loaded_from_the_hub_cache(torch_home):
    torch.manual_seed(1)
    features = make_layers(cfgs["D"])  # torchvision VGG16's feature layers
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    torch_home.mkdir(parents=True)
    torch.save(state, torch_home / pt.VGG16_FILE)
    model = pt.build_lpips()
    assert torch.equal(getattr(model.net.slice1, "0").weight, features[0].weight)
    assert torch.equal(getattr(model.net.slice5, "28").bias, features[28].bias)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model(x, x).abs().max() < 1e-6 and (model(x, x.flip(-1)) > 0).all()
    # A checkpoint of the wrong network is refused, not half-loaded.
    torch.save({"conv.weight": torch.zeros(1)}, torch_home / "bad.pth")
    with pytest.raises(ValueError, match="not a torchvision VGG16"):
        pt.build_lpips(str(torch_home / "bad.pth"))


def test_fid_inception_is_loaded_from_a_configured_path(tmp_path):
    torch.manual_seed(2)
    reference = pt.FIDInception()
    state = {**reference.net.state_dict(), "fc.weight": torch.zeros(1008, 2048)}
    torch.save(state, tmp_path / "inception.pth")
    model = pt.build_fid_inception(str(tmp_path / "inception.pth"))
    for name, value in reference.net.state_dict().items():
        assert torch.equal(model.net.state_dict()[name], value), name
    features = model(torch.rand(1, 3, 40, 40))
    assert features.shape == (1, 2048) and torch.isfinite(features).all()


def test_fid_pooling_ignores_padding():
    x = torch.rand(1, 2, 5, 6)
    summed = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)  # counts padding
    (fixed,) = pt._no_pad_count_hook(None, (summed,))
    expected = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    assert torch.allclose(fixed, expected, atol=1e-6)
