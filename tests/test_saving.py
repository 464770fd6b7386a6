"""bmrs.save / bmrs.load: a compacted model round-trips without pickle, in a fresh process."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bmrs
from bmrs.models import build_model


def _pruned(model, fraction=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _, noise in bmrs.noise_layers(model):
        noise.mask.copy_((torch.rand(noise.num_features, generator=gen) > fraction).float())
    return model


def _conv_net():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 40), nn.Tanh(), nn.Linear(40, 5))


# (every built-in model saves and loads in this process: tests/test_model_families.py)
@pytest.mark.parametrize("name,shape", [("lenet5", (3, 1, 32, 32))])
def test_a_compacted_builtin_model_reloads_in_a_fresh_process(tmp_path, name, shape, fresh_process):
    torch.manual_seed(0)
    model = _pruned(build_model(name, shape[1], 10, 32)).eval()
    x = torch.randn(*shape)
    small = bmrs.compact(model, x)
    with torch.no_grad():
        want = small(x)
    bmrs.save(small, tmp_path / "small.safetensors", builder={"name": name, "in_channels": shape[1],
                                                               "num_classes": 10, "image_size": 32})
    fresh_process(f"import bmrs; m = bmrs.load({str(tmp_path / 'small.safetensors')!r}); "
                  f"assert sum(p.numel() for p in m.parameters()) == {sum(p.numel() for p in small.parameters())}",
                  "m(x)", x, want, 1e-6)


def test_own_model_with_its_factory_and_fast_layers(tmp_path):
    torch.manual_seed(1)
    model = _pruned(bmrs.attach(_conv_net()), 0.6).eval()
    x = torch.randn(64, 3, 8, 8)
    plain = bmrs.compact(model, x)
    bmrs.save(plain, tmp_path / "plain-layers.safetensors")
    small = bmrs.inference.optimize(bmrs.compact(model, x))
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in _conv_net().parameters())
    with torch.no_grad():
        want = small(x)  # runs the fast inference layers (padded buffers) once before saving
    bmrs.save(small, tmp_path / "own.safetensors")
    # an optimized model is saved as the plain one: the same sizes, types and weights
    fast_file, plain_file = bmrs.saving.read_description(tmp_path / "own.safetensors"), \
        bmrs.saving.read_description(tmp_path / "plain-layers.safetensors")
    assert fast_file[0] == plain_file[0] and "bmrs.inference" not in fast_file[0]["modules"]
    assert all(torch.equal(fast_file[1][k], plain_file[1][k]) for k in plain_file[1])
    loaded, fast = (bmrs.load(tmp_path / "own.safetensors", _conv_net),
                    bmrs.load(tmp_path / "own.safetensors", _conv_net(), fast_layers=True))
    assert not any(type(m).__module__.startswith("bmrs.") for m in loaded.modules())
    assert [type(m) for m in fast.modules()] == [type(m) for m in small.modules()]
    for again in (loaded, fast):
        with torch.no_grad():
            torch.testing.assert_close(again(x), want, rtol=1e-6, atol=1e-6)
    # safetensors' own save_model works on the compacted model after inference
    from safetensors.torch import save_model
    save_model(small, str(tmp_path / "plain.safetensors"))


def test_refusals_say_what_to_do(tmp_path):
    small = bmrs.compact(_pruned(bmrs.attach(_conv_net())).eval(), torch.randn(2, 3, 8, 8))
    path = tmp_path / "m.safetensors"
    bmrs.save(small, path)
    with pytest.raises(bmrs.ConfigError, match="saved without a builder"):
        bmrs.load(path)
    with pytest.raises(bmrs.ModelError, match="no submodule"):
        bmrs.load(path, nn.Sequential(nn.Linear(2, 2)))
    from safetensors.torch import save_file
    save_file(small.state_dict(), str(tmp_path / "bare.safetensors"))
    with pytest.raises(bmrs.CheckpointError, match="not a model written by bmrs.save"):
        bmrs.load(tmp_path / "bare.safetensors", _conv_net)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # one flipped bit in the weights
    (tmp_path / "flipped.safetensors").write_bytes(bytes(data))
    with pytest.raises(bmrs.CheckpointError, match="checksum"):
        bmrs.load(tmp_path / "flipped.safetensors", _conv_net)
    with pytest.raises(bmrs.CheckpointError, match="no such file"):
        bmrs.load(tmp_path / "missing.safetensors", _conv_net)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(bmrs.CheckpointError, match="truncated or corrupt"):
        bmrs.load(tmp_path / "junk.safetensors", _conv_net)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_exports_run_without_bmrs_at_any_batch_size(tmp_path, fmt, fresh_process):
    torch.manual_seed(2)
    small = bmrs.compact(_pruned(build_model("lenet5", 1, 10, 32)).eval(), torch.randn(2, 1, 32, 32))
    error = bmrs.compaction.export(small, torch.randn(2, 1, 32, 32), tmp_path / f"small.{fmt}")
    assert error <= 1e-5
    x = torch.randn(7, 1, 32, 32)
    with torch.no_grad():
        want = small(x)
    path = str(tmp_path / f"small.{fmt}")
    if fmt == "pt2":
        fresh_process(f"m = torch.export.load({path!r}).module()", "m(x)", x, want, 1e-5, without_bmrs=True)
    else:
        fresh_process(f"import onnxruntime as ort; s = ort.InferenceSession({path!r})",
                      "torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])", x, want, 1e-5,
                      without_bmrs=True)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left


def test_export_refuses_bad_requests(tmp_path):
    small = bmrs.compact(_pruned(bmrs.attach(_conv_net())).eval(), torch.randn(2, 3, 8, 8))
    with pytest.raises(bmrs.ConfigError, match="export format"):
        bmrs.compaction.export(small, torch.randn(2, 3, 8, 8), tmp_path / "m.tflite")
    with pytest.raises(bmrs.ConfigError, match="tensor or a tuple"):
        bmrs.compaction.export(small, "not a tensor", tmp_path / "m.pt2")
