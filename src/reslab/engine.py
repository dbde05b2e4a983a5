"""The training loop. The contract, in one place:

  `Trainer(cfg)` builds one run from its RunConfig: data, model (initialised from the run's seed), optimiser,
  GradScaler, EMA and schedule state, gathered in one TrainingState (state.py). With `resume=True` and a
  RUN/last.pt, the checkpoint's config is authoritative: flags that contradict it are one-line errors
  (config.resume_config), `extend_to=N` lengthens the run, and the state is restored exactly.

  `fit()` then repeats `advance()`: lr = lr_at(step) -> forward under one autocast context -> backward through
  one (possibly disabled) GradScaler -> optimiser step -> EMA update. Every `log_every` steps it logs one
  metrics line; every `eval_every` steps and at the end it evaluates and saves (rank 0): RUN/best.pt on a new
  best error, then RUN/last.pt, each written atomically. `stop_at` ends the process early with a checkpoint
  at that step.

  Nothing is saved unless every step since the last check had a finite loss and the weights are finite; a
  run that diverges stops with an error that says which checkpoint on disk is intact. An evaluation that
  raises (a corrupt validation image) has its step saved first, marked pending; the resume evaluates it.
  On the CPU a resumed run is bitwise the uninterrupted one, however often it was killed (SIGKILL included).

A Trainer owns no global state (its randomness is its seed's), so several can run side by side in one
process. `train(cfg)` is the one-call form.
"""
from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from . import dist, interrupt
from .config import RunConfig, extend, resume_config
from .data import build as data_build
from .data.augment import Augment
from .data.normalize import Normalizer
from .data.resident import ResidentLoader
from .errors import ReslabError, bad_batch_advice, described
from .evaluate import evaluate, precise_bn
from .flags import to_cli_args
from .logs import MetricsLog, Progress, last_evaluation, session_environment, truncate_metrics, write_json
from .recipes import after_eval, lr_at, warmup_rule_applies
from .state import TrainingState
from .step import (GivenBatch, GraphedStep, TrainStep, autocast_for, graph_fallback, make_ema, make_optimizer,
                   resolve_runtime)
from .zoo import create_model


class TrainingDiverged(ReslabError):
    pass


class StoppedAfterSaving(ReslabError):
    """Reading data failed (a corrupt image, a vanished file) where the run could save its step first; the
    message says what is on disk and how to go on."""


class EvaluationFailed(StoppedAfterSaving):
    """An evaluation raised: the run was saved at that step first, marked to evaluate it again on resume."""


class TrainingDataFailed(StoppedAfterSaving):
    """Reading a training batch raised: the run was saved at the step before it (the batch unused)."""


