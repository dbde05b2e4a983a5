"""Design (b) of the K-runs question (src/reslab/fused.py): K members fused into one model of grouped convs
and K*C-channel BNs must compute, train and checkpoint exactly as the K members do alone.

Every comparison is per member (member i of the fused model against member i alone, key by key), and the
members differ (seeds, BN affine parameters and statistics randomised per member), so a fused model whose
channel blocks are swapped or mixed fails: test_a_swapped_member_block_is_caught shows it.

Tolerances:
  forward, fp32   rtol = atol = 2e-5 on the logits (order 1). The grouped conv accumulates in another order
                  than K separate convs (oneDNN's NCHW grouped kernel). Measured on a 2-core x86 CPU: up to
                  5e-7 for the CIFAR nets and 2e-6 for the 5-stage bottleneck net (train-mode BN over few
                  positions amplifies rounding), bitwise in channels_last. The bound leaves a 10x margin for
                  other CPUs' kernels; a member's block swapped or mixed is off by O(1).
  training, fp64  rtol = 1e-9, atol = 1e-11 on every weight, BN statistic and momentum buffer after 20 SGD
                  steps. fp32 cannot pin training: one ReLU whose input rounds across zero changes a gradient
                  at the 1e-3 level, and 20 steps at lr 0.1 grow that to ~0.1 relative: the same run trained
                  alone in channels_last vs contiguous fp32 already differs by up to 0.3 (measured). In fp64
                  such flips do not happen at this size; the fused run differs by ~3e-14 (measured), 4 orders
                  under the bound, while a wrong gradient scale (a mean over K*N), weight decay on BN, or a
                  member's momentum applied to another would be off by 1e-3 or more.
"""
import pytest
import torch

from reslab.data import Normalizer, ResidentLoader
from reslab.errors import ReslabError
from reslab.fused import FusedBatches, FusedResNet, fused_train_step, stack_inputs
from reslab.recipes import get_recipe
from reslab.step import TrainStep, make_optimizer
from reslab.zoo import create_model

from conftest import randomise_bn

K = 3
FWD = dict(rtol=2e-5, atol=2e-5)         # fp32 forward (see the module docstring)
TRAIN = dict(rtol=1e-9, atol=1e-11)      # fp64, after 20 SGD steps

VARIANTS = {
    "resnet-A": ("resnet8", {}),
    "resnet-B": ("resnet8", {"shortcut": "B"}),
    "resnet-C": ("resnet8", {"shortcut": "C"}),
    "plain": ("plain8", {}),
    "zero-pad-both": ("resnet8", {"zero_pad": "both"}),
    "preact": ("resnet8", {"preact": True}),
    "bn-after-add": ("resnet8", {"bn_after_add": True}),
    "block-layers-3": ("resnet8", {"block_layers": 3}),
    "gated": ("resnet8", {"shortcut": "gated"}),
    # the ImageNet family at 96x96, its last stage 3x3: at 32x32 it is 1x1, and train-mode BN over 4 images x
    # 1 position is too ill-conditioned for an fp32 comparison of anything
    "bottleneck": ("resnet50", {"layers": (1, 1, 1, 1), "width": 0.25, "num_classes": 10}),
}
SIZE = {"bottleneck": 96}


def make_members(arch, k=K, dtype=torch.float32, fmt=torch.contiguous_format, randomise=True, **kw):
    """K members from seeds 0..k-1; BN parameters and statistics randomised per member (at init they are
    1/0 for every member, and a swap of BN blocks would go unseen)."""
    out = []
    for i in range(k):
        torch.manual_seed(i)
        m = create_model(arch, **kw)
        if randomise:
            randomise_bn(m, seed=100 + i)
        out.append(m.to(dtype, memory_format=fmt))
    return out


