"""The model zoo against the paper's numbers and against torchvision."""
import io
import pickle

import pytest
import torch
import torchvision

import reslab
from reslab.blocks import ShortcutA
from reslab.complexity import count_layers, count_macs, count_params, stage_shapes
from reslab.zoo import register_model

from conftest import randomise_bn

ALL = reslab.list_models()

# docs/paper.md (Table 6 params, rounded as the paper prints them) and forward MACs at 32x32, option A
CIFAR = {
    "resnet20": (0.27, 2, 40.55e6), "resnet32": (0.46, 2, 68.86e6), "resnet44": (0.66, 2, 97.17e6),
    "resnet56": (0.85, 2, 125.49e6), "resnet110": (1.7, 1, 252.89e6), "resnet1202": (19.4, 1, 2829e6),
}
# docs/paper.md: params (option B, = torchvision), MACs v1 and v1.5 at 224x224
IMAGENET = {
    "resnet18": (11_689_512, 1.814e9, 1.814e9), "resnet34": (21_797_672, 3.664e9, 3.664e9),
    "resnet50": (25_557_032, 3.858e9, 4.089e9), "resnet101": (44_549_160, 7.570e9, 7.801e9),
    "resnet152": (60_192_808, 11.282e9, 11.514e9),
}


def small_input(model, batch=2):
    g = torch.Generator().manual_seed(0)
    size = 32 if model.cfg.family == "cifar" else 64  # 64 keeps the ImageNet nets quick: 2x2 at conv5
    return torch.randn(batch, 3, size, size, generator=g)


@pytest.mark.parametrize("name", ALL)
def test_every_model_shape_finite_and_every_param_gets_a_gradient(name):
    torch.manual_seed(0)
    model = reslab.create_model(name, num_classes=7)
    x = small_input(model)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"parameters without gradient: {missing[:5]}"


@pytest.mark.parametrize("name", sorted(CIFAR))
def test_cifar_params_and_macs_match_table6(name):
    params_m, ndigits, macs = CIFAR[name]
    m = reslab.create_model(name)
    assert round(count_params(m) / 1e6, ndigits) == params_m
    assert count_macs(m) == pytest.approx(macs, rel=1e-3)
    assert count_layers(m) == m.cfg.depth == int(name[6:])


def test_resnet20_exact_params_and_macs():
    # the block switches (tests/test_variants.py) must leave the default net exactly as it was
    m = reslab.create_model("resnet20")
    assert count_params(m) == 269_722 and count_macs(m) == 40_551_040
    assert (m.cfg.block_layers, m.cfg.bn_after_add, m.cfg.shortcut) == (2, False, "A")


@pytest.mark.parametrize("name", sorted(IMAGENET))
def test_imagenet_params_exact_and_macs_within_1pct(name):
    params, macs_v1, macs_v15 = IMAGENET[name]
    v1 = reslab.create_model(name)
    v15 = reslab.create_model(name, stride_in_1x1=False)
    assert count_params(v1) == count_params(v15) == params
    assert count_params(getattr(torchvision.models, name)()) == params
    assert count_macs(v1) == pytest.approx(macs_v1, rel=0.01)
    assert count_macs(v15) == pytest.approx(macs_v15, rel=0.01)


def test_stride_variant_is_visible_and_changes_the_net():
    v1, v15 = reslab.create_model("resnet50"), reslab.create_model("resnet50", stride_in_1x1=False)
    assert v1.metadata["stride_variant"] == "v1" and v15.metadata["stride_variant"] == "v1.5"
    assert "v1, paper" in repr(v1) and "v1.5" in repr(v15)
    assert v1.layer2[0].conv1.stride == (2, 2) and v1.layer2[0].conv2.stride == (1, 1)
    assert v15.layer2[0].conv1.stride == (1, 1) and v15.layer2[0].conv2.stride == (2, 2)


@pytest.mark.parametrize("depth", [20, 56, 110, 18, 34])
def test_plain_twin_has_exactly_the_option_a_params(depth):
    plain = reslab.create_model(f"plain{depth}")
    res_a = reslab.create_model(f"resnet{depth}", shortcut="A")
    assert count_params(plain) == count_params(res_a)
    assert not any(b.residual for s in plain.stages() for b in s)


@pytest.mark.parametrize("name", ["resnet20", "resnet34", "resnet50"])
def test_shortcut_c_more_params_than_b_more_than_a(name):
    a, b, c = (count_params(reslab.create_model(name, shortcut=o)) for o in "ABC")
    assert c > b > a


def test_option_a_is_parameter_free_and_zero_pads():
    m = reslab.create_model("resnet20")
    assert isinstance(m.layer2[0].downsample, ShortcutA)
    assert sum(p.numel() for p in m.layer2[0].downsample.parameters()) == 0
    sc = ShortcutA(16, 32, 2)
    x = torch.randn(1, 16, 8, 8)
    y = sc(x)
    assert y.shape == (1, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2]) and not y[:, 16:].any()
    both = ShortcutA(16, 32, 2, pad="both")(x)
    assert torch.equal(both[:, 8:24], x[:, :, ::2, ::2]) and not both[:, :8].any()


def test_cifar_stage_shapes_follow_the_paper():
    shapes = stage_shapes(reslab.create_model("resnet56"))
    assert shapes == {"stem": [16, 32, 32], "layer1": [16, 32, 32], "layer2": [32, 16, 16], "layer3": [64, 8, 8]}
    shapes = stage_shapes(reslab.create_model("resnet50"))
    assert shapes["stem"] == [64, 56, 56] and shapes["layer4"] == [2048, 7, 7]