def configure_backends(deterministic: bool) -> None:
    """Process-wide switches (the only global state training touches)."""
    if deterministic:
        import os
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # both ways: a run after a deterministic one in the same process (a notebook, a run set's caller, the
    # tests) must not inherit its slow algorithms
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs use TF32 tensor cores (cuDNN's default too)


def _mismatch_notes(cfg: RunConfig, model, device) -> list[str]:
    """Choices that run but are very likely not what was meant (said once, when a run starts)."""
    notes = []
    family, data = model.cfg.family, cfg.data.name
    if family == "imagenet" and data != "folder":
        same_depth = f", cifar_{cfg.model.arch} at this depth" if (model.cfg.depth - 2) % 6 == 0 else ""
        notes.append(f"{cfg.model.arch} is the ImageNet net (7x7/2 stem and max pool): on {data}'s 32x32 images its "
                     f"last stage is 1x1; the CIFAR family's nets are resnet20 ... resnet110 (any depth 6n+2"
                     f"{same_depth})")
    elif family == "cifar" and data == "folder" and cfg.recipe.crop_size >= 96:
        notes.append(f"{cfg.model.arch} is a CIFAR net (16-64 filters, made for 32x32) and trains here on "
                     f"{cfg.recipe.crop_size}x{cfg.recipe.crop_size} crops; the ImageNet family is resnet18 ... "
                     "resnet152")
    if cfg.runtime.precision == "fp16" and device.type == "cpu":
        notes.append("fp16 training on the CPU is very slow (about 100x slower than fp32 on a 2-core Intel Xeon, "
                     "2026-12-06); use --precision fp32 or bf16")
    return notes


def init_model(cfg: RunConfig, num_classes: int) -> nn.Module:
    """The run's network, initialised from the run's seed alone (the global generator is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return create_model(cfg.model.arch, num_classes=num_classes, **cfg.model.kwargs())


class Trainer:
    def __init__(self, cfg: RunConfig, *, resume: bool = False, explicit: set | None = None,
                 extend_to: int | None = None, dist_info: dist.DistInfo | None = None, own_step: bool = True):
        """`own_step=False`: a member of a fused set (fusedset.py), whose steps the set takes; it builds no
        compiled or graphed step of its own."""
        self.out = out = Path(cfg.out)
        ck = None
        if (out / ckpt.LAST).exists():
            if not resume:
                raise ReslabError(f"{out} already holds a run ({ckpt.LAST}); pass --resume to continue it or "
                                  "choose another --out")
            ck = ckpt.training_state(out / ckpt.LAST)
            saved = RunConfig.from_dict(ck["config"])
            # 'auto' settings become what they mean on the device the run will use, then are compared
            dev = dist.pick_device(cfg.runtime.device if explicit is None or ("runtime", "device") in explicit
                                   else saved.runtime.device)
            cfg = resume_config(saved, replace(cfg, runtime=resolve_runtime(cfg.runtime, dev)), explicit)
        elif extend_to is not None:
            raise ReslabError(f"--extend-to needs a run to extend, and {out} holds none ({ckpt.LAST} is missing)")
        elif (ev := last_evaluation(out)) is not None:  # a record kept without its checkpoint (results copied
            # elsewhere, checkpoints left behind): training here would start over and delete that record
            raise ReslabError(f"{out} holds the log of a run evaluated at step {ev['step']} but not its checkpoint "
                              f"({ckpt.LAST}), so it cannot be continued; choose another --out, or move the folder "
                              "away to train it again")
        elif resume and explicit is not None and (out / "config.json").is_file():
            # `reslab train --resume` on a run stopped before its first checkpoint starts it again as its
            # config.json records it (the command's defaults would silently train another run: 64k iterations
            # at batch 128). A caller that gives the whole config (reproduce, Python) trains that config.
            try:
                saved = RunConfig.from_dict(json.loads((out / "config.json").read_text()))
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ReslabError(f"{out}/config.json cannot be read ({type(e).__name__}: {e}), so --resume cannot "
                                  "restart the run it records; move the folder away, or train without --resume "
                                  "into another --out") from None
            dev = dist.pick_device(cfg.runtime.device if ("runtime", "device") in explicit else saved.runtime.device)
            cfg = resume_config(saved, replace(cfg, runtime=resolve_runtime(cfg.runtime, dev)), explicit)
        if extend_to is not None:
            cfg = extend(cfg, extend_to)
        self.d = d = dist_info or dist.init(cfg.runtime.device)
        cfg = replace(cfg, runtime=resolve_runtime(cfg.runtime, d.device))
        cfg.recipe.validate()
        self.cfg, rt, r = cfg, cfg.runtime, cfg.recipe
        if rt.sync_bn and d.device.type == "cpu":
            raise ReslabError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm does not run on the CPU)")
        configure_backends(rt.deterministic)
        self.data = data = data_build.build(
            cfg.data.name, cfg.data.dir, batch_size=r.batch_size, device=d.device, seed=cfg.seed, rank=d.rank,
            world_size=d.world_size, val_split=r.val_split, normalization=r.normalization,
            channels_last=rt.channels_last, workers=cfg.data.workers, augment=Augment.for_size(r.crop, r.crop_size),
            decode=cfg.data.decode, on_corrupt=cfg.data.on_corrupt,
            # a resumed run keeps the normaliser it trained with (an image folder's per-pixel mean is not
            # fitted again from 10,000 decoded images)
            normalizer=Normalizer.from_state_dict(ck["normalizer"]) if ck is not None and ck.get("normalizer") else None)
        if r.batch_size > data.train_size:  # no full batch in an epoch: the loader would never yield one
            raise ReslabError(f"the batch ({r.batch_size}) is larger than the training split ({data.train_size:,} "
                              f"images); use --batch-size {data.train_size} or less")
        if ck is not None:
            data_build.check_classes(ck.get("classes"), data, f"resuming {out}")
        model = init_model(cfg, len(data.classes))
        if d.is_main and ck is None:
            for note in _mismatch_notes(cfg, model, d.device):
                print(f"reslab: warning: {note}", file=sys.stderr)
        if d.is_main and d.enabled:  # what torchrun made of the run: said once, by rank 0
            import torch.distributed as tdist
            print(f"reslab: {d.world_size} ranks ({tdist.get_backend()}), global batch {r.batch_size} = "
                  f"{r.batch_size // d.world_size} per rank", file=sys.stderr)
        model = model.to(d.device, memory_format=torch.channels_last if rt.channels_last else torch.contiguous_format)
        self.model = model
        opt = make_optimizer(model, r)
        scaler = torch.amp.GradScaler(d.device.type, enabled=rt.precision == "fp16")
        ema = make_ema(model, r.ema_decay)
        self.state = st = TrainingState(cfg, model, opt, scaler, ema, data, data.info(cfg.data.name))
        st.schedule.in_warmup_rule = warmup_rule_applies(r, model.cfg.depth)
        self.saved_step = None          # the step of RUN/last.pt on disk (None: nothing saved yet)
        self.world_sizes = [d.world_size]  # the ranks of each session that trained the run, where they changed
        if ck is not None:
            st.load_state_dict(ck, str(out / ckpt.LAST))
            self.saved_step = st.step
            self.world_sizes = st.world_sizes = self._ranks_so_far(ck, out, d, r.batch_size)
        if d.is_main:
            out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(out)
            # lines logged after the checkpoint belong to steps that will run again; with no checkpoint, the
            # lines of an attempt killed before its first one (or of another run in this folder) all do
            if ck is not None:
                truncate_metrics(out, st.step, st.metrics)
            else:
                (out / "metrics.jsonl").unlink(missing_ok=True)
            write_json(out / "config.json", self.config_record())
            prev = None
            if ck is not None and (out / "env.json").is_file():
                try:
                    prev = json.loads((out / "env.json").read_text())
                except (ValueError, OSError):  # damaged: the record of earlier sessions is lost, not the run
                    prev = None
            write_json(out / "env.json", session_environment(prev, d.device, d.world_size))
        net = self._net(model, rt, d) if own_step else model
        self.step_fn = TrainStep(net, model, opt, scaler, ema, rt.precision, d.device, r.label_smoothing,
                                 acc=st.counters["log"])
        self._plans = isinstance(data.train, ResidentLoader)  # a graph can gather its own batches from plans
        self.graphed = self._graphed_step(rt, ema) if own_step else None
        self.ctx = autocast_for(d.device, rt.precision)
        self._rule = st.counters["warmup_rule"]  # the warm-up rule's window: wrong, seen
        self._batches = None
        self.checked_step = st.step      # every step up to here is known finite
        self._evaluated = None           # (step, metrics) of the latest evaluation
        self.label = ""                  # shown in progress lines when several runs share a process
        self._log = self._bar = None     # opened by begin()

    @staticmethod
    def _ranks_so_far(ck: dict, out: Path, d, batch: int) -> list[int]:
        """The ranks of the sessions so far (as the checkpoint holds them: a session that saved nothing
        trained nothing), then this one's where it differs, said once: each rank's BN normalises batch / ranks
        images, so a run resumed on another number of ranks trained two ways (the report gives it a row of its
        own)."""
        before = ck.get("world_sizes")
        if not (isinstance(before, list) and before and all(isinstance(n, int) for n in before)):
            before = [int(ck.get("world_size") or 1)]  # checkpoints before 2026-12 say nothing: one rank
        if before[-1] == d.world_size:
            return before
        if d.is_main:
            print(f"reslab: warning: {out} trained on {before[-1]} rank(s) so far and goes on with {d.world_size}: "
                  f"each rank's BN now normalises {batch // d.world_size} images instead of {batch // before[-1]}; "
                  "the report gives such a run a row of its own", file=sys.stderr)
        return before + [d.world_size]

    @staticmethod
    def _net(model: nn.Module, rt, d) -> nn.Module:
        """What runs forward: the model, under SyncBN and DDP with torchrun, compiled on request."""
        net = model
        if rt.sync_bn and d.enabled:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        if d.enabled:
            ids = [d.device.index] if d.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(net, device_ids=ids)
        return torch.compile(net, mode=rt.compile_mode) if rt.compile else net

    def _graphed_step(self, rt, ema):
        """The CUDA-graph form of the step where it is safe; otherwise None, with the reason said once."""
        why = graph_fallback(self.d.device, rt.precision, self.data.train, ema, self.d.enabled, rt.compile,
                             rt.sync_bn, asked=bool(rt.graphs))
        if rt.graphs and why:
            raise ReslabError(f"--graphs: {why}; drop --graphs")
        if why:
            if rt.graphs is None and self.d.device.type == "cuda" and self.d.is_main:
                print(f"reslab: training step not graphed: {why}", file=sys.stderr)
            return None
        if rt.graphs is False:
            return None
        return GraphedStep(self.step_fn, self.data.train if self._plans else GivenBatch())

    def config_record(self) -> dict:
        """config.json: the run's config, the model it built, the data it found, the command to rerun it."""
        return {**self.cfg.to_dict(), "model_config": self.model.metadata, "data_info": self.state.data_info,
                "world_size": self.d.world_size, "world_sizes": self.world_sizes,
                "command": shlex.join(["reslab", *to_cli_args(self.cfg)])}

    # ------------------------------------------------------------ the loop
    def fit(self, stop_at: int | None = None) -> dict:
        """Train until the recipe's end (or `stop_at`, or a SIGTERM: saved at the step it ends, then
        interrupt.Interrupted); returns the last evaluation's metrics."""
        with interrupt.stop_on_sigterm(not self.d.enabled):
            try:
                stop = self.begin(stop_at)
                while self.state.step < stop:  # after the last step a request is not needed: it just ends
                    if interrupt.requested():  # (during begin's pending evaluation too)
                        self.end(self.state.step)
                        raise interrupt.stopped([self.out], [self.state.step])
                    self.advance(stop)
                self.end(stop)
            finally:
                self.close()
        return self.state.metrics

    def begin(self, stop_at: int | None = None) -> int:
        """Open the logs and clocks; returns the step this session stops at."""
        st, r = self.state, self.cfg.recipe
        self._log = MetricsLog(self.out, self.cfg.runtime.tensorboard) if self.d.is_main else None
        self._bar = Progress(r.iters, st.step, enabled=self.cfg.runtime.progress and self.d.is_main,
                             label=self.label)
        self._t_log, self._imgs, self._t_start = time.time(), 0, time.time() - st.elapsed
        if st.eval_pending:  # saved before an evaluation that failed: that evaluation comes first
            self.evaluate_and_save()
        return min(r.iters, stop_at or r.iters)

    def end(self, stop: int) -> None:
        st = self.state
        if st.step >= stop and not st.finished and self.saved_step != st.step:
            self.save(best=False)  # stopped early (stop_at): keep the exact position resumable

    def close(self) -> None:
        """Close what begin() opened (nothing, if it never ran: a set closes every member after a failure)."""
        if self._bar is not None:
            self._bar.close()
        if self._log:
            self._log.close()

    def advance(self, stop: int) -> None:
        """One optimisation step, then whatever is due at the new step: a log line, an evaluation, a save."""
        st, r = self.state, self.cfg.recipe
        if self._batches is None:
            self._batches = self._endless()
        lr = lr_at(st.step, r, st.schedule)
        try:  # (indices, variants) for a graph, which gathers the batch itself; else (images, labels)
            a, b = next(self._batches)
        except Exception as e:
            self._batches = None  # a generator that raised is finished; a resume starts another
            raise self._saved_before_batch(e) from e
        if self.graphed is not None:
            wrong, n = self.graphed(a, b, lr), len(a)
        else:
            wrong, n = self.step_fn(a, b, lr), len(b)
        self.after_step(wrong, n, lr, stop)

    def _due(self, step: int, stop: int) -> tuple[bool, bool]:
        """(a log line, an evaluation and save) due at `step`."""
        r = self.cfg.recipe
        return step % r.log_every == 0 or step >= stop, step % r.eval_every == 0 or step == r.iters

    def evaluates_at(self, step: int, stop: int) -> bool:
        return self._due(step, stop)[1]

    def reports_at(self, step: int, stop: int) -> bool:
        """Whether after_step at `step` writes a log line or evaluates (reads the model and counters)."""
        return any(self._due(step, stop))

    def after_step(self, wrong: torch.Tensor, n: int, lr: float, stop: int) -> None:
        """What follows an optimisation step taken at lr `lr` on `n` images (`wrong` of them misclassified):
        the warm-up rule's window, the counters, and whatever is due at the new step. A fused set
        (fusedset.py) takes its members' steps itself and calls this for each member."""
        st, r = self.state, self.cfg.recipe
        if st.schedule.in_warmup_rule:
            self._rule[0] += wrong
            self._rule[1] += n
        st.step += 1
        self._imgs += n * self.d.world_size
        if st.schedule.in_warmup_rule and st.step % r.warmup_rule.check_every == 0:
            self._check_warmup_rule()
        log, evaluate = self._due(st.step, stop)
        if log:
            self.log_train(lr, st.step >= stop)
        if evaluate:
            self.evaluate_and_save()

    def _endless(self):
        while True:
            yield from (self.data.train.plans() if self.graphed is not None and self._plans else self.data.train)

    def _check_warmup_rule(self) -> None:
        dist.all_reduce_sum(self._rule)
        wrong, seen = self._rule.tolist()
        if seen and wrong / seen < self.cfg.recipe.warmup_rule.until_train_err:
            self.state.schedule.in_warmup_rule = False
        self._rule.zero_()

    # ------------------------------------------------------------ the steps the loop calls
    def check_finite(self) -> None:
        """Every step since the last check had a finite loss, and the weights are finite; otherwise stop
        with an error that says what is on disk. Runs on every rank (it all-reduces)."""
        st = self.state
        if self.checked_step == st.step:  # a log line and an evaluation at the same step: checked already
            return
        if float(dist.all_reduce_sum(self.nonfinite()).sum()) > 0:
            raise self.diverged(f"the training loss or the weights became NaN/Inf between steps "
                                f"{self.checked_step + 1} and {st.step}; stopped without saving "
                                f"({self._on_disk()}); lower the learning rate or use --precision fp32")
        self.checked_step = st.step

    def diverged(self, reason: str, step: int | None = None) -> TrainingDiverged:
        """The error to raise, once the log says the run diverged at this step: without that line a diverged
        run reads as one that was stopped, and a report would leave it out of a mean without saying why. A
        resume from the last good checkpoint drops the line with the others logged after that checkpoint."""
        if self.d.is_main:
            elapsed = time.time() - self._t_start if self._log is not None else self.state.elapsed
            MetricsLog(self.out).write({"kind": "diverged", "step": step or self.state.step, "elapsed_s": elapsed,
                                        "reason": reason})
        return TrainingDiverged(reason)

    def _on_disk(self) -> str:
        return (f"{self.out / ckpt.LAST} is still the checkpoint of step {self.saved_step}, untouched"
                if self.saved_step is not None else "no checkpoint was written")

    def nonfinite(self) -> torch.Tensor:
        """(steps with a non-finite loss since the last log line, non-finite weight tensors): a device tensor."""
        weights = [t for t in list(self.model.parameters()) + list(self.model.buffers()) if t.is_floating_point()]
        return torch.stack([self.step_fn.acc[3], (~torch.isfinite(torch.stack([t.detach().float().sum()
                                                                             for t in weights]))).sum().double()])

    def log_train(self, lr: float, last: bool) -> None:
        st, r, acc = self.state, self.cfg.recipe, self.step_fn.acc
        self.check_finite()
        dist.all_reduce_sum(acc)
        loss_sum, wrong, seen, _ = acc.tolist()
        dt = time.time() - self._t_log
        rec = {"kind": "train", "step": st.step, "epoch": st.step / max(1, len(self.data.train)), "lr": lr,
               "loss": loss_sum / max(1, seen), "train_err": wrong / max(1, seen),
               "images_per_s": self._imgs / max(dt, 1e-9), "elapsed_s": time.time() - self._t_start,
               "warmup_rule": st.schedule.in_warmup_rule}
        if self._log:
            self._log.write(rec)
        n = r.log_every if not last else st.step % r.log_every or r.log_every
        self._bar.update(st.step, n, f"loss {rec['loss']:.3f} err {rec['train_err']:.3f} lr {lr:.3g} "
                                     f"{rec['images_per_s']:.0f} img/s")
        acc.zero_()
        self._t_log, self._imgs = time.time(), 0

    def evaluation(self, step: int) -> dict:
        """The metrics of the evaluation at `step` (the weights as they are), computed once: a fused set
        evaluates every member before any saves. A non-finite loss stops the run here, before anything is
        logged or saved."""
        if self._evaluated is not None and self._evaluated[0] == step:
            if isinstance(self._evaluated[1], Exception):  # failed when a fused set evaluated ahead
                raise self._evaluated[1]
            return self._evaluated[1]
        st, cfg = self.state, self.cfg
        self.check_finite()  # before spending an evaluation on a diverged model
        try:
            if cfg.runtime.precise_bn:
                # a fork: a separate, seeded pass that leaves the training loader's position untouched
                precise_bn(self.model, self.data.train.fork(cfg.seed + 7919), cfg.runtime.precise_bn)
            m = evaluate(self.model, self.data.eval, self.ctx)
        except Exception as e:
            self._evaluated = (step, e)
            raise
        if not math.isfinite(m["loss"]):  # finite weights whose outputs overflow: as diverged as a NaN loss
            raise self.diverged(f"the evaluation at step {step} gave a non-finite loss (the model's outputs "
                                f"overflow); stopped without saving ({self._on_disk()}); lower the learning "
                                "rate or use --precision fp32")
        if st.ema is not None:
            e = evaluate(st.ema.module, self.data.eval, self.ctx)
            m = {**m, **{f"ema_{k}": v for k, v in e.items() if k != "n"}}
        self._evaluated = (step, m)
        return m

    def evaluate_and_save(self) -> dict:
        st, cfg = self.state, self.cfg
        try:
            m = self.evaluation(st.step)
        except TrainingDiverged:
            raise
        except Exception as e:
            raise self._saved_before(e) from e
        rec = {"kind": "eval", "step": st.step, "epoch": st.step / max(1, len(self.data.train)),
               "split": self.data.eval_split, **m, "elapsed_s": time.time() - self._t_start}
        after_eval(cfg.recipe, st.schedule, m["top1_err"])
        improved = m["top1_err"] < st.best_err
        st.best_err = min(st.best_err, m["top1_err"])
        st.metrics, st.eval_pending = rec, False
        self.save(best=improved)
        if self._log:  # after the save: a log never shows an evaluation whose checkpoint a kill lost
            self._log.write(rec)
        self._t_log, self._imgs = time.time(), 0  # throughput counts training only, not this evaluation
        return rec

    def _saved_before(self, e: Exception) -> EvaluationFailed:
        """The error for an evaluation that raised, once the step it came after is saved: the training up to
        it is not lost for a bad validation file. Under torchrun a failure on one rank would leave the
        others waiting in the save's collectives, so nothing is saved there."""
        st = self.state
        why = described(e)
        if self.d.enabled:
            return EvaluationFailed(f"the evaluation at step {st.step} failed: {why}; {self._on_disk()}")
        st.eval_pending = True
        self.save(best=False)
        return EvaluationFailed(f"the evaluation at step {st.step} failed: {why}; {self.out / ckpt.LAST} now holds "
                                f"step {st.step}, saved before that evaluation: fix the cause, then --resume "
                                "evaluates that step first and trains on")

    def _saved_before_batch(self, e: Exception) -> TrainingDataFailed:
        """The error for a training batch that could not be read (a corrupt image under --on-corrupt stop),
        once the step reached is saved: the loader's position still points at that batch, so the resume reads
        it again, and the steps since the last checkpoint are not lost. Not under torchrun (the other ranks
        would wait in the save's collectives), and not at step 0 (nothing to keep)."""
        st = self.state
        why = described(e)
        if self.d.enabled or st.step == 0 or self.saved_step == st.step:
            return TrainingDataFailed(f"{why}; {self._on_disk()}")
        self.save(best=False)
        return TrainingDataFailed(f"{why}; {self.out / ckpt.LAST} now holds step {st.step}, saved before that batch: "
                                  f"{bad_batch_advice(e)}, then --resume")

    def save(self, best: bool) -> None:
        """best.pt before last.pt: killed in between, the run resumes from the older last.pt and writes the
        same best.pt again, so the two never disagree about the run."""
        self.check_finite()
        st = self.state
        st.elapsed = time.time() - self._t_start
        state = st.state_dict()  # on every rank: it sums the counters over them
        if self.d.is_main:
            if best:
                ckpt.save_atomic(state, self.out / ckpt.BEST)
            ckpt.save_atomic(state, self.out / ckpt.LAST)
        self.saved_step = st.step
        dist.barrier()


def train(cfg: RunConfig, *, resume: bool = False, explicit: set | None = None, extend_to: int | None = None,
          stop_at: int | None = None) -> dict:
    """Run (or resume) one training run; returns the final evaluation metrics."""
    try:
        return Trainer(cfg, resume=resume, explicit=explicit, extend_to=extend_to).fit(stop_at)
    finally:
        dist.shutdown()
