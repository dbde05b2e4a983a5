"""K runs of one architecture fused into one model: design (b) of "train K runs on one GPU at once".

Design (a) is a run set (runset.py): K ordinary models, each step captured as its own CUDA graph and
replayed on its own stream. Here instead every layer holds all K members, so one kernel does the work of K:

  conv        one grouped conv, groups = K: member i's filters are the i-th block of output channels and it
              reads the i-th block of input channels, so members never mix
  BatchNorm   one BN over K*C channels: BN is per channel, so member i's batch statistics and running
              statistics are exactly its own (its activations occupy channels [i*C, (i+1)*C))
  option A    subsample, then zero-pad each member's channels: (N, K*C, H, W) -> (N, K, C', H, W) -> back
  fc          a batched matmul, one (classes x C) matrix per member
  ReLU, pools elementwise or per channel: unchanged

Every fused tensor is its K members' tensors stacked along dim 0 (num_batches_tracked, a scalar, is shared),
so a member's checkpoint is a slice: `member_state_dict(i)` loads strictly into the ordinary model. Fused
parameters keep their members' ndim, so `make_optimizer`'s groups (no weight decay on ndim <= 1 under
`no_wd_bn_bias`) are the members' groups, and SGD with momentum and weight decay is elementwise: one
optimiser over the fused model is K optimisers.

Data: each member sees its own batch (own order and augmentation). Input (N, K*3, H, W), member-major
(`FusedBatches` stacks K resident loaders); output logits (K, N, classes). The loss is the sum of the
members' mean cross-entropies, so member i's gradients are those of its own run. Tested on the CPU
(tests/test_fused.py): fused logits, weights after SGD steps and BN statistics equal the members trained alone.

    fused = FusedResNet.create("resnet20", seeds=range(K))     # or .from_members(models)
    step = fused_train_step(fused, get_recipe("cifar-paper"), "fp32", torch.device("cpu"))
    for x, y in FusedBatches([loader.fork(i) for i in range(K)]):
        step(x, y, lr)                            # x: (N, 3K, 32, 32), y: (K, N)
    create_model("resnet20").load_state_dict(fused.member_state_dict(i))   # member i, an ordinary model
"""
from __future__ import annotations

import copy
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import BasicBlock, Bottleneck, GatedShortcut, ShortcutA
from .errors import ReslabError
from .recipes import Recipe
from .resnet import ResNet
from .step import TrainStep, make_optimizer

# modules whose own forward is elementwise around their children (calls, sums, gates): fusing the
# children fuses them
CONTAINERS = (ResNet, BasicBlock, Bottleneck, GatedShortcut, nn.Sequential)
# elementwise or per-channel, no state: correct on the stacked channels as they are
PER_CHANNEL = (nn.ReLU, nn.Identity, nn.MaxPool2d, nn.AdaptiveAvgPool2d)
# config fields that change a model's name or initial weights, not its layers: members may differ in them
INIT_ONLY = ("name", "zero_init_last")


class MemberShortcutA(nn.Module):
    """Option A on K stacked members: each member's channels are zero-padded on their own, so member i's
    identity channels stay in its block. Parameter-free, like ShortcutA."""

    def __init__(self, a: ShortcutA, k: int):
        super().__init__()
        self.k, self.cin, self.cout, self.stride, self.pad = k, a.cin, a.cout, a.stride, a.pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = F.avg_pool2d(x, 1, self.stride)  # = x[:, :, ::s, ::s]; see ShortcutA for why a pool
        if self.cout == self.cin:
            return x
        n, _, h, w = x.shape
        before = (self.cout - self.cin) // 2 if self.pad == "both" else 0
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        # zeros in the input's layout (mixed layouts slow later CPU kernels; see ShortcutA), member i's
        # channels written into [i*cout + before, i*cout + before + cin)
        out = torch.empty((n, self.k * self.cout, h, w), dtype=x.dtype, device=x.device, memory_format=fmt).zero_()
        out.unflatten(1, (self.k, self.cout))[:, :, before:before + self.cin] = x.unflatten(1, (self.k, self.cin))
        return out

    def extra_repr(self) -> str:
        return f"{self.k} x ({self.cin}->{self.cout}), stride={self.stride}, zero-pad={self.pad}"


