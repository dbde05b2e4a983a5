"""The block switches readers ask about (docs/paper.md): bn_after_add, block_layers, shortcut="gated".

Expected parameter counts and MACs are computed here from the layer sizes, not by the code under test.
"""
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F

import reslab
from reslab.blocks import GATE_BIAS_INIT, PAPER_SHORTCUTS, SHORTCUTS, GatedShortcut, ShortcutA
from reslab.complexity import count_layers, count_macs, count_params, describe
from reslab.checkpoint import build_model
from reslab.responses import layer_response_std, response_layers

from conftest import randomise_bn


# ----------------------------------------------------------------- counts by hand (CIFAR, paper §4.2)
def cifar_params(n, k=2, gated=False, bn_add=False, classes=10):
    """3x3 conv 3->16 + BN, then 3 stages of n basic blocks at 16/32/64, then fc 64->classes."""
    total = 9 * 3 * 16 + 2 * 16
    cin = 16
    for c in (16, 32, 64):
        for _ in range(n):
            total += 9 * cin * c + 2 * c              # first 3x3 conv (strided where dims grow) + BN
            total += (k - 1) * (9 * c * c + 2 * c)    # the block's other 3x3 convs + BNs
            total += (cin * c + c) if gated else 0    # the 1x1 gate conv with its bias
            total += 2 * c if bn_add else 0           # BN on the sum
            cin = c
    return total + 64 * classes + classes


def cifar_macs(n, k=2, gated=False):
    """A conv's MACs: k*k*cin*cout per output position. Stage s runs at (32/2^s)^2 positions."""
    macs = 9 * 3 * 16 * 32 * 32
    cin = 16
    for s, c in enumerate((16, 32, 64)):
        hw = (32 >> s) ** 2
        for _ in range(n):
            macs += 9 * cin * c * hw + (k - 1) * 9 * c * c * hw
            macs += cin * c * hw if gated else 0
            cin = c
    return macs + 64 * 10


def test_hand_counts_reproduce_the_paper_net():
    # the helpers agree with the paper-pinned ResNet-20 (269,722 params, 40.55M MACs) before they pin variants
    assert cifar_params(3) == 269_722 and cifar_macs(3) == 40_551_040


@pytest.mark.parametrize("overrides, expected", [
    (dict(block_layers=1), 123_898),
    (dict(block_layers=3), 415_546),
    (dict(shortcut="gated"), 283_626),     # + 9 gates: 3*(16*16+16) + (16*32+32) + 2*(32*32+32) + ...
    (dict(bn_after_add=True), 270_394),    # + 9 BNs on the sum: 3*(32 + 64 + 128)
    (dict(block_layers=3, shortcut="gated", bn_after_add=True), 430_122),
])
def test_resnet20_variant_params_pinned(overrides, expected):
    kw = dict(k=overrides.get("block_layers", 2), gated=overrides.get("shortcut") == "gated",
              bn_add=overrides.get("bn_after_add", False))
    assert cifar_params(3, **kw) == expected
    assert count_params(reslab.create_model("resnet20", **overrides)) == expected


@pytest.mark.parametrize("depth", [20, 56])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_block_layers_macs_and_depth_bookkeeping(depth, k):
    n = (depth - 2) // 6
    m = reslab.create_model(f"resnet{depth}", block_layers=k)
    assert count_macs(m) == cifar_macs(n, k)
    assert count_layers(m) == m.cfg.depth == k * 3 * n + 2
    assert m.cfg.name == f"resnet{depth}" and m.metadata["depth"] == k * 3 * n + 2


def test_gated_macs_add_one_1x1_conv_per_block():
    assert count_macs(reslab.create_model("resnet20", shortcut="gated")) == cifar_macs(3, gated=True)
    assert count_layers(reslab.create_model("resnet20", shortcut="gated")) == 20  # gates are off the main path


# ----------------------------------------------------------------- every variant trains
VARIANTS = [
    ("resnet20", dict(bn_after_add=True)),
    ("resnet56", dict(bn_after_add=True, relu_after_add=False)),
    ("resnet50", dict(bn_after_add=True)),
    ("resnet20", dict(block_layers=1)),
    ("resnet32", dict(block_layers=3)),
    ("resnet18", dict(block_layers=1)),
    ("plain20", dict(block_layers=3)),
    ("resnet20", dict(block_layers=1, preact=True)),
    ("resnet20", dict(block_layers=3, preact=True, shortcut="B")),
    ("resnet20", dict(shortcut="gated")),
    ("resnet44", dict(shortcut="gated")),
    ("resnet34", dict(shortcut="gated")),
    ("resnet50", dict(shortcut="gated")),
    ("resnet20", dict(shortcut="gated", bn_after_add=True, block_layers=3)),
]


