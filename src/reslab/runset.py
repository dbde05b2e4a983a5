"""Several runs trained together in one process: seeds, depths or variants of an experiment.

Each run is an ordinary Trainer with its own run folder, logs, checkpoints and resume, and it equals the run
trained alone (same seed: same initial weights, batch order and augmentation; bitwise on the CPU, tested).
The set advances its runs in turn, one step each. On a GPU each run issues its work on its own CUDA stream,
so one run's kernels can fill the gaps another leaves while the host prepares its next step.

A run that diverges stops alone, keeping its last good checkpoint, and so does one that cannot read its data
(a corrupt image: saved first, at the step it reached); the others go on, and the set reports every failure
at the end.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from . import dist, interrupt
from .config import RunConfig
from .engine import StoppedAfterSaving, Trainer, TrainingDiverged
from .errors import ReslabError


class RunSet:
    def __init__(self, configs: list[RunConfig], *, resume: bool = False, explicit: set | None = None):
        if not configs:
            raise ReslabError("a run set needs at least one run")
        check_folders(configs)
        d = dist.init(configs[0].runtime.device)
        if d.enabled:
            raise ReslabError("a run set trains its runs in one process; under torchrun, train one run at a time")
        self.trainers = [Trainer(c, resume=resume, explicit=explicit, dist_info=d) for c in configs]
        if len(configs) > 1:
            for t in self.trainers:
                t.label = Path(t.cfg.out).name  # progress lines say which run they are about
        cuda = d.device.type == "cuda"
        self.streams = [torch.cuda.Stream(d.device) if cuda and len(configs) > 1 else None for _ in configs]

    def fit(self, stop_at: int | None = None) -> list[dict]:
        """Train every run to its end (or `stop_at`); returns each run's last evaluation, in order."""
        if any(s is not None for s in self.streams):
            torch.cuda.synchronize()  # what the runs built on the default stream is ready for their own
        with interrupt.stop_on_sigterm():
            return self._fit(stop_at)

    def _fit(self, stop_at: int | None) -> list[dict]:
        failed: dict[str, Exception] = {}

        def attempt(i: int, method, *args):
            """Run i's `method(*args)`; a divergence or a failure to read data stops that run alone (it keeps
            its last good checkpoint, or saved the step it reached first) and is reported at the end."""
            t = self.trainers[i]
            try:
                with _on(self.streams[i]):
                    return method(*args)
            except (TrainingDiverged, StoppedAfterSaving) as e:
                failed[t.cfg.out] = e
                print(f"reslab: {t.cfg.out}: {e}", file=sys.stderr, flush=True)

        def ok(i: int) -> bool:
            return self.trainers[i].cfg.out not in failed

        try:
            # begin() evaluates first the step a failed evaluation left pending
            stops = [attempt(i, t.begin, stop_at) for i, t in enumerate(self.trainers)]
            active = [i for i, t in enumerate(self.trainers) if ok(i) and t.state.step < stops[i]]
            while active:
                if interrupt.requested():  # every run saves where it is, each at its own step
                    for i in list(active):
                        attempt(i, self.trainers[i].end, self.trainers[i].state.step)
                    active = [i for i in active if ok(i)]
                    raise interrupt.stopped([self.trainers[i].out for i in active],
                                            [self.trainers[i].state.step for i in active], failed=failed)
                for i in list(active):
                    t = self.trainers[i]
                    attempt(i, t.advance, stops[i])
                    if not ok(i):
                        active.remove(i)
                        continue
                    if t.state.step >= stops[i]:
                        with _on(self.streams[i]):
                            t.end(stops[i])
                        active.remove(i)
        finally:
            for t in self.trainers:
                t.close()
            if any(s is not None for s in self.streams):
                torch.cuda.synchronize()
        if failed:
            n = len(self.trainers)
            if all(isinstance(e, TrainingDiverged) for e in failed.values()):
                raise TrainingDiverged(f"{len(failed)} of {n} runs diverged and stopped ({', '.join(failed)}); "
                                       "the others finished")
            raise StoppedAfterSaving(f"{len(failed)} of {n} runs stopped ({', '.join(failed)}; each said why above, "
                                   f"first: {next(iter(failed.values()))}); the others finished")
        return [t.state.metrics for t in self.trainers]


def check_folders(configs: list[RunConfig]) -> None:
    outs = [c.out for c in configs]
    twice = sorted({o for o in outs if outs.count(o) > 1})
    if twice:
        raise ReslabError(f"two runs of the set write to the same folder: {twice}")


def _on(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def train_set(configs: list[RunConfig], *, resume: bool = False, explicit: set | None = None,
              stop_at: int | None = None) -> list[dict]:
    try:
        return RunSet(configs, resume=resume, explicit=explicit).fit(stop_at)
    finally:
        dist.shutdown()
