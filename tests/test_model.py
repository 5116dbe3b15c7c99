"""The multiplier network's real properties, on tiny inputs (ResNet-18 streams, 64x64, T=4)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torchvision import models

from stm.model import ModelConfig, build_model, fuse_scores, load_imagenet
from stm.model.fusion import CrossStreamFusion, TemporalFilter
from stm.model.imagenet import weight_file_names

from tiny import TINY, K, L  # tests/tiny.py

B, T, S = 2, 4, 64
CONNECTIONS = ["direct_add", "direct_mul", "residual_add", "residual_mul"]


def tiny(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(dataclasses.replace(TINY, **kw)).eval()


def inputs(seed: int = 0, size: int = S) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randn(B, T, 3, size, size, generator=g)
    flow = torch.randn(B, T, 2 * L, size, size, generator=g)
    return rgb, flow


def depends(model, which: str) -> dict[str, bool]:
    """Whether each stream's scores change when only ``which`` input changes."""
    rgb, flow = inputs(0)
    rgb2, flow2 = inputs(1)
    with torch.no_grad():
        a = model(rgb, flow)
        b = model(rgb2, flow) if which == "rgb" else model(rgb, flow2)
    return {
        "appearance": not torch.allclose(a.appearance, b.appearance, atol=1e-6),
        "motion": not torch.allclose(a.motion, b.motion, atol=1e-6),
    }


def test_unconnected_streams_are_independent():
    model = tiny()
    assert depends(model, "rgb") == {"appearance": True, "motion": False}
    assert depends(model, "flow") == {"appearance": False, "motion": True}


@pytest.mark.parametrize("fusion", CONNECTIONS)
@pytest.mark.parametrize("direction", ["m2a", "a2m", "bi"])
def test_connection_carries_information_only_along_its_arrow(fusion, direction):
    model = tiny(fusion=fusion, direction=direction)
    into_app = direction in ("m2a", "bi")
    into_mot = direction in ("a2m", "bi")
    assert depends(model, "flow") == {"appearance": into_app, "motion": True}
    assert depends(model, "rgb") == {"appearance": True, "motion": into_mot}


def test_gate_is_eq5_residual_branch_gated_shortcut_not():
    x, y = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    branch, shortcut = CrossStreamFusion("residual_mul")(x, y)
    torch.testing.assert_close(branch, x * F.relu(y))  # pre-ReLU x_a times f(x_m)
    torch.testing.assert_close(shortcut, F.relu(x))  # identity shortcut keeps f(x_a), ungated
    branch, shortcut = CrossStreamFusion("residual_add")(x, y)
    torch.testing.assert_close(branch, x + F.relu(y))  # eq. 2
    branch, shortcut = CrossStreamFusion("direct_mul")(x, y)
    torch.testing.assert_close(branch, F.relu(x))
    torch.testing.assert_close(shortcut, F.relu(x) * F.relu(y))  # into the shortcut path


def test_multiplicative_gate_sends_appearance_gradient_into_motion_stream():
    model = tiny(fusion="residual_mul", direction="m2a")
    rgb, flow = inputs()
    out = model(rgb, flow)
    out.appearance.logsumexp(-1).sum().backward()  # the appearance loss only (eq. 6-7)
    m = model.motion
    assert m.conv1.weight.grad.abs().sum() > 0
    assert m.layer4[0].conv1.weight.grad.abs().sum() > 0
    # Motion units after the last gate and its classifier do not feed appearance.
    assert m.layer4[1].conv1.weight.grad is None
    assert m.fc.weight.grad is None


@pytest.mark.parametrize("temporal", ["residual_all", "residual_last", "skip_all"])
@pytest.mark.parametrize("time_pool", ["max", "avg"])
def test_centre_initialised_temporal_filters_leave_output_unchanged(temporal, time_pool):
    base = tiny(fusion="residual_mul", time_pool=time_pool)
    model = tiny(fusion="residual_mul", time_pool=time_pool, temporal=temporal)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("temporal.") for k in missing)
    rgb, flow = inputs()
    with torch.no_grad():
        a, b = base(rgb, flow), model(rgb, flow)
    torch.testing.assert_close(a.appearance, b.appearance, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.motion, b.motion, rtol=1e-4, atol=1e-5)
    # ...while averaging filters do mix the chunks.
    avg = tiny(fusion="residual_mul", time_pool=time_pool, temporal=temporal, temporal_init="avg")
    avg.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        assert not torch.allclose(avg(rgb, flow).appearance, a.appearance, atol=1e-4)


