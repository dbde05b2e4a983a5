"""K runs that differ only in their seed, trained as one fused model (design (b); fused.py holds the model).

Every member is an ordinary run: a Trainer with its own run folder, config, metrics log, evaluations and
checkpoints, in the single-run layout. Only the optimisation step is shared: the members' models are fused
into one FusedResNet (grouped convolutions, K*C-channel BatchNorms), their loaders into one FusedBatches
stream (member i still sees exactly its own batches), and one fused SGD step updates all K. Whenever a member
reports — a log line, an evaluation, a checkpoint — its weights, BN statistics, momentum buffers and
counters are first copied out of the fused model into its own model and optimiser, so what it logs and
saves is what the run trained alone would log and save, up to floating-point summation order (grouped
convolutions add in another order; tests/test_fusedset.py states the tolerance). A member's checkpoint
resumes alone (`reslab train --resume`), in a run set, or fused again.

What a fused set refuses, each with the reason (`config_refusal`, judged again on resumed members' own
configs): runs that differ in more than seed and folder; fp16 (one GradScaler would skip every member's
step when one overflows); EMA; the plateau schedule and the warm-up rule of ResNet-110 while it lasts (each
member would need its own lr); precise BN (it rewrites a member's statistics outside the fused model);
image folders (the fused batch is gathered from device-resident CIFAR); members at different steps.
`reslab train --seeds ... --fused` and `reslab reproduce --fused` train such runs as a run set instead, and
say why. Under torchrun a fused set, like a run set, is an error.

A member that diverges stops the whole set (one fused step cannot leave a member out). Every member is
checked (its weights and losses, and at an evaluation its evaluation loss) before any reports, so no member
saves at that step: all checkpoints on disk stay at the same good step, and the others resume together
without the diverged one.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from . import dist, interrupt
from .config import RunConfig
from .engine import EvaluationFailed, Trainer, TrainingDiverged
from .errors import ReslabError
from .fused import FusedBatches, FusedResNet, fused_train_step
from .logs import write_json
from .recipes import lr_at
from .runset import check_folders
from .step import GraphedStep, graph_fallback


class CannotFuse(ReslabError):
    """These runs cannot be fused (the reason is the message); they can still train as a run set."""


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _shared(cfg: RunConfig) -> dict:
    """What members of one fused set share: the whole config but the seed and the run folder, as dotted keys
    (so that a refusal can name the fields that differ)."""
    return _flat(replace(cfg, seed=0, out="").to_dict())


def fusion_key(cfg: RunConfig) -> str:
    """Equal for runs that one fused set can train together (as far as their configs go)."""
    return json.dumps(_shared(cfg), sort_keys=True)


def config_refusal(configs: list[RunConfig]) -> str | None:
    """Why these runs cannot be fused, from their configs alone (None: nothing in the configs forbids it).
    Resumed runs are judged by the configs their checkpoints hold (FusedSet checks those again)."""
    if not configs:
        return "a fused set needs at least one run"
    if configs[0].data.name == "folder":
        return "a fused batch is gathered from device-resident data (CIFAR), not from image folders"
    first = _shared(configs[0])
    for c in configs[1:]:
        other = _shared(c)
        diff = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if diff:
            return f"fused runs may differ only in seed and folder; {Path(c.out).name} differs in {', '.join(diff)}"
    rt, r = configs[0].runtime, configs[0].recipe
    reasons = [
        (rt.precision == "fp16", "one GradScaler would skip every member's step when one member overflows "
                                 "(fp16); use bf16 or fp32"),
        (bool(r.ema_decay), "each member would need its own EMA"),
        (r.schedule == "plateau", "the plateau schedule gives each member its own lr"),
        (bool(rt.precise_bn), "precise BN rewrites a member's statistics outside the fused model"),
    ]
    return next((why for bad, why in reasons if bad), None)


def _trainer_refusal(trainers: list[Trainer]) -> str | None:
    """Why built (or resumed) members cannot be fused: their configs as resumed, their state."""
    why = config_refusal([t.cfg for t in trainers])
    if why:
        return why
    if any(t.state.schedule.in_warmup_rule for t in trainers):
        return ("the warm-up rule (lr 0.01 until training error < 80%) ends at a different step for each "
                "member; train them as a run set, or fuse them once the rule has ended (--resume)")
    steps = {t.state.step for t in trainers}
    if len(steps) > 1:
        return f"the members are at different steps ({sorted(steps)}); resume them as a run set"
    return None


class FusedSet:
    def __init__(self, configs: list[RunConfig], *, resume: bool = False, explicit: set | None = None):
        why = config_refusal(configs)
        if why:
            raise CannotFuse(f"cannot fuse these runs: {why}")
        check_folders(configs)
        d = dist.init(configs[0].runtime.device)
        if d.enabled:  # not a fallback case: a run set refuses torchrun too
            raise ReslabError("a fused set trains in one process; under torchrun, train one run at a time")
        ts = [Trainer(c, resume=resume, explicit=explicit, dist_info=d, own_step=False) for c in configs]
        why = _trainer_refusal(ts)
        if why:
            raise CannotFuse(f"cannot fuse these runs: {why}")
        self.trainers = ts
        for i, t in enumerate(ts):
            t.label = Path(t.cfg.out).name
            if t.d.is_main:  # the record says how the run was trained (its numbers differ from alone's in rounding)
                write_json(t.out / "config.json", {**t.config_record(), "fused": {"members": len(ts), "index": i}})
        t0 = ts[0]
        self.cfg, self.device = t0.cfg, t0.d.device
        rt = self.cfg.runtime
        fmt = torch.channels_last if rt.channels_last else torch.contiguous_format
        self.model = FusedResNet.from_members([t.model for t in ts]).to(memory_format=fmt)
        net = torch.compile(self.model, mode=rt.compile_mode) if rt.compile else self.model
        self.step_fn = fused_train_step(self.model, self.cfg.recipe, rt.precision, self.device, net=net)
        params = [dict(t.model.named_parameters()) for t in ts]
        buffers = [dict(t.model.named_buffers()) for t in ts]
        self._params = [(fp, [p[name] for p in params]) for name, fp in self.model.net.named_parameters()]
        self._buffers = [(fb, [b[name] for b in buffers]) for name, fb in self.model.net.named_buffers()]
        self._momentum_in()
        self.batches = FusedBatches([t.data.train for t in ts])
        why = graph_fallback(self.device, rt.precision, t0.data.train, None, False, rt.compile, rt.sync_bn)
        if rt.graphs and why:
            raise ReslabError(f"--graphs: {why}; drop --graphs")
        if why and rt.graphs is None and self.device.type == "cuda":
            print(f"reslab: fused step not graphed: {why}", file=sys.stderr)
        self.graphed = None if why or rt.graphs is False else GraphedStep(self.step_fn, self.batches)

    # ------------------------------------------------------------ members <-> fused model
    def _momentum_in(self) -> None:
        """Resumed members bring their momentum buffers: stacked into the fused optimiser's (all or none:
        members at the same step have all taken a step or none has). Each buffer gets its parameter's
        exact strides, which PyTorch's fused SGD requires."""
        bufs = [[t.state.optimizer.state.get(p, {}).get("momentum_buffer") for t, p in zip(self.trainers, ps)]
                for _, ps in self._params]
        if all(b is None for row in bufs for b in row):
            return
        if any(b is None for row in bufs for b in row):
            raise ReslabError("some members' checkpoints have momentum buffers and some do not; resume them "
                              "as a run set")
        for (fp, _), row in zip(self._params, bufs):
            self.step_fn.opt.state[fp]["momentum_buffer"] = torch.empty_like(fp).copy_(torch.cat(row, 0))

    @torch.no_grad()
    def to_members(self, lr: float) -> None:
        """Copy the fused weights, BN buffers, momentum buffers, step counters and lr out to every member,
        which then logs, evaluates and saves as a run of its own. In place: a captured graph keeps its
        pointers."""
        k = len(self.trainers)
        for fp, ps in self._params:
            for p, part in zip(ps, fp.chunk(k, 0)):
                p.copy_(part)
        for fb, bs in self._buffers:
            for b, part in zip(bs, fb.chunk(k, 0) if fb.ndim else [fb] * k):
                b.copy_(part)
        for fp, ps in self._params:
            buf = self.step_fn.opt.state.get(fp, {}).get("momentum_buffer")
            if buf is None:
                continue
            for t, p, part in zip(self.trainers, ps, buf.chunk(k, 0)):
                st = t.state.optimizer.state[p]
                if "momentum_buffer" in st:
                    st["momentum_buffer"].copy_(part)
                else:
                    st["momentum_buffer"] = part.clone(memory_format=torch.preserve_format)
        for t, row in zip(self.trainers, self.step_fn.acc):
            t.step_fn.acc.add_(row)
            t.step_fn.set_lr(lr)  # the lr its checkpoint records, as the run alone's would
        self.step_fn.acc.zero_()

    def _check_members(self, step: int) -> None:
        """Before any member reports at `step`: if one diverged, stop the set with no member saving, so every
        member's checkpoint on disk stays at the same (good) step."""
        bad = torch.stack([t.nonfinite().sum() for t in self.trainers]).tolist()
        if not any(bad):
            for t in self.trainers:  # checked here, once for all: their log lines need not check again
                t.checked_step = step
            return
        t0 = self.trainers[0]
        names = ", ".join(Path(t.cfg.out).name for t, b in zip(self.trainers, bad) if b)
        on_disk = (f"every member's last.pt is still its checkpoint of step {t0.saved_step}, untouched"
                   if t0.saved_step is not None else "no member had written a checkpoint")
        reason = (f"fused member(s) {names}: the training loss or the weights became NaN/Inf between steps "
                  f"{t0.checked_step + 1} and {step}; the set stopped without saving ({on_disk}); lower the learning "
                  "rate or use --precision fp32, or resume the others without it")
        for t, b in zip(self.trainers, bad):
            if b:
                t.diverged(reason, step)  # each diverged member's log says so; the others only stopped
        raise TrainingDiverged(reason)

    def _evaluate_members(self, step: int) -> None:
        """Every member evaluated before any logs or saves: one whose outputs overflow (a non-finite loss)
        stops the set with every checkpoint on disk at the same step, as a diverged step does."""
        for t in self.trainers:
            try:
                t.evaluation(step)
            except TrainingDiverged as e:
                raise TrainingDiverged(f"fused member {Path(t.cfg.out).name}: {e}; no member saved at step {step}, "
                                       "resume the others without it") from None
            except Exception:  # kept by the member: its own evaluate_and_save saves the step, then raises it
                pass

    # ------------------------------------------------------------ the loop
    def fit(self, stop_at: int | None = None) -> list[dict]:
        """Train every member to the end (or `stop_at`); returns each member's last evaluation, in order."""
        with interrupt.stop_on_sigterm():
            return self._fit(stop_at)

    def _fit(self, stop_at: int | None) -> list[dict]:
        ts, r = self.trainers, self.cfg.recipe
        t0 = ts[0]
        plans = self._endless()
        try:
            stop = min(t.begin(stop_at) for t in ts)
            while t0.state.step < stop:
                if interrupt.requested():  # the members save together, at the step the set reached
                    self.to_members(lr_at(max(t0.state.step - 1, 0), r, t0.state.schedule))
                    self._check_members(t0.state.step)
                    for t in ts:
                        t.end(t.state.step)
                    raise interrupt.stopped([t.out for t in ts], [t.state.step for t in ts])
                lr = lr_at(t0.state.step, r, t0.state.schedule)
                if self.graphed is not None:
                    idx, variant = next(plans)
                    wrong, n = self.graphed(idx, variant, lr), idx.shape[1]
                else:
                    x, y = next(plans)
                    wrong, n = self.step_fn(x, y, lr), y.shape[1]
                if t0.reports_at(t0.state.step + 1, stop):
                    self.to_members(lr)
                    self._check_members(t0.state.step + 1)
                    if t0.evaluates_at(t0.state.step + 1, stop):
                        self._evaluate_members(t0.state.step + 1)
                failed = []
                for t, w in zip(ts, wrong):  # every member saves its step before a failed evaluation stops the set
                    try:
                        t.after_step(w, n, lr, stop)
                    except EvaluationFailed as e:
                        failed.append(f"{Path(t.cfg.out).name}: {e}")
                if failed:
                    raise EvaluationFailed(f"{len(failed)} of {len(ts)} fused members could not be evaluated at step "
                                           f"{t0.state.step} ({'; '.join(failed)}); every member is saved at that "
                                           "step, --resume goes on")
            self.to_members(lr_at(max(t0.state.step - 1, 0), r, t0.state.schedule))  # the last step's lr
            for t in ts:
                t.end(stop)
        finally:
            for t in ts:
                t.close()
        return [t.state.metrics for t in ts]

    def _endless(self):
        while True:
            yield from (self.batches.plans() if self.graphed is not None else self.batches)


def train_fused(configs: list[RunConfig], *, resume: bool = False, explicit: set | None = None,
                stop_at: int | None = None) -> list[dict]:
    """Train `configs` as one fused set where they can be fused, else as a run set, saying why once."""
    from .runset import train_set
    why = None
    try:
        fused = FusedSet(configs, resume=resume, explicit=explicit)
        return fused.fit(stop_at)
    except CannotFuse as e:
        why = str(e)  # the run set is trained outside this handler: its traceback holds the K members
    finally:
        dist.shutdown()
    print(f"reslab: {why}; training the {len(configs)} runs as a run set", file=sys.stderr, flush=True)
    return train_set(configs, resume=resume, explicit=explicit, stop_at=stop_at)
