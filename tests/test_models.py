"""bmrs.models: shapes, noise placement, torchvision/timm naming, parameter counts, pretrained loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bmrs
from bmrs.errors import CheckpointError, ConfigError
from bmrs.models import (
    MODEL_NAMES, build_model, lenet5, load_pretrained, mlp, resnet18, resnet50, vit,
)
from bmrs.nn.attach import detach_noise


def own_parameter_count(model: nn.Module) -> int:
    """Parameters of the model itself, not of its noise layers."""
    return sum(p.numel() for name, p in model.named_parameters() if "bmrs_noise" not in name)


def noise_sizes(model: nn.Module) -> list[int]:
    return [noise.num_features for _, noise in bmrs.noise_layers(model)]


def bn_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return resnet50()


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory):
    torch.manual_seed(1)
    plain = resnet18(num_classes=10, small_input=True, noise=False)
    # Make BN statistics non-trivial so a wrong mapping of buffers would change the outputs.
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pt"
    torch.save(plain.state_dict(), path)
    return plain.eval(), path


# -- shapes -------------------------------------------------------------------------------------------
def test_mlp_shape_and_noise():
    model = mlp()
    assert isinstance(model, nn.Sequential)
    assert model(torch.randn(3, 1, 32, 32)).shape == (3, 10)
    assert noise_sizes(model) == [150, 150]
    # input → 150 → 150 → 10, noise after each Tanh that follows a hidden Linear, never on the head.
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1024, 150), (150, 150), (150, 10)]
    names = [name for name, _ in bmrs.noise_layers(model)]
    assert all(isinstance(model[int(n)], nn.Tanh) for n in names)
    assert noise_sizes(mlp(in_dim=20, hidden=7, layers=3, num_classes=4)) == [7, 7, 7, 7]
    assert bmrs.noise_layers(mlp(noise=False)) == []


def test_lenet5_shape_and_noise():
    model = lenet5()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert noise_sizes(model) == [6, 16, 120, 84]
    assert all(isinstance(model[int(n)], nn.ReLU) for n, _ in bmrs.noise_layers(model))
    assert model[7].in_features == 16 * 5 * 5
    small = lenet5(in_channels=3, num_classes=5, image_size=28)
    assert small(torch.randn(2, 3, 28, 28)).shape == (2, 5)
    assert small[7].in_features == 16 * 4 * 4
    with pytest.raises(ConfigError, match="image_size"):
        lenet5(image_size=12)


def test_resnet18_shape_and_noise_after_every_bn():
    model = resnet18(num_classes=10, small_input=True).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    names = [name for name, _ in bmrs.noise_layers(model)]
    assert len(bn_names(model)) == 20 and names == bn_names(model)
    assert "layer2.0.downsample.1" in names and "layer4.0.downsample.1" in names
    assert noise_sizes(model)[:3] == [64, 64, 64] and noise_sizes(model)[-1] == 512
    assert all(n.dim == 1 for _, n in bmrs.noise_layers(model))


def test_resnet50_shape_count_and_noise(r50):
    assert own_parameter_count(r50) == 25_557_032
    assert len(bmrs.noise_layers(r50)) == 53 == len(bn_names(r50))
    assert len(r50.state_dict()) - 4 * 53 == 320  # mu, log_sigma, mask, kept_index per noise layer; torchvision's resnet50 state dict has 320 entries
    r50.eval()
    with torch.no_grad():
        assert r50(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


def test_vit_shape_and_noise():
    model = vit(depth=2)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert noise_sizes(model) == [3, 384] * 2  # heads, hidden units; nothing on the residual stream
    assert [name for name, _ in bmrs.noise_layers(model)] == [
        "blocks.0.attn", "blocks.0.mlp.fc1", "blocks.1.attn", "blocks.1.mlp.fc1",
    ]
    assert [(n.dim, n.head_dim) for _, n in bmrs.noise_layers(model)] == [(-2, 64), (-1, None)] * 2
    for depth in (1, 3):
        assert len(bmrs.noise_layers(vit(dim=16, heads=2, mlp_dim=32, depth=depth))) == 2 * depth
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    other = vit(image_size=28, patch_size=7, in_channels=1, num_classes=4, dim=32, depth=1, heads=4, mlp_dim=64)
    assert other(torch.randn(2, 1, 28, 28)).shape == (2, 4)
    with pytest.raises(ConfigError, match="patch_size"):
        vit(image_size=32, patch_size=5)
    with pytest.raises(ConfigError, match="heads"):
        vit(dim=10, heads=3)


def test_vit_timm_names():
    keys = set(vit(depth=1, noise=False).state_dict())
    expected = {
        "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
        "norm.weight", "norm.bias", "head.weight", "head.bias",
    }
    for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
        expected |= {f"blocks.0.{part}.weight", f"blocks.0.{part}.bias"}
    assert keys == expected
    sd = vit(depth=1, noise=False).state_dict()
    assert sd["pos_embed"].shape == (1, 8 * 8 + 1, 192) and sd["cls_token"].shape == (1, 1, 192)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * 192, 192)


# -- naming and counts ----------------------------------------------------------------------------
def test_resnet18_torchvision_names_and_count():
    plain = resnet18(noise=False)
    assert own_parameter_count(plain) == 11_689_512
    keys = set(plain.state_dict())
    assert len(keys) == 122  # torchvision's resnet18 state dict has 122 entries
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                "layer2.0.downsample.1.running_mean", "layer4.1.bn2.num_batches_tracked", "fc.weight", "fc.bias"):
        assert key in keys
    assert plain.conv1.kernel_size == (7, 7) and isinstance(plain.maxpool, nn.MaxPool2d)
    assert isinstance(plain.avgpool, nn.AdaptiveAvgPool2d)
    noisy = resnet18()
    noisy_keys = set(noisy.state_dict())
    assert keys < noisy_keys
    assert all(".bmrs_noise." in k for k in noisy_keys - keys)
    assert own_parameter_count(noisy) == 11_689_512
    # CIFAR stem: same names, 3×3 stride-1 conv and no max-pool.
    small = resnet18(small_input=True, noise=False)
    assert set(small.state_dict()) == keys
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    assert own_parameter_count(small) == 11_689_512 - 64 * 3 * (49 - 9)


def test_resnet_init_matches_torchvision():
    model = resnet18(num_classes=10, noise=False)
    assert torch.equal(model.bn1.weight, torch.ones(64)) and torch.equal(model.bn1.bias, torch.zeros(64))
    # kaiming normal, fan_out, relu gain: std = sqrt(2 / (out_channels·k·k))
    std = model.layer3[0].conv2.weight.std().item()
    assert std == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.05)


# -- pretrained loading ---------------------------------------------------------------------------
def test_round_trip_plain_checkpoint_into_noisy_models(r18_file):
    plain, path = r18_file
    a = load_pretrained(resnet18(num_classes=10, small_input=True), path).eval()
    b = load_pretrained(resnet18(num_classes=10, small_input=True), path).eval()
    for key, value in plain.state_dict().items():
        assert torch.equal(a.state_dict()[key], value)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out_a, out_b = a(x), b(x)
        assert torch.equal(out_a, out_b)
        # At init every E[θ] ≈ 0.9947, so the noisy model differs slightly from the plain one ...
        theta = bmrs.noise_layers(a)[0][1].expected_theta()
        assert torch.allclose(theta, torch.full_like(theta, 0.9947), atol=1e-3)
        assert not torch.allclose(out_a, plain(x), atol=1e-6)
        # ... and equals it exactly once the noise is removed.
        assert torch.allclose(detach_noise(a)(x), plain(x), atol=1e-6)


def test_safetensors_and_wrapped_checkpoints(r18_file, tmp_path):
    from safetensors.torch import save_file

    plain, _ = r18_file
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(st))
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in plain.state_dict().items()}, "epoch": 3}, wrapped)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = plain(x)
        for path in (st, wrapped):
            model = load_pretrained(resnet18(num_classes=10, small_input=True, noise=False), path).eval()
            assert torch.equal(model(x), want)


def test_drop_head_if_mismatched(r18_file):
    plain, path = r18_file
    with pytest.raises(CheckpointError, match="fc.weight.*drop_head_if_mismatched"):
        load_pretrained(resnet18(num_classes=7, small_input=True), path)
    model = resnet18(num_classes=7, small_input=True)
    fresh_head = model.fc.weight.detach().clone()
    load_pretrained(model, path, drop_head_if_mismatched=True)
    assert torch.equal(model.fc.weight, fresh_head)
    assert torch.equal(model.layer3[1].conv2.weight, plain.layer3[1].conv2.weight)


def test_load_errors(r18_file, tmp_path):
    _, path = r18_file
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_pretrained(resnet18(num_classes=10, small_input=True), truncated)
    assert "\n" not in str(info.value)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError):
        load_pretrained(resnet18(num_classes=10), garbage)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(resnet18(num_classes=10), tmp_path / "missing.pt")

    other = tmp_path / "lenet.pt"
    torch.save(lenet5(noise=False).state_dict(), other)
    with pytest.raises(CheckpointError, match="keys") as info:
        load_pretrained(resnet18(num_classes=10), other)
    message = str(info.value)
    assert "\n" not in message and "'conv1.weight'" in message and "'0.weight'" in message
    with pytest.raises(CheckpointError, match="shares no keys"):
        load_pretrained(resnet18(num_classes=10), other, strict=False)

    # A checkpoint of a noisy model does not load into a plain one without attaching first.
    noisy = tmp_path / "noisy.pt"
    torch.save(lenet5().state_dict(), noisy)
    with pytest.raises(CheckpointError, match="bmrs.attach"):
        load_pretrained(lenet5(noise=False), noisy)
    assert len(bmrs.noise_layers(load_pretrained(lenet5(), noisy))) == 4


# -- build_model ------------------------------------------------------------------------------------
def test_build_model():
    assert MODEL_NAMES == ("mlp", "lenet5", "resnet18", "resnet50", "vit")
    model = build_model("mlp", in_channels=3, num_classes=10, image_size=8)
    assert model[1].in_features == 3 * 8 * 8
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    assert build_model("lenet5", 1, 10, image_size=28)[7].in_features == 256
    net = build_model("resnet18", 3, 10)
    assert isinstance(net.maxpool, nn.Identity)  # CIFAR stem for 32×32 inputs
    assert isinstance(build_model("resnet18", 3, 10, image_size=32, small_input=False).maxpool, nn.MaxPool2d)
    assert bmrs.noise_layers(build_model("vit", 3, 10, noise=False, depth=1)) == []
    assert len(bmrs.noise_layers(build_model("vit", 3, 10, depth=2, dim=32, heads=2, mlp_dim=64))) == 4
    with pytest.raises(ConfigError, match="mlp, lenet5, resnet18, resnet50, vit"):
        build_model("nope", 3, 10)
    with pytest.raises(ConfigError, match="depth"):
        build_model("resnet18", 3, 10, depth=3)
    for name in MODEL_NAMES:
        for bad in ("32", None, 0, -3, True):
            with pytest.raises(ConfigError, match="image_size"):
                build_model(name, 3, 10, image_size=bad)

# (the data term's gradients reach every noise layer of every built-in model: tests/test_model_families.py)
