"""The training engine: recipes, schedule, resume, distributed equivalence, failure handling, CLI."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from reslab import checkpoint as ckpt
from reslab.cli import main
from reslab.data import Normalizer, ResidentLoader, cifar
from reslab.config import RunConfig
from reslab.engine import TrainingDiverged, train
from reslab.step import make_optimizer
from reslab.errors import ReslabError
from reslab.logs import read_metrics
from reslab.recipes import RECIPES, Recipe, ScheduleState, WarmupRule, after_eval, get_recipe, lr_at
from reslab.zoo import create_model

from conftest import kill_on_eval_line, make_cifar_archive

SMALL = dict(batch_size=32, iters=40, eval_every=20, log_every=10)


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    make_cifar_archive(d / "cifar-10-python.tar.gz", n_train=320, n_test=101)
    return d


def settings(data_dir, out, recipe=None, arch="resnet8", **kw):
    r = recipe or get_recipe("cifar-paper").with_overrides(**SMALL)
    return RunConfig.build(out, arch, r, data_dir=data_dir, progress=False, **kw)


def test_cifar_paper_schedule_hits_its_milestones():
    r, st = RECIPES["cifar-paper"], ScheduleState()
    assert (r.batch_size, r.momentum, r.weight_decay, r.iters) == (128, 0.9, 1e-4, 64_000)
    got = [lr_at(s, r, st) for s in (0, 31_999, 32_000, 47_999, 48_000, 63_999)]
    assert got == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    q = r.scaled(0.1)
    assert (q.iters, q.milestones) == (6400, (3200, 4800))
    st.in_warmup_rule = True
    assert lr_at(0, r, st) == 0.01 and lr_at(40_000, r, st) == 0.01
    o = r.with_overrides(iters=1000)
    assert o.milestones == (500, 750)


def test_plateau_cosine_and_linear_warmup():
    r = RECIPES["imagenet-paper"]
    st = ScheduleState()
    assert (r.batch_size, r.iters, r.lr) == (256, 600_000, 0.1)
    for err in (0.5, 0.4, 0.41, 0.42, 0.40):
        after_eval(r, st, err)
    assert st.drops == 1 and lr_at(10, r, st) == pytest.approx(0.01)
    c = Recipe("c", "cifar", 128, 0.1, iters=100, schedule="cosine", warmup_iters=10)
    assert lr_at(0, c, ScheduleState()) == pytest.approx(0.01)
    assert lr_at(10, c, ScheduleState()) == pytest.approx(0.1)
    assert lr_at(99, c, ScheduleState()) < 0.001


def test_warmup_rule_holds_lr_until_training_error_drops(data_dir, tmp_path):
    base = get_recipe("cifar-paper").with_overrides(**SMALL)
    never = base.with_overrides(warmup_rule=WarmupRule(lr=0.01, until_train_err=0.0, min_depth=8, check_every=10))
    train(settings(data_dir, tmp_path / "never", never))
    lrs = [m["lr"] for m in read_metrics(tmp_path / "never") if m["kind"] == "train"]
    assert lrs and all(lr == 0.01 for lr in lrs)
    soon = base.with_overrides(warmup_rule=WarmupRule(lr=0.01, until_train_err=1.01, min_depth=8, check_every=10))
    train(settings(data_dir, tmp_path / "soon", soon))
    rows = [m for m in read_metrics(tmp_path / "soon") if m["kind"] == "train"]
    assert rows[0]["warmup_rule"] is False and rows[1]["lr"] == 0.1
    shallow = base.with_overrides(warmup_rule=WarmupRule(min_depth=110))
    train(settings(data_dir, tmp_path / "shallow", shallow))  # resnet8 is below the rule's depth
    assert read_metrics(tmp_path / "shallow")[0]["lr"] == 0.1


def test_a_run_stopped_between_log_lines_and_warmup_checks_resumes_to_the_same_lines(data_dir, tmp_path):
    """The log line's running sums and the warm-up rule's window are part of the checkpoint: stopped by
    SIGTERM at step 7 (log every 4, checks every 5), the resumed run's line at step 8 still covers steps 5-8
    and its check at step 10 steps 6-10, so its log and its weights are the uninterrupted run's."""
    import signal
    from reslab.engine import Trainer
    from reslab.interrupt import Interrupted
    r = get_recipe("cifar-paper").with_overrides(**{**SMALL, "log_every": 4}, warmup_rule=WarmupRule(
        lr=0.01, until_train_err=0.5, min_depth=8, check_every=5))
    train(settings(data_dir, tmp_path / "ref", r))
    out = tmp_path / "cut"
    after = Trainer.after_step

    def term_at_7(self, *a):
        after(self, *a)
        if self.state.step == 7:
            signal.raise_signal(signal.SIGTERM)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "after_step", term_at_7)
        with pytest.raises(Interrupted, match="at step 7"):
            train(settings(data_dir, out, r))
    counters = ckpt.load(out)["train"]["counters"]
    assert counters["log"][2] == 3 * 32 and counters["warmup_rule"][1] == 2 * 32
    train(settings(data_dir, out, r), resume=True)
    keep = ("kind", "step", "lr", "loss", "train_err", "warmup_rule", "top1_err")
    lines = [[{k: m[k] for k in keep if k in m} for m in read_metrics(o)] for o in (tmp_path / "ref", out)]
    assert lines[0] == lines[1]
    a, b = ckpt.load(tmp_path / "ref")["model"], ckpt.load(out)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_around_the_first_save_leaves_a_run_that_continues(data_dir, tmp_path, monkeypatch):
    """A run saves before it logs its evaluation. Killed inside its first save, it leaves no eval line (so
    `reslab reproduce` sees a run to start, not one evaluated whose checkpoint is lost); killed between the
    save and the log write, its resume writes the checkpoint's own record of that evaluation back."""
    from reslab import logs
    from reslab.reproduce import run_status
    out = tmp_path / "r"
    real_save = ckpt.save_atomic
    monkeypatch.setattr(ckpt, "save_atomic", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        train(settings(data_dir, out))
    assert not (out / "last.pt").exists() and read_metrics(out)
    assert all(m["kind"] == "train" for m in read_metrics(out)) and run_status(out) == "new"
    monkeypatch.setattr(ckpt, "save_atomic", real_save)
    real_write = logs.MetricsLog.write
    kill_on_eval_line(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(settings(data_dir, out), resume=True)
    assert ckpt.read_status(out)["step"] == 20 and not [m for m in read_metrics(out) if m["kind"] == "eval"]
    monkeypatch.setattr(logs.MetricsLog, "write", real_write)
    train(settings(data_dir, out), resume=True)
    train(settings(data_dir, tmp_path / "ref"))
    keep = ("kind", "step", "loss", "train_err", "top1_err")
    got, want = ([{k: m[k] for k in keep if k in m} for m in read_metrics(o)] for o in (out, tmp_path / "ref"))
    assert got == want and [m["step"] for m in got if m["kind"] == "eval"] == [20, 40]


def test_ctrl_c_saves_only_where_the_command_line_asked_and_was_not_ignored():
    """Ctrl-C is the run's to act on under `reslab ...` (ctrl_c_saves); a Python caller (a notebook, pytest)
    keeps its KeyboardInterrupt, and a process started to ignore Ctrl-C (a shell's background job) keeps
    ignoring it."""
    from reslab import interrupt
    default = signal.getsignal(signal.SIGINT)
    with interrupt.stop_on_sigterm():
        assert signal.getsignal(signal.SIGINT) is default
    with interrupt.ctrl_c_saves(), interrupt.stop_on_sigterm():
        assert signal.getsignal(signal.SIGINT) is not default
        signal.raise_signal(signal.SIGINT)
        assert interrupt.requested() and interrupt.Interrupted("x", "y").signum == signal.SIGINT
        assert signal.getsignal(signal.SIGINT) is default  # a second Ctrl-C acts at once
    assert not interrupt.requested() and signal.getsignal(signal.SIGINT) is default
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupt.ctrl_c_saves(), interrupt.stop_on_sigterm():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, default)


def test_a_sigterm_at_the_last_step_lets_the_run_finish(data_dir, tmp_path, monkeypatch):
    """Nothing is left to continue: the run ends as finished (exit 0), not with a message naming --resume."""
    import signal
    from reslab.engine import Trainer
    from reslab.interrupt import stopped
    after = Trainer.after_step

    def term_at_end(self, *a):
        after(self, *a)
        if self.state.step == SMALL["iters"]:
            signal.raise_signal(signal.SIGTERM)
    monkeypatch.setattr(Trainer, "after_step", term_at_end)
    m = train(settings(data_dir, tmp_path / "r"))
    assert m["step"] == SMALL["iters"] and ckpt.read_status(tmp_path / "r")["finished"]
    # a set also names the runs that had stopped before, each by how
    from reslab.engine import TrainingDataFailed
    failed = {"runs/b": TrainingDiverged("nan"), "runs/c": TrainingDataFailed("x.jpg: cannot decode")}
    msg = str(stopped(["runs/a"], [7], failed=failed))
    assert ("runs/a at step 7; diverged, last good checkpoint kept: runs/b; stopped on data it could not read, "
            "saved where it stopped: runs/c") in msg
    assert "(diverged, last good checkpoint kept: runs/b)" in str(stopped([], [], failed={"runs/b": failed["runs/b"]}))


def test_tiny_model_overfits_a_tiny_batch(tmp_path):
    d = tmp_path / "tiny"
    make_cifar_archive(d / "cifar-10-python.tar.gz", n_train=40, n_test=20, per_batch=8)
    r = get_recipe("cifar-paper").with_overrides(batch_size=40, iters=60, eval_every=60, log_every=20,
                                                 weight_decay=0.0, milestones=())
    final = train(RunConfig.build(tmp_path / "run", "resnet8", r, data_dir=d, progress=False))
    last = [m for m in read_metrics(tmp_path / "run") if m["kind"] == "train"][-1]
    assert last["train_err"] == 0.0 and last["loss"] < 0.05
    assert final["n"] == 20


def test_resume_is_bitwise_equal_to_uninterrupted(data_dir, tmp_path):
    train(settings(data_dir, tmp_path / "a"))
    train(settings(data_dir, tmp_path / "b"), stop_at=15)  # stops mid-epoch, between evaluations
    assert ckpt.load(tmp_path / "b")["step"] == 15
    with pytest.raises(ReslabError, match="--resume"):
        train(settings(data_dir, tmp_path / "b"))
    train(settings(data_dir, tmp_path / "b"), resume=True)
    a, b = ckpt.load(tmp_path / "a"), ckpt.load(tmp_path / "b")
    assert a["step"] == b["step"] == 40
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in ("top1_err", "loss"):
        assert a["metrics"][k] == b["metrics"][k]
    steps = [(m["kind"], m["step"]) for m in read_metrics(tmp_path / "b")]
    assert len(steps) == len(set(steps))  # lines after the checkpoint were not duplicated


def test_checkpoint_contents_load_with_weights_only(data_dir, tmp_path):
    train(settings(data_dir, tmp_path / "r"))
    ck = torch.load(tmp_path / "r" / "best.pt", weights_only=True)
    assert {"format", "config", "model", "model_config", "normalizer", "classes", "data", "step", "finished",
            "best_err", "metrics", "eval_pending", "world_size", "world_sizes", "train"} == set(ck)
    assert ck["world_sizes"] == [1]
    assert {"optimizer", "scaler", "ema", "ema_n", "schedule", "loader", "elapsed", "counters"} == set(ck["train"])
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    assert ck["config"]["recipe"]["name"] == "cifar-paper" and ck["model_config"]["name"] == "resnet8"
    assert ck["config"]["runtime"]["precision"] == "fp32"  # resolved, so a resume elsewhere keeps it
    assert ck["finished"] and ck["data"]["identity"]["description"].startswith("an unrecognised copy")
    status = ckpt.read_status(tmp_path / "r")
    assert (status["step"], status["iters"], status["finished"]) == (40, 40, True)
    assert status["config"] == ck["config"]
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    env = json.loads((tmp_path / "r" / "env.json").read_text())
    assert cfg["recipe"]["iters"] == 40 and "torch" in env and "git" in env
    assert RunConfig.from_dict(cfg) == RunConfig.from_dict(ck["config"])
    assert cfg["command"].startswith("reslab train --arch resnet8")


def test_nan_stops_cleanly_and_keeps_the_last_checkpoint(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "r"
    train(settings(data_dir, out), stop_at=20)
    before = (out / "last.pt").read_bytes()
    import reslab.step as step
    real = step.F.cross_entropy
    monkeypatch.setattr(step.F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(TrainingDiverged, match="step 20, untouched"):
        train(settings(data_dir, out), resume=True)
    assert (out / "last.pt").read_bytes() == before


def test_an_evaluation_with_overflowing_outputs_is_not_saved(data_dir, tmp_path, monkeypatch):
    """Weights can stay finite while a diverging net's outputs overflow: a NaN evaluation loss stops the run
    like a NaN training loss, and last.pt and best.pt keep the last good step."""
    out = tmp_path / "r"
    train(settings(data_dir, out), stop_at=20)
    before = {f: (out / f).read_bytes() for f in ("last.pt", "best.pt")}
    import reslab.engine as engine
    real = engine.evaluate
    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: {**real(*a, **k), "loss": float("nan")})
    with pytest.raises(TrainingDiverged, match="evaluation at step .* non-finite loss.*step 20, untouched"):
        train(settings(data_dir, out), resume=True)
    assert {f: (out / f).read_bytes() for f in before} == before


def test_bad_checkpoints_give_clear_errors(data_dir, tmp_path):
    out = tmp_path / "r"
    train(settings(data_dir, out), stop_at=20)
    other = create_model("resnet14")
    with pytest.raises(ReslabError, match="another architecture"):
        ckpt.load_model_state(other, ckpt.load(out)["model"], "x")
    with pytest.raises(ReslabError, match="model.arch is 'resnet8'.*'resnet14'"):
        train(settings(data_dir, out, arch="resnet14"), resume=True)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ReslabError, match="not a readable"):
        ckpt.load(bad)
    with pytest.raises(FileNotFoundError):
        ckpt.load(tmp_path / "nothing")


def test_atomic_save_leaves_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "last.pt"
    ckpt.save_atomic({"a": torch.ones(2)}, p)
    old = p.read_bytes()
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        ckpt.save_atomic({"a": torch.zeros(2)}, p)
    assert p.read_bytes() == old and [f.name for f in tmp_path.iterdir()] == ["last.pt"]


def test_atomic_save_gives_the_mode_a_plain_write_would(tmp_path):
    # tempfile makes its files private (0600): a checkpoint must be as readable as the run's other files
    old = os.umask(0o022)
    try:
        ckpt.save_atomic({"a": torch.ones(2)}, tmp_path / "last.pt")
        (tmp_path / "plain").write_text("x")
        cifar_tmp = tmp_path / "c"
        make_cifar_archive(cifar_tmp / "cifar-10-python.tar.gz")
        from reslab.data import cifar
        folder = cifar.locate("cifar10", cifar_tmp).folder
    finally:
        os.umask(old)
    mode = lambda p: p.stat().st_mode & 0o777
    assert mode(tmp_path / "last.pt") == mode(tmp_path / "plain") == 0o644
    assert mode(folder.parent) == 0o755


def _torchrun(nproc, *args, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "reslab", *args]
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=e)