def mismatched_members(fused, members, xs, fused_xs=None) -> list[int]:
    """Members whose fused logits (on `fused_xs`, default `xs`) differ from their own forward on `xs` beyond
    the fp32 tolerance."""
    out = fused(stack_inputs(fused_xs or xs))
    bad = []
    for i, (m, x) in enumerate(zip(members, xs)):
        try:
            torch.testing.assert_close(out[i], m(x), **FWD)
        except AssertionError:
            bad.append(i)
    return bad


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_forward_equals_each_member(variant, fmt):
    arch, kw = VARIANTS[variant]
    members = make_members(arch, fmt=fmt, **kw)
    fused = FusedResNet.from_members(members).to(memory_format=fmt)
    g = torch.Generator().manual_seed(0)
    size = SIZE.get(variant, 32)
    xs = [torch.randn(4, 3, size, size, generator=g).contiguous(memory_format=fmt) for _ in range(K)]
    for train in (False, True):  # running statistics, then batch statistics (and their updates)
        fused.train(train)
        for m in members:
            m.train(train)
        out = fused(stack_inputs(xs))
        assert out.shape == (K, 4, 10)
        for i, (m, x) in enumerate(zip(members, xs)):
            torch.testing.assert_close(out[i], m(x), **FWD, msg=lambda s, i=i: f"member {i}: {s}")
    for i, m in enumerate(members):  # after the train-mode forward: each member's BN running statistics
        sd = fused.member_state_dict(i)
        for key, t in m.state_dict().items():
            torch.testing.assert_close(sd[key], t, **FWD, msg=lambda s, i=i, key=key: f"member {i} {key}: {s}")


def test_a_swapped_member_block_is_caught():
    """The equality checks are per member: swap members 0 and 1 in one BN layer (or in the input) and exactly
    those two members fail."""
    members = make_members("resnet8")
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(K)]
    fused = FusedResNet.from_members(members).eval()
    for m in members:
        m.eval()
    assert mismatched_members(fused, members, xs) == []
    assert mismatched_members(fused, members, xs, [xs[1], xs[0], xs[2]]) == [0, 1]
    bn = fused.net.layer2[0].bn1
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            a, b = t.chunk(K)[0].clone(), t.chunk(K)[1].clone()
            t.chunk(K)[0].copy_(b)
            t.chunk(K)[1].copy_(a)
    assert mismatched_members(fused, members, xs) == [0, 1]
    assert not torch.equal(fused.member_state_dict(0)["layer2.0.bn1.weight"], members[0].layer2[0].bn1.weight)


def test_round_trip_is_bitwise_and_loads_strictly():
    members = make_members("resnet8", shortcut="B")
    for m in members:  # a trained member's counter: copied through, one for all
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.num_batches_tracked.fill_(7)
    fused = FusedResNet.from_members(members)
    for i, m in enumerate(members):
        sd = fused.member_state_dict(i)
        ref = m.state_dict()
        assert list(sd) == list(ref)
        for key in ref:
            assert torch.equal(sd[key], ref[key]) and sd[key].dtype == ref[key].dtype, (i, key)
            assert sd[key].untyped_storage().nbytes() == ref[key].untyped_storage().nbytes(), key  # a copy
        fresh = create_model("resnet8", shortcut="B")
        fresh.load_state_dict(sd, strict=True)
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), ref.values()))


def test_fused_parameters_fall_in_the_members_optimiser_groups():
    """make_optimizer groups by ndim (no weight decay on BN and biases under no_wd_bn_bias): a fused parameter
    has its members' ndim, so member i's slice of each group is the member's own group."""
    r = get_recipe("cifar-paper").with_overrides(no_wd_bn_bias=True)
    members = make_members("resnet8", randomise=False)
    fused = FusedResNet.from_members(members)
    names = {id(p): n for n, p in fused.net.named_parameters()}
    fused_groups = [(sorted(names[id(p)] for p in g["params"]), g["weight_decay"])
                    for g in make_optimizer(fused, r).param_groups]
    names = {id(p): n for n, p in members[0].named_parameters()}
    member_groups = [(sorted(names[id(p)] for p in g["params"]), g["weight_decay"])
                     for g in make_optimizer(members[0], r).param_groups]
    assert fused_groups == member_groups
    assert [wd for _, wd in fused_groups] == [1e-4, 0.0] and all(g for g, _ in fused_groups)