def test_temporal_filter_is_identity_times_filter():
    x = torch.randn(2 * 3, 4, 2, 2)  # (B*T, C, H, W), T = 3
    torch.testing.assert_close(TemporalFilter(4, "center")(x, 3), x)
    y = TemporalFilter(4, "avg")(x, 3).reshape(2, 3, 4, 2, 2)
    v = x.reshape(2, 3, 4, 2, 2)
    torch.testing.assert_close(y[:, 1], v.mean(1))  # the middle chunk sees all three
    torch.testing.assert_close(y[:, 0], (v[:, 0] + v[:, 1]) / 3)  # zero padding at the ends
    assert TemporalFilter(4).conv.bias.abs().sum() == 0


@pytest.mark.parametrize("direction,temporal", [("bi", "residual_all"), ("m2a", "skip_all")])
def test_every_parameter_receives_a_gradient(direction, temporal):
    model = tiny(
        fusion="residual_mul", direction=direction, temporal=temporal, time_pool="max"
    ).train()
    rgb, flow = inputs()
    out = model(rgb, flow)
    labels = torch.tensor([1, 3])
    (F.cross_entropy(out.appearance, labels) + F.cross_entropy(out.motion, labels)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []


def test_paper_final_model_builds_and_runs():
    cfg = ModelConfig()  # ResNet-50 appearance, ResNet-152 motion, the paper's final choices
    assert (cfg.appearance_arch, cfg.motion_arch, cfg.fusion, cfg.direction) == (
        "resnet50",
        "resnet152",
        "residual_mul",
        "m2a",
    )
    model = build_model(cfg).eval()
    assert model.motion.conv1.in_channels == 20
    n = sum(p.numel() for p in model.parameters())
    assert 80e6 < n < 120e6  # 25.5M + 58.2M backbones + temporal filters
    with torch.no_grad():
        out = model(torch.randn(1, 2, 3, 64, 64), torch.randn(1, 2, 20, 64, 64))
    assert out.appearance.shape == out.motion.shape == (1, 101)


def test_fully_convolutional_on_full_frames_and_single_stream():
    model = tiny(temporal="residual_all", time_pool="max")
    rgb, flow = inputs(size=S)
    with torch.no_grad():
        out = model(torch.randn(B, T, 3, 72, 96), torch.randn(B, T, 2 * L, 72, 96))
        assert out.appearance.shape == (B, K)
        alone = model(rgb, None)  # the appearance-stage forward
    assert alone.motion is None and alone.appearance.shape == (B, K)
    with pytest.raises(ValueError, match="needs both"):
        tiny(fusion="residual_mul")(rgb, None)


def test_fuse_scores_averages_logits_or_probabilities():
    model = tiny(fusion="residual_mul")
    rgb, flow = inputs()
    with torch.no_grad():
        out = model(rgb, flow)
        fused = model.predict(rgb, flow)
    torch.testing.assert_close(fused, ((out.appearance + out.motion) / 2).softmax(-1))
    expected = (out.appearance.softmax(-1) + out.motion.softmax(-1)) / 2
    torch.testing.assert_close(fuse_scores(out, how="softmax"), expected)
    torch.testing.assert_close(fuse_scores(out).sum(-1), torch.ones(B))


@pytest.mark.parametrize("time_pool", ["max", "avg"])
def test_window_pooling(time_pool):
    """The original's test pooling: pool each run of ``window`` consecutive chunks (stride 1),
    classify, average the logits over the runs; a window of all T chunks is the global pool."""
    model = tiny(fusion="residual_mul", temporal="residual_all", time_pool=time_pool)
    rgb, flow = inputs()  # T = 4
    with torch.no_grad():
        assert torch.equal(model(rgb, flow, window=T).motion, model(rgb, flow).motion)
        assert torch.equal(model(rgb, flow, window=T + 3).motion, model(rgb, flow).motion)
        features, b, t = model.features(rgb, flow)
        x = features["appearance"].reshape(b, t, *features["appearance"].shape[1:])
        runs = [x[:, i : i + 2] for i in range(t - 1)]  # windows of 2 chunks
        pooled = [r.amax(1) if time_pool == "max" else r.mean(1) for r in runs]
        logits = torch.stack([model.appearance.fc(p.mean((-2, -1))) for p in pooled]).mean(0)
        torch.testing.assert_close(model(rgb, flow, window=2).appearance, logits)


@pytest.mark.parametrize(
    "field,value",
    [
        ("fusion", "concat"),
        ("direction", "m2m"),
        ("temporal", "everywhere"),
        ("temporal_init", "random"),
        ("time_pool", "min"),
        ("motion_arch", "vgg16"),
    ],
)
def test_invalid_values_are_one_line_errors_listing_valid_ones(field, value):
    with pytest.raises(ValueError) as err:
        dataclasses.replace(TINY, **{field: value})
    msg = str(err.value)
    assert "\n" not in msg and value in msg and "choose one of" in msg


def test_fusion_needs_matching_widths():
    with pytest.raises(ValueError, match="equal widths"):
        build_model(dataclasses.replace(TINY, motion_arch="resnet50", fusion="residual_mul"))


def test_torchvision_state_dict_loads_with_only_injected_layers_left_out():
    model = tiny(fusion="residual_mul", temporal="residual_all")
    tv = models.resnet18(weights=None).state_dict()
    tv = {k: v for k, v in tv.items() if not k.startswith("fc.")}
    missing, unexpected = model.appearance.load_state_dict(tv, strict=False)
    assert unexpected == [] and set(missing) == {"fc.weight", "fc.bias"}
    names = {k for k in model.state_dict() if k.startswith("appearance.")}
    assert {f"appearance.{k}" for k in tv} <= names


def test_imagenet_init_from_local_file(tmp_path):
    torch.manual_seed(1)
    ref = models.resnet18(weights=None).state_dict()
    torch.save(ref, tmp_path / weight_file_names("resnet18")[0])
    model = tiny(fusion="residual_mul", temporal="residual_all")
    load_imagenet(model, "resnet18", "resnet18", weights_dir=tmp_path)
    torch.testing.assert_close(model.appearance.conv1.weight, ref["conv1.weight"])
    torch.testing.assert_close(
        model.appearance.layer3[1].conv2.weight, ref["layer3.1.conv2.weight"]
    )
    # Motion conv1: the RGB filters averaged and replicated over the 2L flow channels.
    expected = ref["conv1.weight"].mean(1, keepdim=True).repeat(1, 2 * L, 1, 1)
    torch.testing.assert_close(model.motion.conv1.weight, expected)
    torch.testing.assert_close(
        model.motion.layer1[0].bn1.running_var, ref["layer1.0.bn1.running_var"]
    )


def test_missing_imagenet_file_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError) as err:
        load_imagenet(tiny(), "resnet18", "resnet18", weights_dir=tmp_path)
    assert "\n" not in str(err.value) and "resnet18-" in str(err.value)


