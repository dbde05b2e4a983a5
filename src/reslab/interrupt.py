"""Stopping cleanly on SIGTERM, what job schedulers and `timeout` send before they kill, and on Ctrl-C
(SIGINT): the run finishes the step it is in, saves its exact position (as --stop-at does) and ends with an
error that says how to continue. Without this, everything since the last evaluation's checkpoint was lost.

Only in a single process's main thread: under torchrun every rank would have to agree on the step to stop at
(a collective per step), so there the signals keep their default effect and a run resumes from its last
checkpoint. A second signal of either kind acts at once.
"""
from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import signal
import sys
import threading

from .errors import ReslabError

_requested = 0  # the signal asked to stop (0: none)
_ctrl_c = False  # whether Ctrl-C saves too: only where reslab is the program (`reslab ...`, `python -m reslab`)


@contextlib.contextmanager
def ctrl_c_saves():
    """Within it, `stop_on_sigterm` treats Ctrl-C (SIGINT) as it treats SIGTERM. The command line enters it;
    a notebook or a test calling reslab keeps its own Ctrl-C (a KeyboardInterrupt)."""
    global _ctrl_c
    before, _ctrl_c = _ctrl_c, True
    try:
        yield
    finally:
        _ctrl_c = before


def _name(signum: int) -> str:
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name


class Interrupted(ReslabError):
    """A run stopped on a signal after saving; the message names what holds it and what continues it.
    `signum` is the signal (the exit status is 128 + it)."""

    def __init__(self, saved: str, again: str, signum: int | None = None):
        self.saved, self.signum = saved, signum or _requested or signal.SIGTERM
        super().__init__(f"stopped on {_name(self.signum)} and saved ({saved}): {again} continues")

    def continued_by(self, again: str) -> "Interrupted":
        """The same stop, with the command that continues it as the caller knows it (`reslab reproduce`)."""
        return Interrupted(self.saved, again, self.signum)


def requested() -> bool:
    """Whether a SIGTERM or SIGINT arrived since the outermost `stop_on_sigterm` was entered (an inner one
    that exits leaves it set: `reslab reproduce` wraps its groups of runs in one and checks between them)."""
    return bool(_requested)


_depth = 0


@contextlib.contextmanager
def stop_on_sigterm(enabled: bool = True):
    """Within it a SIGTERM or a Ctrl-C is only noted (see `requested`). Nested uses share the outermost one's
    handlers, so a signal that arrives between two inner ones is not forgotten when the next begins."""
    global _requested, _depth
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        global _requested
        _requested = signum
        for s, h in previous.items():  # a second one is not asked to wait
            signal.signal(s, h)
        if signum == signal.SIGINT:  # at a terminal: say that it was heard, and how to stop at once
            try:
                os.write(2, b"\nreslab: Ctrl-C: saving at the end of this step; Ctrl-C again stops at once, "
                            b"losing what the last checkpoint does not hold\n")
            except OSError:  # stderr's reader is gone (`| tee`, which the same Ctrl-C ended): save all the same
                pass

    if _depth == 0:
        # Ctrl-C where the command line asked for it, and not where the process was started to ignore it (a
        # background job of a shell)
        sigs = [signal.SIGTERM] + ([signal.SIGINT] if _ctrl_c and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
                                   else [])
        previous = {s: signal.signal(s, handler) for s in sigs}
        _requested = 0
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:  # a later run in this process (a notebook, a torchrun rank) starts unasked to stop
            for s, h in previous.items():
                signal.signal(s, h)
            _requested = 0


def worker_options(workers: int) -> dict:
    """DataLoader arguments for workers that leave a SIGTERM to the run (shield_worker). On Linux they are
    forked, as DataLoader's default was before Python 3.14: a forked worker starts with one thread, so it can
    block the signal in every thread it will have; a spawned one already runs a BLAS pool."""
    if workers <= 0 or sys.platform != "linux":
        return {}
    # a start method the user chose explicitly is theirs; otherwise fork (3.14's default is forkserver)
    chosen = multiprocessing.get_start_method(allow_none=True)
    return {"worker_init_fn": functools.partial(shield_worker, parent=os.getpid()),
            "multiprocessing_context": chosen or "fork"}


def shield_worker(_worker_id: int, parent: int) -> None:
    """A DataLoader worker's init: a SIGTERM is the main process's to act on. `timeout`, Slurm and `kill -- -PGID`
    send it to every process of the job, and a worker it ended took the run down ("DataLoader worker is killed
    by signal") before the main process could save. So the worker waits for SIGTERM in a thread of its own and
    ends only on the one `parent` (the process that iterates the loader) sends when it shuts its workers down;
    the others are the parent's to act on. (Ignoring SIGTERM outright would hang the parent's exit, which
    terminates persistent workers.) Where that cannot be arranged (off Linux; a worker already running other
    threads, which would take the signal: a spawned one, with numpy's BLAS pool) the worker keeps the default."""
    if sys.platform != "linux" or len(os.listdir("/proc/self/task")) > 1:
        return
    # threads started later inherit the mask; Ctrl-C at a terminal signals the whole foreground group, the
    # workers too, and is the run's to act on as well (a worker it ended would take the run down)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})

    def wait():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)  # a shutdown it was asked for: the parent's SIGCHLD check reports any other exit as a crash

    threading.Thread(target=wait, name="sigterm", daemon=True).start()


def stopped(outs: list, steps: list[int], failed: dict | None = None) -> Interrupted:
    """The stop of runs `outs` at `steps`; `failed`: {run: its error} for runs of the set that stopped
    earlier, each named by how (diverged: its last good checkpoint kept; data that could not be read: saved
    where it stopped), so the set's summary is not lost."""
    from .engine import TrainingDiverged
    failed = failed or {}
    diverged = [str(o) for o, e in failed.items() if isinstance(e, TrainingDiverged)]
    other = [str(o) for o, e in failed.items() if not isinstance(e, TrainingDiverged)]
    where = "; ".join(filter(None, [", ".join(f"{o} at step {s}" for o, s in zip(outs, steps)),
                                    f"diverged, last good checkpoint kept: {', '.join(diverged)}" if diverged else "",
                                    f"stopped on data it could not read, saved where it stopped: {', '.join(other)}"
                                    if other else ""]))
    again = f"`reslab train --out {outs[0]} --resume`" if len(outs) == 1 else "the same command with --resume"
    return Interrupted(where, again)