@pytest.mark.parametrize("name", sorted(IMAGENET))
def test_v15_output_parity_with_torchvision_both_directions(name):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)().eval()
    randomise_bn(tv)
    ours = reslab.create_model(name, stride_in_1x1=False, num_classes=1000).eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tv(x)
        torch.testing.assert_close(ours(x), ref, rtol=1e-4, atol=1e-4)
        back = getattr(torchvision.models, name)().eval()
        back.load_state_dict(ours.state_dict(), strict=True)
        torch.testing.assert_close(back(x), ref, rtol=1e-4, atol=1e-4)


def test_forward_features_head_and_fully_convolutional_scores_agree():
    m = reslab.create_model("resnet18", num_classes=5).eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape == (1, 512, 3, 4)
        scores = m.score_map(feats)
        assert scores.shape == (1, 5, 3, 4)
        torch.testing.assert_close(scores.mean((2, 3)), m(x), rtol=1e-5, atol=1e-5)


def test_switches():
    m = reslab.create_model("resnet20", relu_after_add=False, zero_init_last=True, width=2)
    assert m.layer1[0].conv1.out_channels == 32 and m.fc.in_features == 128
    assert all(not b.bn2.weight.detach().any() for s in m.stages() for b in s)
    x = torch.randn(2, 3, 32, 32)
    blk = m.layer1[1]
    blk.eval()
    with torch.no_grad():  # a zero-initialised branch, no ReLU after the addition: the block is the identity
        z = torch.randn(2, 32, 8, 8)
        torch.testing.assert_close(blk(z), z)
    pre = reslab.create_model("resnet20", preact=True)
    assert pre.final_bn is not None and isinstance(pre.layer1[0].bn1, torch.nn.BatchNorm2d)
    assert pre(x).shape == (2, 10)
    gray = reslab.create_model("resnet18", in_channels=1, num_classes=3)
    assert gray(torch.randn(1, 1, 64, 64)).shape == (1, 3)


def test_any_6n_plus_2_depth_and_cifar_prefix():
    assert reslab.create_model("resnet26").cfg.layers == (4, 4, 4)
    assert reslab.create_model("plain74").cfg.residual is False
    assert reslab.create_model("cifar_resnet50").cfg.family == "cifar"
    assert reslab.create_model("resnet50").cfg.family == "imagenet"


@pytest.mark.parametrize("bad, needle", [
    (dict(name="resnet21"), "resnet20"),
    (dict(name="resnet22"), "6n+2"),
    (dict(name="resnet20", shortcut="D"), "A, B, C"),
    (dict(name="resnet20", colour="red"), "shortcut"),
    (dict(name="resnet20", residual="False"), "residual must be True or False"),  # a truthy string
    (dict(name="resnet20", block_layers=True), "whole numbers"),
    (dict(name="resnet20", layers=(-1, 2, 2)), "at least 1 per stage"),
])
def test_bad_input_is_a_value_error_listing_choices(bad, needle):
    with pytest.raises(ValueError, match=needle.replace("+", r"\+")):
        reslab.create_model(**bad)


def test_none_overrides_are_ignored_and_duplicates_refused():
    m = reslab.create_model("resnet50", shortcut=None, stride_in_1x1=None, num_classes=None)
    assert m.cfg.shortcut == "B" and m.cfg.stride_in_1x1 and m.cfg.num_classes == 1000
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet20")(lambda: None)
    # a builder that returns a model, not a config, is refused at once (registered, it broke list_models())
    with pytest.raises(ValueError, match="must return a ResNetConfig"):
        register_model("badreg")(lambda: reslab.create_model("resnet8"))
    assert "badreg" not in reslab.list_models()


@torch.no_grad()
def test_pickle_torchscript_and_export():
    for name in ("resnet20", "resnet50"):
        m = reslab.create_model(name, num_classes=4).eval()
        x = small_input(m, 1)
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        again = torch.load(buf, weights_only=False)
        assert torch.equal(again(x), m(x))
        assert torch.equal(pickle.loads(pickle.dumps(m))(x), m(x))
        traced = torch.jit.trace(m, x)  # TorchScript by tracing (torch.jit.script is deprecated upstream)
        torch.testing.assert_close(traced(x), m(x))
    m = reslab.create_model("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(m, (x,))
    torch.testing.assert_close(ep.module()(x), m(x))


@pytest.mark.parametrize("size", [8, 7])
def test_option_a_is_a_strided_subsample_and_keeps_channels_last_gradients(size):
    """Option A = x[:, :, ::2, ::2] with zero channels after it. The gradient it sends back must stay
    channels_last: a slice's backward returns NCHW, which made the CPU's later kernels mix layouts."""
    sc = ShortcutA(4, 8, 2)
    x = torch.randn(2, 4, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = sc(x)
    want = torch.cat([x[:, :, ::2, ::2], torch.zeros(2, 4, (size + 1) // 2, (size + 1) // 2)], 1)
    assert torch.equal(out, want)
    (g,) = torch.autograd.grad(out, x, torch.randn_like(out).contiguous(memory_format=torch.channels_last))
    assert g.is_contiguous(memory_format=torch.channels_last)
    assert torch.count_nonzero(g[:, :, 1::2]) == 0 and torch.count_nonzero(g[:, :, :, 1::2]) == 0


def test_an_absurd_depth_is_refused_at_once():
    """6n+2 but billions of layers: building it would exhaust memory (it hung); the paper's deepest is 1202."""
    with pytest.raises(ValueError, match="beyond 20,000 layers"):
        reslab.create_model("resnet600000000002")