def tiny_data(n=48, size=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return x, torch.randint(0, 10, (n,), generator=g), Normalizer.fit(x)


def test_fused_batches_are_each_loaders_own_batches():
    x, y, norm = tiny_data(n=16)
    base = ResidentLoader(x, y, 4, norm, train=True)
    fused = FusedBatches([base.fork(i) for i in range(K)])
    alone = [base.fork(i) for i in range(K)]
    for _ in range(2):  # two epochs: every member's epoch counter advances (its order and crops change)
        own = [list(a) for a in alone]
        got = list(fused)
        assert len(got) == len(own[0]) == 4
        for b, (xf, yf) in enumerate(got):
            assert xf.shape == (4, 3 * K, 16, 16) and yf.shape == (K, 4)
            for i in range(K):
                assert torch.equal(xf[:, 3 * i:3 * (i + 1)], own[i][b][0]) and torch.equal(yf[i], own[i][b][1])


def endless(loader):
    while True:
        yield from loader


@pytest.mark.parametrize("shortcut,overrides", [
    ("A", {}),
    ("B", {"no_wd_bn_bias": True, "nesterov": True, "label_smoothing": 0.1}),
], ids=["A-cifar-paper", "B-no-wd-bn-nesterov-smoothing"])
def test_training_equals_each_member_trained_alone(shortcut, overrides):
    """20 SGD steps of the recipe's optimiser (momentum, weight decay, lr 0.1), each member on its own batch
    stream (own order and augmentation), fp64: weights, BN statistics, momentum buffers and the per-member
    statistics equal the member trained alone by the engine's TrainStep (tolerance: module docstring)."""
    steps, batch = 20, 8
    r = get_recipe("cifar-paper").with_overrides(**overrides)
    x, y, norm = tiny_data()
    base = ResidentLoader(x, y, batch, norm, train=True)  # 6 batches an epoch: the 20 steps cross 3 epochs
    dev = torch.device("cpu")

    members = make_members("resnet8", dtype=torch.float64, randomise=False, shortcut=shortcut)
    fused = FusedResNet.from_members(members).train()
    step = fused_train_step(fused, r, "fp32", dev)
    batches = endless(FusedBatches([base.fork(i) for i in range(K)]))
    for _ in range(steps):
        xf, yf = next(batches)
        step(xf.double(), yf, 0.1)

    fused_names = {n: p for n, p in fused.named_parameters()}
    for i, m in enumerate(members):
        m.train()
        alone = TrainStep(m, m, make_optimizer(m, r), torch.amp.GradScaler("cpu", enabled=False), None, "fp32",
                          dev, r.label_smoothing)
        own = endless(base.fork(i))
        for _ in range(steps):
            xb, yb = next(own)
            alone(xb.double(), yb, 0.1)
        sd = fused.member_state_dict(i)
        for key, t in m.state_dict().items():
            torch.testing.assert_close(sd[key], t, **TRAIN, msg=lambda s, i=i, key=key: f"member {i} {key}: {s}")
        for name, p in m.named_parameters():
            buf = step.opt.state[fused_names["net." + name]]["momentum_buffer"].chunk(K)[i]
            torch.testing.assert_close(buf, alone.opt.state[p]["momentum_buffer"], **TRAIN)
        torch.testing.assert_close(step.acc[i], alone.acc, **TRAIN)  # loss sum, wrong, images, non-finite


def test_what_cannot_be_fused_is_a_one_line_error():
    def error(fn) -> str:
        with pytest.raises(ReslabError) as e:
            fn()
        assert "\n" not in str(e.value)
        return str(e.value)

    r8 = make_members("resnet8", k=1, randomise=False)[0]
    assert "member 1" in error(lambda: FusedResNet.from_members([r8, create_model("resnet14")]))
    assert "shortcut='B' vs 'A'" in error(lambda: FusedResNet.from_members([r8, create_model("resnet8", shortcut="B")]))
    assert "residual=False" in error(lambda: FusedResNet.from_members([r8, create_model("plain8")]))
    assert "member 0 is a torch.nn" in error(lambda: FusedResNet.from_members([torch.nn.Sequential()]))
    odd = create_model("resnet8")
    odd.layer1[0].relu = torch.nn.GELU()
    assert "layer1.0.relu (GELU)" in error(lambda: FusedResNet.from_members([odd]))
    behind = create_model("resnet8")
    behind.bn1.num_batches_tracked.fill_(3)
    assert "same step" in error(lambda: FusedResNet.from_members([r8, behind]))
    fused = FusedResNet.from_members([r8])
    assert "fp16" in error(lambda: fused_train_step(fused, get_recipe("cifar-paper"), "fp16", torch.device("cpu")))
    assert "out of range" in error(lambda: fused.member_state_dict(1))
    # an init-only switch is not an architecture: members may differ in it
    FusedResNet.from_members([r8, create_model("resnet8", zero_init_last=True)])