def test_zero_init_residual_starts_every_unit_as_its_shortcut():
    """From scratch (embedded default): each unit's last BN scale is 0, so a unit outputs
    relu(shortcut) and the gated units pass relu(x_a) on; ImageNet weights overwrite it."""
    model = tiny(fusion="residual_mul", temporal="residual_all", zero_init_residual=True)
    last_bn = [m.bn2 for m in model.modules() if isinstance(m, models.resnet.BasicBlock)]
    assert len(last_bn) == 16 and all(bn.weight.abs().sum() == 0 for bn in last_bn)
    unit = model.appearance.layer2[1]
    x = torch.randn(2, 128, 8, 8)
    torch.testing.assert_close(unit(x), F.relu(x))
    assert tiny().appearance.layer2[1].bn2.weight.abs().sum() > 0  # the paper's default: off


@pytest.mark.parametrize("temporal", ["none", "residual_all", "residual_last", "skip_all"])
def test_channels_last_conversion_keeps_outputs(temporal):
    """``to_channels_last``: 2-D convolutions NHWC, the temporal filters' Conv3d NDHWC (where
    ``model.to(memory_format=channels_last)`` raises), the same scores to float rounding."""
    from stm.model import to_channels_last

    model = tiny(fusion="residual_mul", temporal=temporal, temporal_init="avg", time_pool="max")
    if temporal != "none":
        with pytest.raises(RuntimeError, match="rank 4"):
            tiny(temporal=temporal).to(memory_format=torch.channels_last)
    rgb, flow = inputs(0)
    with torch.no_grad():
        before = model(rgb, flow)
        to_channels_last(model)
        after = model(rgb, flow)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            assert m.weight.is_contiguous(memory_format=torch.channels_last)
        if isinstance(m, torch.nn.Conv3d):
            assert m.weight.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(after.appearance, before.appearance, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after.motion, before.motion, rtol=1e-4, atol=1e-5)