def _why(stderr: str) -> str:
    """A failed torchrun's cause: its summary pushes a rank's own last words ("terminate called after ...",
    a Python error) out of the tail, so they are picked out first."""
    cause = [ln for ln in stderr.splitlines() if any(k in ln for k in ("terminate called", "what()", "Error:"))]
    return "\n".join(cause[:20]) + "\n...\n" + stderr[-1500:]


def _half_batch_reference(data_dir, recipe, seed=0):
    """One process, the same global batches, BN statistics per half batch as on two ranks (SyncBN is
    GPU-only), running statistics kept from the first half (DDP broadcasts rank 0's buffers)."""
    torch.manual_seed(seed)
    model = create_model("resnet8", num_classes=10)
    opt = make_optimizer(model, recipe)
    tr = cifar.load("cifar10", "train", data_dir)
    loader = ResidentLoader(tr.images, tr.labels, recipe.batch_size, Normalizer.fit(tr.images), train=True, seed=seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    step, st = 0, ScheduleState()
    while step < recipe.iters:
        for x, y in loader:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, recipe, st)
            opt.zero_grad()
            half = len(y) // 2
            loss0 = torch.nn.functional.cross_entropy(model(x[:half]), y[:half])
            kept = [(b.running_mean.clone(), b.running_var.clone(), b.num_batches_tracked.clone()) for b in bns]
            loss1 = torch.nn.functional.cross_entropy(model(x[half:]), y[half:])
            ((loss0 + loss1) / 2).backward()
            with torch.no_grad():  # after backward: autograd saved the buffers it read
                for b, (m, v, n) in zip(bns, kept):
                    b.running_mean.copy_(m), b.running_var.copy_(v), b.num_batches_tracked.copy_(n)
            opt.step()
            step += 1
            if step >= recipe.iters:
                break
    return model.state_dict()


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_at_the_same_global_batch(data_dir, tmp_path, capsys):
    out = tmp_path / "ddp"
    r = _torchrun(2, "train", "--arch", "resnet8", "--data-dir", str(data_dir), "--batch-size", "32",
                  "--iters", "12", "--eval-every", "12", "--log-every", "4", "--out", str(out), "--no-compile",
                  "--no-channels-last")  # the reference below is contiguous; formats differ in rounding
    assert r.returncode == 0, _why(r.stderr)
    assert r.stderr.count("2 ranks (gloo), global batch 32 = 16 per rank") == 1
    recipe = get_recipe("cifar-paper").with_overrides(batch_size=32, iters=12, eval_every=12, log_every=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (OMP_NUM_THREADS=1): a convolution's sums follow the thread count
    try:
        ref = _half_batch_reference(data_dir, recipe)
    finally:
        torch.set_num_threads(threads)
    got = ckpt.load(out)["model"]
    for k in ref:  # bitwise: (g0 + g1) / 2 rounds alike whether DDP or one process sums the halves' gradients
        assert torch.equal(got[k], ref[k]), k
    ev = [m for m in read_metrics(out) if m["kind"] == "eval"][-1]
    assert ev["n"] == 101  # 101 test images over 2 ranks: 50 + 51, none dropped or repeated
    assert ckpt.load(out)["world_size"] == 2  # what eval --precise-bn divides the batch by
    single = subprocess.run([sys.executable, "-m", "reslab", "eval", str(out), "--json"], capture_output=True,
                            text=True, timeout=300)
    one = json.loads(single.stdout)
    assert one["n"] == 101 and one["top1_err"] == pytest.approx(ev["top1_err"])
    both = _torchrun(2, "eval", str(out), "--json")  # one JSON document, not one per rank
    assert both.returncode == 0 and json.loads(both.stdout)["top1_err"] == one["top1_err"], _why(both.stderr)
    # resumed in one process: BN now sees 32 images, not 16 per rank. Said once, and recorded, so the report
    # does not average it with runs trained one way (it did: config.json kept only the last session's ranks)
    import shutil
    from reslab.cli import main
    shutil.copytree(out, tmp_path / "one")
    assert main(["train", "--out", str(tmp_path / "one"), "--resume", "--extend-to", "16", "--no-progress"]) == 0
    assert "trained on 2 rank(s) so far and goes on with 1" in capsys.readouterr().err
    assert json.loads((tmp_path / "one" / "config.json").read_text())["world_sizes"] == [2, 1]
    from reslab.tables import _setting
    from reslab.runrecord import summarize
    assert "ranks 2 then 1" in _setting(summarize(tmp_path / "one"))


@pytest.mark.slow
def test_two_ranks_fit_the_per_pixel_mean_of_one_process(tmp_path):
    """Under torchrun each rank decodes half of the images the per-pixel mean is fitted from (10,000 full-size
    JPEGs each, before) and the ranks add their sums: integer sums, so the mean is bitwise one process's."""
    from conftest import make_jpeg_folder
    from reslab.data import folder as fold
    from reslab.data.augment import Augment
    root = make_jpeg_folder(tmp_path / "imgs", per_class=5)
    out = tmp_path / "ddp"
    r = _torchrun(2, "train", "--arch", "resnet18", "--width", "0.125", "--data", "folder", "--data-dir", str(root),
                  "--crop-size", "32", "--batch-size", "4", "--iters", "1", "--workers", "0", "--normalization",
                  "pixel", "--out", str(out), "--no-progress", "--no-compile")
    assert r.returncode == 0, _why(r.stderr)
    ds = fold.ImageFolderSplit(root, "train", augment=Augment.for_size("scale", 32))
    want = fold.fit_normalizer(ds, "pixel", size=32)
    assert torch.equal(ckpt.load(out)["normalizer"]["mean"], want.mean)
    # each rank decoded its half: two processes in a gloo group, counting the images they decode
    import torch.multiprocessing as mp
    mp.spawn(_fit_on_rank, args=(str(root), str(tmp_path)), nprocs=2)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [g["decoded"] for g in got] == [5, 5] and all(torch.equal(g["mean"], want.mean) for g in got)


def _fit_on_rank(rank: int, root: str, out: str) -> None:
    import torch.distributed as tdist
    from reslab.data import folder as fold
    tdist.init_process_group("gloo", init_method=f"file://{out}/pg", rank=rank, world_size=2)
    n, real = [0], fold.decode

    def counted(path):
        n[0] += 1
        return real(path)
    fold.decode = counted
    try:
        norm = fold.fit_normalizer(fold.ImageFolderSplit(root, "train"), "pixel", size=32, rank=rank, world_size=2)
    finally:
        tdist.destroy_process_group()
    torch.save({"decoded": n[0], "mean": norm.mean}, f"{out}/rank{rank}.pt")


def test_cli_train_and_eval_end_to_end(data_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train", "--arch", "resnet8", "--data-dir", str(data_dir), "--iters", "20", "--batch-size",
                 "32", "--eval-every", "10", "--out", str(out), "--budget", "1.0", "--ema", "0.9"]) == 0
    assert "top-1 error" in capsys.readouterr().out
    assert main(["eval", str(out), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert {"top1_err", "top5_err", "loss", "n"} <= set(m) and m["n"] == 101
    ev = [x for x in read_metrics(out) if x["kind"] == "eval"]
    assert "ema_top1_err" in ev[-1]
    assert main(["eval", str(out), "--views", "10crop"]) == 2  # CIFAR has one test view
    assert "10crop" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert main(["eval", str(tmp_path / "junk.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable" in err[0]


def test_eval_precise_bn_uses_the_batch_each_rank_normalised(data_dir, tmp_path, monkeypatch):
    """A run's BN layers saw batch / world_size images per step (the whole batch under sync BN): eval
    --precise-bn averages batches of that size. The world size comes from the checkpoint, or for checkpoints
    before it was saved there, from the run's config.json."""
    import reslab.predict as predict
    out = tmp_path / "r"
    assert main(["train", "--arch", "resnet8", "--data-dir", str(data_dir), "--iters", "2", "--batch-size", "32",
                 "--out", str(out), "--no-progress"]) == 0
    seen = []
    monkeypatch.setattr(predict, "precise_bn", lambda model, batches, n: seen.append(len(next(iter(batches))[1])))

    def batch_with(world_size=None, sync_bn=False, config_ws=None):
        ck = ckpt.load(out / "last.pt")
        ck.pop("world_size")
        if world_size:
            ck["world_size"] = world_size
        ck["config"]["runtime"]["sync_bn"] = sync_bn
        d = tmp_path / f"c{len(seen)}"
        d.mkdir()
        torch.save(ck, d / "last.pt")
        if config_ws:
            (d / "config.json").write_text(json.dumps({"world_size": config_ws}))
        predict.evaluate_checkpoint(d, precise_bn_batches=1, workers=0)
        return seen[-1]
    assert ckpt.load(out / "last.pt")["world_size"] == 1
    assert batch_with() == 32 and batch_with(world_size=2) == 16 and batch_with(config_ws=4) == 8
    assert batch_with(world_size=2, sync_bn=True) == 32


def test_precise_bn_is_a_true_average():
    from reslab.evaluate import precise_bn
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    batches = [(torch.randn(8, 3, 4, 4) * (i + 1), None) for i in range(3)]
    used = precise_bn(m, batches, 3)
    assert used == 3
    with torch.no_grad():
        means = torch.stack([m[0](x).mean((0, 2, 3)) for x, _ in batches]).mean(0)
    torch.testing.assert_close(m[1].running_mean, means, rtol=1e-4, atol=1e-5)
    assert m[1].momentum == 0.1
    # more batches than an epoch has: the next epoch's come too (here the same three again)
    assert precise_bn(m, batches, 5) == 5
    # a loader that yields nothing (its batch larger than the split, the last dropped) is an error, and the
    # statistics stay as they were: they had been reset to mean 0, var 1 and evaluated as such
    before = {k: v.clone() for k, v in m[1].state_dict().items()}
    with pytest.raises(ReslabError, match="gave none"):
        precise_bn(m, [], 2)
    assert all(torch.equal(v, before[k]) for k, v in m[1].state_dict().items())

    # nor does a loader that fails on the way (a corrupt image): a run saves before the failed evaluation,
    # and its checkpoint must not hold statistics reset and half averaged
    def failing():
        yield batches[0]
        raise ReslabError("x.jpg: cannot decode image")
    with pytest.raises(ReslabError, match="cannot decode"):
        precise_bn(m, failing(), 3)
    assert all(torch.equal(v, before[k]) for k, v in m[1].state_dict().items())
    assert m[1].momentum == 0.1 and m.training


def test_eval_loss_of_confidently_wrong_views_is_not_floored():
    """The evaluation loss is the cross-entropy of the (view-averaged) softmax, computed in log space: a
    confidently wrong image keeps its true loss. Through log(probability) it was floored at -log(1e-12),
    so a diverging run's val loss read 18.42 at every step while the true one was 110."""
    import torch.nn.functional as F
    from reslab.evaluate import evaluate
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10))
    with torch.no_grad():
        model[1].weight.mul_(400)
    x, y = torch.randn(6, 3, 2, 2), torch.arange(6)
    logits = model(x).double()
    want = F.cross_entropy(logits, y).item()
    assert want > 100  # far beyond the old floor of 27.6
    assert evaluate(model, [(x, y)])["loss"] == pytest.approx(want, rel=1e-5)
    crops = torch.randn(6, 4, 3, 2, 2)  # 4 views per image: the loss of their averaged probabilities
    logp = F.log_softmax(model(crops.flatten(0, 1)).double(), 1).view(6, 4, -1)
    want10 = -(torch.logsumexp(logp, 1) - torch.log(torch.tensor(4.0, dtype=torch.float64)))[torch.arange(6), y].mean()
    assert evaluate(model, [(crops, y)])["loss"] == pytest.approx(want10.item(), rel=1e-5)


def test_a_run_after_a_deterministic_one_is_not_deterministic():
    """The switches are process-wide: each run sets them its way, so a notebook's second run (or a test after
    a deterministic one) does not inherit deterministic algorithms and cuDNN autotuning off."""
    from reslab.engine import configure_backends
    configure_backends(True)
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    configure_backends(False)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark


def test_a_run_that_starts_afresh_drops_the_lines_of_an_attempt_killed_before_its_first_checkpoint(
        data_dir, tmp_path):
    """Killed before its first checkpoint, an attempt leaves log lines and no last.pt; the next attempt (or
    another run in that folder) starts at step 0, so every old line would be a duplicate or another run's."""
    out = tmp_path / "r"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 5, "train_err": 0.99, "stale": 1}) + "\n")
    train(settings(data_dir, out), resume=True)
    lines = read_metrics(out)
    assert lines and not any("stale" in m for m in lines)
    steps = [(m["kind"], m["step"]) for m in lines]
    assert len(steps) == len(set(steps))