def _ids(v):
    return v[0] + "-" + "-".join(f"{k}={x}" for k, x in v[1].items())


@pytest.mark.parametrize("name, overrides", VARIANTS, ids=map(_ids, VARIANTS))
def test_every_variant_shape_finite_and_every_param_gets_a_gradient(name, overrides):
    torch.manual_seed(0)
    model = reslab.create_model(name, num_classes=7, **overrides)
    size = 32 if model.cfg.family == "cifar" else 64
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"parameters without gradient: {missing[:5]}"


# the CIFAR variants and one bottleneck (the ImageNet nets take seconds just to initialise)
ROUND_TRIP = [v for v in VARIANTS if v[0] not in ("resnet18", "resnet34", "resnet50")]
ROUND_TRIP.append(("resnet50", dict(shortcut="gated", bn_after_add=True)))


@pytest.mark.parametrize("name, overrides", ROUND_TRIP, ids=map(_ids, ROUND_TRIP))
def test_state_dict_round_trips_through_metadata(name, overrides):
    torch.manual_seed(0)
    m = reslab.create_model(name, **overrides).eval()
    meta = json.loads(json.dumps(m.metadata))  # as a checkpoint stores it
    for k, v in overrides.items():
        assert meta[k] == v
    again = build_model(meta).eval()
    again.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), m(x))