class FusedLinear(nn.Module):
    """K linear layers as one batched matmul: (N, K*C) -> (K, N, J). `weight` is (K*J, C) and `bias` (K*J,),
    the members' stacked along dim 0 with the members' ndim (so the optimiser groups them alike)."""

    def __init__(self, k: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.k, self.in_features, self.out_features = k, in_features, out_features
        self.weight = nn.Parameter(torch.empty(k * out_features, in_features))
        self.bias = nn.Parameter(torch.empty(k * out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, j, c = self.k, self.out_features, self.in_features
        x = x.view(-1, k, c).transpose(0, 1)                       # (K, N, C)
        w = self.weight.view(k, j, c).transpose(1, 2)              # (K, C, J)
        if self.bias is None:
            return torch.bmm(x, w)
        return torch.baddbmm(self.bias.view(k, 1, j), x, w)        # (K, N, J)

    def extra_repr(self) -> str:
        return f"{self.k} x ({self.in_features}->{self.out_features})"


def _fused_leaf(m: nn.Module, k: int) -> nn.Module | None:
    """The K-member form of a module that holds state or mixes channels; None if `m` is not one."""
    if type(m) is nn.Conv2d:
        if m.padding_mode != "zeros":
            raise ReslabError(f"FusedResNet fuses zero-padded convolutions, not padding_mode={m.padding_mode!r}")
        return nn.Conv2d(k * m.in_channels, k * m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                         groups=k * m.groups, bias=m.bias is not None)
    if type(m) is nn.BatchNorm2d:
        return nn.BatchNorm2d(k * m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    if type(m) is ShortcutA:
        return MemberShortcutA(m, k)
    if type(m) is nn.Linear:
        return FusedLinear(k, m.in_features, m.out_features, m.bias is not None)
    return None


def _fuse_children(module: nn.Module, k: int, path: str) -> None:
    """Replace, in place, every leaf below `module` with its K-member form (registration order kept, so the
    state dict keeps the member's key order); a module it does not know is a one-line error naming it."""
    for name, child in list(module.named_children()):
        where = f"{path}.{name}" if path else name
        fused = _fused_leaf(child, k)
        if fused is not None:
            setattr(module, name, fused)
        elif type(child) in PER_CHANNEL:
            continue
        elif type(child) in CONTAINERS:
            _fuse_children(child, k, where)
        else:
            raise ReslabError(f"FusedResNet cannot fuse {where} ({type(child).__name__}): it knows convs, "
                              f"BatchNorm2d, option-A shortcuts, linear heads and per-channel layers")


def _check_members(models: list[nn.Module]) -> None:
    if not models:
        raise ReslabError("FusedResNet needs at least one member")
    for i, m in enumerate(models):
        if type(m) is not ResNet:
            raise ReslabError(f"FusedResNet fuses reslab ResNets (zoo.create_model); member {i} is a "
                              f"{type(m).__module__}.{type(m).__name__}")
    first = asdict(models[0].cfg)
    for i, m in enumerate(models[1:], 1):
        diff = [f"{f}={v!r} vs {first[f]!r}" for f, v in asdict(m.cfg).items()
                if v != first[f] and f not in INIT_ONLY]
        shapes = [(k, t.shape) for k, t in m.state_dict().items()]
        if diff or shapes != [(k, t.shape) for k, t in models[0].state_dict().items()]:
            raise ReslabError(f"members must share one architecture: member {i} ({m.cfg.name or '?'}) differs "
                              f"from member 0 ({models[0].cfg.name or '?'}) in "
                              f"{', '.join(diff) or 'its layers (the state dicts differ)'}")


class FusedResNet(nn.Module):
    """K ResNets of one architecture as one model; `net` is the member architecture with every layer fused.
    forward: (N, K*in_channels, H, W), member-major -> logits (K, N, classes).

    The constructor builds the structure only (the fused layers hold PyTorch's default init); `from_members`
    and `create` are the ways to get members' weights in."""

    def __init__(self, template: ResNet, k: int):
        super().__init__()
        _check_members([template])
        if k < 1:
            raise ReslabError(f"FusedResNet needs k >= 1 members, got {k}")
        self.k, self.cfg = k, template.cfg
        self.net = copy.deepcopy(template)
        _fuse_children(self.net, k, "")

    @classmethod
    def from_members(cls, models: list[nn.Module]) -> "FusedResNet":
        """Fuse trained or freshly initialised members: every weight and BN buffer copied in, member i at
        block i. The fused model lives on member 0's device and dtype."""
        _check_members(models)
        fused = cls(models[0], len(models))
        p = next(models[0].parameters())
        fused.to(p.device, p.dtype)
        states = [m.state_dict() for m in models]
        target = fused.net.state_dict()
        if list(target) != list(states[0]):  # a leaf fused under another name: a bug here, not the user's
            raise AssertionError(f"fused keys differ from the member's: {sorted(set(target) ^ set(states[0]))}")
        with torch.no_grad():
            for key, t in target.items():
                if t.ndim == 0:  # num_batches_tracked: one counter for the K members
                    counts = {int(s[key]) for s in states}
                    if len(counts) > 1:
                        raise ReslabError(f"members have taken different numbers of BN steps ({key}: "
                                          f"{sorted(counts)}); fuse runs that are at the same step")
                    t.copy_(states[0][key])
                else:
                    t.copy_(torch.cat([s[key] for s in states], 0))
        return fused

    @classmethod
    def create(cls, arch: str, seeds, **overrides) -> "FusedResNet":
        """One zoo member per seed, each initialised from its seed alone as the engine does (init_model)."""
        from .zoo import create_model
        members = []
        for seed in seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                members.append(create_model(arch, **overrides))
        return cls.from_members(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def member_state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Member i's checkpoint: the ordinary model's keys and shapes, for load_state_dict(strict=True).
        Copies, not views (a saved view would drag the whole fused storage into the file)."""
        if not 0 <= i < self.k:
            raise ReslabError(f"member index {i} out of range for {self.k} members")
        out = {}
        for key, t in self.net.state_dict().items():
            if t.ndim == 0:
                out[key] = t.clone()
            else:
                n = t.shape[0] // self.k
                out[key] = t[i * n:(i + 1) * n].clone()
        return out


def stack_inputs(xs: list[torch.Tensor]) -> torch.Tensor:
    """K member batches (N, C, H, W) -> the fused input (N, K*C, H, W), member i in channels [i*C, (i+1)*C)."""
    return torch.cat(xs, 1)


def member_losses(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Each member's mean cross-entropy, (K,), from logits (K, N, J) and labels (K, N). Their sum is the
    fused loss: d(sum)/d(member i's logits) is member i's own mean-loss gradient (1/N per example)."""
    k, n, j = logits.shape
    per = F.cross_entropy(logits.reshape(k * n, j), y.reshape(k * n), reduction="none",
                          label_smoothing=label_smoothing)
    return per.view(k, n).mean(1)


class FusedStep(TrainStep):
    """TrainStep on a FusedResNet: the same lr tensor, optimiser and precision context, so GraphedStep can
    capture it unchanged. `acc` holds one row per member: (loss sum, wrong, images, non-finite steps)."""

    def __init__(self, net, model: FusedResNet, opt, scaler, precision: str, device: torch.device,
                 label_smoothing: float = 0.0):
        super().__init__(net, model, opt, scaler, None, precision, device, label_smoothing)
        self.acc = torch.zeros(model.k, 4, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor, y: torch.Tensor, ctx) -> torch.Tensor:
        """x (N, K*C, H, W), y (K, N); returns each member's wrong predictions (K,)."""
        with ctx:
            logits = self.net(x)                                         # (K, N, classes)
            losses = member_losses(logits, y, self.label_smoothing)      # (K,)
        self.scaler.scale(losses.sum()).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        with torch.no_grad():
            n = y.shape[1]
            wrong = (logits.argmax(2) != y).sum(1)
            losses = losses.detach().double()
            self.acc += torch.stack([losses * n, wrong.double(), self._one.expand_as(losses) * n,
                                     (~torch.isfinite(losses)).double()], 1)
        return wrong


def fused_train_step(model: FusedResNet, r: Recipe, precision: str, device: torch.device, net=None) -> FusedStep:
    """The engine's step for a fused model: the recipe's optimiser (make_optimizer: same param groups as each
    member's), its label smoothing, one lr for all members. `net` is what runs forward (a compiled `model`)."""
    if precision == "fp16":
        raise ReslabError("a fused model cannot train in fp16: one GradScaler would skip every member's step "
                          "when one member overflows; use bf16 or fp32")
    if r.ema_decay:
        raise ReslabError("a fused model has no EMA (each member would need its own); use a recipe with "
                          "ema_decay=0 or a run set")
    opt = make_optimizer(model, r)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    return FusedStep(net if net is not None else model, model, opt, scaler, precision, device, r.label_smoothing)


class FusedBatches:
    """K resident training loaders as one stream of fused batches: x (N, K*C, H, W) member-major, y (K, N).
    Member i's batches are exactly loader i's (its own seed: own order and augmentation). `plans` and
    `batch_of` have ResidentLoader's contract, so GraphedStep gathers fused batches inside its graph."""

    def __init__(self, loaders: list):
        if not loaders:
            raise ReslabError("FusedBatches needs at least one loader")
        if len({(len(l), l.batch_size, l.shape) for l in loaders}) > 1:
            raise ReslabError("fused members need loaders of one size, batch and image shape")
        self.loaders = loaders

    def __len__(self) -> int:
        return len(self.loaders[0])

    def plans(self):
        """The rest of the epoch as stacked (indices, variants), each (K, N). Every loader's generator is
        pulled to its end (not zip, which would leave the others' epoch counters behind)."""
        its = [l.plans() for l in self.loaders]
        while True:
            got = [next(it, None) for it in its]
            if got[0] is None:
                return
            yield torch.stack([g[0] for g in got]), torch.stack([g[1] for g in got])

    def batch_of(self, idx: torch.Tensor, variant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(l.batch_of(i, v) for l, i, v in zip(self.loaders, idx, variant)))
        return stack_inputs(list(xs)), torch.stack(ys)

    def __iter__(self):
        for idx, variant in self.plans():
            yield self.batch_of(idx, variant)