# ----------------------------------------------------------------- bad combinations
@pytest.mark.parametrize("overrides, needle", [
    (dict(name="resnet20", bn_after_add=True, preact=True), "bn_after_add=True conflicts with preact=True"),
    (dict(name="plain20", bn_after_add=True), "bn_after_add=True conflicts with residual=False"),
    (dict(name="resnet50", block_layers=3), "block_layers=3 conflicts with block='bottleneck'"),
    (dict(name="resnet50", block_layers=1), "block_layers=1 conflicts with block='bottleneck'"),
    (dict(name="resnet20", block_layers=4), "block_layers must be one of 1, 2, 3"),
    (dict(name="resnet20", block_layers=0), "block_layers must be one of 1, 2, 3"),
    (dict(name="plain20", shortcut="gated"), "shortcut='gated' conflicts with residual=False"),
    (dict(name="resnet20", shortcut="gated", preact=True), "shortcut='gated' conflicts with preact=True"),
    (dict(name="resnet20", shortcut="D"), "A, B, C, gated"),
])
def test_bad_combinations_name_the_conflict(overrides, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")) as e:
        reslab.create_model(**overrides)
    assert "\n" not in str(e.value)


def test_blocks_refuse_directly_too():
    from reslab.blocks import BasicBlock, Bottleneck
    with pytest.raises(ValueError, match="bottleneck"):
        Bottleneck(64, 64, block_layers=3)
    with pytest.raises(ValueError, match="preact"):
        BasicBlock(16, 16, shortcut="gated", preact=True)


def test_gated_is_a_shortcut_option_beside_the_papers():
    assert PAPER_SHORTCUTS == ("A", "B", "C") and SHORTCUTS == ("A", "B", "C", "gated")


# ----------------------------------------------------------------- what each switch computes
def _bn(x, bn):
    """Eval-mode BN written out: (x - mean) / sqrt(var + eps) * gamma + beta, per channel."""
    v = lambda t: t[None, :, None, None]  # noqa: E731
    return (x - v(bn.running_mean)) / torch.sqrt(v(bn.running_var) + bn.eps) * v(bn.weight) + v(bn.bias)


def _option_a(z, cout, stride):
    s = z[:, :, ::stride, ::stride]
    return torch.cat([s, s.new_zeros(s.shape[0], cout - s.shape[1], *s.shape[2:])], 1)


def _branch(blk, z):
    """conv-BN(-ReLU) x K, no ReLU after the last, written out with the block's weights."""
    k = blk.block_layers
    for i in range(1, k + 1):
        conv, bn = getattr(blk, f"conv{i}"), getattr(blk, f"bn{i}")
        z = _bn(F.conv2d(z, conv.weight, stride=conv.stride, padding=1), bn)
        z = z.relu() if i < k else z
    return z


@torch.no_grad()
def test_bn_after_add_normalises_the_sum_before_the_relu():
    m = reslab.create_model("resnet20", bn_after_add=True).eval()
    randomise_bn(m)
    seen = {}
    for where, blk, cin, stride in (("identity", m.layer1[1], 16, 1), ("option A", m.layer2[0], 16, 2)):
        z = torch.randn(2, cin, 8, 8)
        h = blk.bn_add.register_forward_hook(lambda mod, inp, out: seen.update(inp=inp[0].clone(), out=out))
        y = blk(z)
        h.remove()
        total = _branch(blk, z) + _option_a(z, blk.bn_add.num_features, stride)
        torch.testing.assert_close(seen["inp"], total, msg=where)  # the BN sees the sum ...
        torch.testing.assert_close(y, _bn(total, blk.bn_add).relu(), msg=where)  # ... and the ReLU follows it
    assert m.layer3[0].bn_add.num_features == 64
    assert reslab.create_model("resnet50", bn_after_add=True).layer1[0].bn_add.num_features == 256
    assert reslab.create_model("resnet20").layer1[0].bn_add is None
    assert not any("bn_add" in k for k in reslab.create_model("resnet20").state_dict())


@torch.no_grad()
def test_bn_after_add_without_relu_ends_the_block_with_the_bn():
    m = reslab.create_model("resnet20", bn_after_add=True, relu_after_add=False).eval()
    randomise_bn(m)
    blk, z = m.layer1[0], torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(blk(z), _bn(_branch(blk, z) + z, blk.bn_add))


@torch.no_grad()
def test_gated_block_starts_near_its_shortcut():
    m = reslab.create_model("resnet20", shortcut="gated").eval()
    randomise_bn(m)
    t0 = 1 / (1 + math.exp(-GATE_BIAS_INIT))
    assert GATE_BIAS_INIT == -2.0 and t0 == pytest.approx(0.1192, abs=1e-4)
    for where, blk, cin, cout, stride in (("identity", m.layer1[1], 16, 16, 1), ("grows", m.layer2[0], 16, 32, 2)):
        sc = blk.downsample
        assert isinstance(sc, GatedShortcut)
        assert (sc.gate.in_channels, sc.gate.out_channels, sc.gate.stride) == (cin, cout, (stride, stride))
        assert not sc.gate.weight.any() and torch.all(sc.gate.bias == GATE_BIAS_INIT)
        assert isinstance(sc.carry, ShortcutA if stride > 1 else torch.nn.Identity)
        z = torch.randn(2, cin, 8, 8)
        seen = {}
        h = sc.gate.register_forward_hook(lambda mod, inp, out: seen.update(t=torch.sigmoid(out)))
        y = blk(z)
        h.remove()
        torch.testing.assert_close(seen["t"], torch.full_like(seen["t"], t0))  # T(x) = σ(−2) everywhere
        f, s = _branch(blk, z), _option_a(z, cout, stride)
        torch.testing.assert_close(y, (t0 * f + (1 - t0) * s).relu(), msg=where)


def test_gate_is_input_dependent_once_trained():
    sc = GatedShortcut(4, 8, 2)
    torch.nn.init.normal_(sc.gate.weight)
    x, f = torch.randn(1, 4, 6, 6), torch.randn(1, 8, 3, 3)
    t = torch.sigmoid(sc.gate(x))
    s = _option_a(x, 8, 2)
    torch.testing.assert_close(sc(x, f), t * f + (1 - t) * s)
    assert t.std() > 0.1


# ----------------------------------------------------------------- block_layers layout
@pytest.mark.parametrize("k", [1, 2, 3])
def test_block_layers_names_strides_and_zero_init_last(k):
    m = reslab.create_model("resnet20", block_layers=k, zero_init_last=True)
    blk = m.layer2[0]
    names = sorted(n for n, _ in blk.named_children() if n[:2] in ("co", "bn"))
    assert names == sorted([f"conv{i}" for i in range(1, k + 1)] + [f"bn{i}" for i in range(1, k + 1)])
    assert blk.conv1.stride == (2, 2) and all(getattr(blk, f"conv{i}").stride == (1, 1) for i in range(2, k + 1))
    assert blk.branch_end() is getattr(blk, f"bn{k}")
    assert all(not getattr(b, f"bn{k}").weight.any() for s in m.stages() for b in s)
    assert all(getattr(b, f"bn{i}").weight.all() for s in m.stages() for b in s for i in range(1, k))
    pre = reslab.create_model("resnet20", block_layers=k, preact=True, zero_init_last=True)
    assert pre.layer1[0].branch_end() is getattr(pre.layer1[0], f"conv{k}")
    assert not getattr(pre.layer1[0], f"conv{k}").weight.any()


@torch.no_grad()
def test_preact_block_layers_is_bn_relu_conv_k_times():
    m = reslab.create_model("resnet20", block_layers=3, preact=True).eval()
    randomise_bn(m)
    blk, z = m.layer1[1], torch.randn(2, 16, 8, 8)
    out = z
    for i in (1, 2, 3):
        conv, bn = getattr(blk, f"conv{i}"), getattr(blk, f"bn{i}")
        out = F.conv2d(_bn(out, bn).relu(), conv.weight, padding=1)
    torch.testing.assert_close(blk(z), out + z)


def test_default_basic_block_keeps_torchvision_names():
    keys = {k for k in reslab.create_model("resnet18").state_dict() if k.startswith("layer1.0.")}
    assert keys == {f"layer1.0.{m}.{p}" for m in ("conv1", "conv2") for p in ("weight",)} | {
        f"layer1.0.{b}.{p}" for b in ("bn1", "bn2")
        for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}


# ----------------------------------------------------------------- responses, description, export
@pytest.mark.parametrize("k", [1, 2, 3])
def test_responses_one_value_per_3x3_layer(k):
    m = reslab.create_model("resnet20", block_layers=k)
    layers = response_layers(m)
    assert len(layers) == 9 * k
    assert [n for n, _ in layers[:k]] == [f"layer1.0.bn{i}" for i in range(1, k + 1)]
    std = layer_response_std(m, torch.randn(4, 3, 32, 32))
    assert len(std) == 9 * k and all(s > 0 for s in std)


@pytest.mark.parametrize("overrides", [dict(bn_after_add=True), dict(shortcut="gated")])
def test_responses_skip_the_sum_bn_and_the_gate(overrides):
    m = reslab.create_model("resnet20", **overrides)
    layers = response_layers(m)
    plain_names = [n for n, _ in response_layers(reslab.create_model("resnet20"))]
    assert [n for n, _ in layers] == plain_names
    convs_bns = {id(b.layer(i)[1]) for s in m.stages() for b in s for i in (1, 2)}
    assert all(id(mod) in convs_bns for _, mod in layers)


def test_switches_show_in_repr_metadata_and_describe():
    m = reslab.create_model("resnet20", block_layers=3, bn_after_add=True, shortcut="gated")
    r = repr(m)
    assert "block_layers=3" in r and "bn_after_add=True" in r and "shortcut=gated" in r and "depth=29" in r
    d = describe(m)
    assert (d["block_layers"], d["bn_after_add"], d["shortcut"]) == (3, True, "gated")
    assert d["depth"] == d["layers_weighted"] == 29 and d["params"] == 430_122
    assert d["macs"] == cifar_macs(3, 3, gated=True)
    default = reslab.create_model("resnet20").metadata
    assert (default["block_layers"], default["bn_after_add"]) == (2, False)


@torch.no_grad()
def test_variants_pickle_trace_and_export():
    m = reslab.create_model("resnet20", block_layers=3, bn_after_add=True, shortcut="gated").eval()
    x = torch.randn(2, 3, 32, 32)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), m(x))
    torch.testing.assert_close(torch.jit.trace(m, x)(x), m(x))
    torch.testing.assert_close(torch.export.export(m, (x,)).module()(x), m(x))


@pytest.mark.parametrize("k", [1, 3])
@torch.no_grad()
def test_post_activation_block_layers_is_conv_bn_relu_k_times(k):
    m = reslab.create_model("resnet20", block_layers=k).eval()
    randomise_bn(m)
    for blk, cin, cout, stride in ((m.layer1[1], 16, 16, 1), (m.layer3[0], 32, 64, 2)):
        z = torch.randn(2, cin, 8, 8)
        torch.testing.assert_close(blk(z), (_branch(blk, z) + _option_a(z, cout, stride)).relu())
