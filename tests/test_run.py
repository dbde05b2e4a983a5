"""A run as one object: its config, its flags, its checkpoint, and what may not happen to a good checkpoint."""
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import fields

import pytest
import torch

from reslab import checkpoint as ckpt
from reslab.cli import build_parser, main
from reslab.config import RunConfig
from reslab.engine import train
from reslab.flags import config_from_args, parse_train_args, to_cli_args
from reslab.logs import read_metrics
from reslab.recipes import Recipe, get_recipe
from reslab.resnet import ResNetConfig

from conftest import make_cifar_archive


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    make_cifar_archive(d / "cifar-10-python.tar.gz", n_train=320, n_test=101)
    return d


def _train(*args) -> int:
    return main(["train", "--arch", "resnet8", "--batch-size", "32", "--no-progress", *map(str, args)])


def test_every_config_field_is_a_flag_and_round_trips():
    p = build_parser()
    train = p._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train._actions}
    fixed_recipe = {"name", "dataset", "warmup_rule", "budget"}
    assert {f"recipe.{f.name}" for f in fields(Recipe)} - dests == {f"recipe.{n}" for n in fixed_recipe}
    for sec in ("data", "runtime"):
        cls = type(getattr(RunConfig("x"), sec))
        assert {f"{sec}.{f.name}" for f in fields(cls)} <= dests
    fixed_model = {"family", "block", "layers", "residual", "num_classes", "in_channels", "name"}
    assert {f"model.{f.name}" for f in fields(ResNetConfig) if f.name not in fixed_model} <= dests
    # a config with something in every section survives the trip through its command line
    cfg = RunConfig.build("runs/x y", "resnet32", get_recipe("cifar-paper").scaled(0.05).with_overrides(
        lr=0.05, nesterov=True, milestones=(100, 2000), label_smoothing=0.1), data_dir="d", seed=3,
        model={"shortcut": "B", "relu_after_add": False, "width": 1.5}, workers=2, precision="bf16",
        channels_last=False, precise_bn=4)
    assert parse_train_args(to_cli_args(cfg)) == cfg
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_cli_defaults_and_explicit_fields():
    a = build_parser().parse_args(["train", "--budget", "0.02", "--lr", "0.2", "--v1.5", "--no-relu-after-add"])
    cfg, explicit = config_from_args(a)
    assert cfg.out == "runs/resnet20-cifar10-s0" and cfg.recipe.iters == 1280 and cfg.recipe.lr == 0.2
    assert cfg.model.kwargs() == {"stride_in_1x1": False, "relu_after_add": False}
    assert ("recipe", "lr") in explicit and ("recipe", "iters") in explicit and ("", "seed") not in explicit


def test_scaled_budgets_bound_their_evaluations():
    r = get_recipe("cifar-paper")
    for f in (0.02, 0.1, 0.5):
        s = r.scaled(f)
        assert -(-s.iters // s.eval_every) <= 10, f
    assert r.scaled(1.0).eval_every == 2000 and r.scaled(0.02).log_every == 40
    assert (r.scaled(0.02).iters, r.scaled(0.02).milestones) == (1280, (640, 960))


def test_divergence_between_log_lines_never_reaches_the_checkpoint(data_dir, tmp_path, capsys):
    """The issue's case: evaluations (and saves) every 3 steps, log lines every 100, lr 1e9."""
    out = tmp_path / "R"
    assert _train("--iters", 30, "--eval-every", 3, "--log-every", 100, "--lr", 1e9, "--data-dir", data_dir,
                  "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "NaN/Inf" in err and "stopped without saving" in err
    if (out / "last.pt").exists():
        ck = ckpt.load(out)
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
        assert f"step {ck['step']}, untouched" in err
    else:
        assert "no checkpoint was written" in err
    # the log says the run diverged (a report must not take it for a run that was only stopped)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["kind"] == "diverged" and "NaN/Inf" in last["reason"]


def test_resume_before_the_first_checkpoint_restarts_the_recorded_run(data_dir, tmp_path, capsys):
    """A run stopped before its first checkpoint (Ctrl-C, a kill) leaves config.json and no last.pt: --resume
    restarts the run recorded there, not the command's defaults (64k iterations at batch 128)."""
    out = tmp_path / "r"
    assert _train("--iters", 40, "--eval-every", 20, "--log-every", 10, "--lr", 0.05, "--data-dir", data_dir,
                  "--out", out, "--stop-at", 5) == 0
    for f in ("last.pt", "best.pt"):
        (out / f).unlink(missing_ok=True)
    assert main(["train", "--out", str(out), "--resume", "--lr", "0.5", "--data-dir", str(data_dir)]) == 2
    assert "recipe.lr is 0.05" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--data-dir", str(data_dir), "--no-progress"]) == 0
    rec = json.loads((out / "config.json").read_text())
    assert (rec["recipe"]["iters"], rec["recipe"]["lr"], rec["model"]["arch"]) == (40, 0.05, "resnet8")
    assert ckpt.read_status(out)["step"] == 40
    # a caller that gives the whole config (reslab reproduce, Python) trains that config there, as before
    from reslab.engine import train
    from reslab.flags import parse_train_args
    again = tmp_path / "again"
    assert _train("--iters", 40, "--lr", 0.05, "--data-dir", data_dir, "--out", again, "--stop-at", 5) == 0
    (again / "last.pt").unlink()
    train(parse_train_args(["--arch", "resnet8", "--batch-size", "32", "--iters", "8", "--data-dir", str(data_dir),
                            "--out", str(again), "--no-progress"]), resume=True)
    assert json.loads((again / "config.json").read_text())["recipe"]["iters"] == 8


def test_resume_refuses_changed_training_images_under_the_same_test_set(tmp_path, capsys):
    """Only the test set was fingerprinted: a training batch changed between sessions passed for the same
    data. The training split's pixels and labels are fingerprinted too now."""
    import pickle
    from conftest import make_cifar_batches
    data = make_cifar_batches(tmp_path / "batches", n_train=160, n_test=40)
    out = tmp_path / "r"
    assert _train("--iters", 4, "--data-dir", data, "--out", out, "--stop-at", 2) == 0
    # stopped before any evaluation: it still says where, and how to go on (it said nothing)
    assert f"stopped: {out} at step 2 of 4 (--resume continues it); not evaluated yet" in capsys.readouterr().out
    info = json.loads((out / "config.json").read_text())["data_info"]["identity"]
    assert len(info["train_pixels_md5"]) == 32 and info["pixels_md5"] != info["train_pixels_md5"]
    batch = pickle.loads((data / "data_batch_3").read_bytes())
    batch[b"data"][0, 0] ^= 1  # one pixel of one training image
    (data / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
    capsys.readouterr()
    assert _train("--iters", 4, "--data-dir", data, "--out", out, "--resume") == 2
    assert "the training images differ from the run's" in capsys.readouterr().err
    assert ckpt.read_status(out)["step"] == 2


def test_resume_refuses_a_different_run_and_extends_by_request(data_dir, tmp_path, capsys):
    out = tmp_path / "r"
    common = ("--data-dir", data_dir, "--out", out, "--eval-every", 20, "--log-every", 10)
    assert _train("--iters", 40, *common) == 0
    capsys.readouterr()
    for flag, value, field in (("--iters", 80, "recipe.iters is 40"), ("--lr", 0.5, "recipe.lr is 0.1"),
                               ("--batch-size", 64, "recipe.batch_size is 32"), ("--seed", 1, "seed is 0"),
                               ("--shortcut", "B", "model.shortcut is 'default'"),
                               ("--precision", "bf16", "runtime.precision is 'fp32'")):
        assert main(["train", "--arch", "resnet8", "--no-progress", "--resume", flag, str(value),
                     *map(str, common)]) == 2, flag
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and field in err[0] and repr(value) in err[0], err
    assert main(["train", "--arch", "resnet14", "--resume", *map(str, common)]) == 2
    assert "model.arch is 'resnet8'" in capsys.readouterr().err
    # free fields may change; the batch size repeated as it was is no conflict, nor is the option the run
    # took by default asked for by name (CIFAR nets default to option A), nor width 1
    assert _train("--resume", "--workers", 1, "--shortcut", "A", "--width", 1.0, *common) == 0
    # lengthening keeps the milestones (20, 30) and equals a run started at 80 with those milestones
    assert _train("--resume", "--extend-to", 80, *common) == 0
    ref = tmp_path / "ref"
    assert _train("--iters", 80, "--milestones", 20, 30, "--data-dir", data_dir, "--out", ref, "--eval-every", 20,
                  "--log-every", 10) == 0
    a, b = ckpt.load(out), ckpt.load(ref)
    assert a["step"] == b["step"] == 80 and a["config"]["recipe"]["milestones"] == [20, 30]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    lrs = [m["lr"] for m in read_metrics(out) if m["kind"] == "train"]
    assert lrs[-1] == pytest.approx(0.001)
    assert _train("--resume", "--extend-to", 60, *common) == 2
    assert "must be more than the run's 80" in capsys.readouterr().err


_CHILD = """
import os, sys, time, torch
real = torch.save
def slow_save(obj, f, *a, **k):  # writes the checkpoint slowly, so a kill can land inside save_atomic
    open(os.environ["SAVE_MARK"], "a").write("saving\\n")
    time.sleep(float(os.environ.get("SAVE_SLEEP", "0")))
    return real(obj, f, *a, **k)
torch.save = slow_save
from reslab.cli import main
sys.exit(main())  # as the `reslab` program: its arguments from sys.argv
"""


def _run_child(args, env, mark=None, after_saves=None, delay=0.0):
    """Run `reslab train` in a child; with `after_saves`, SIGKILL it `delay` seconds after it began its
    `after_saves`-th checkpoint write (the child notes each write in `mark`)."""
    p = subprocess.Popen([sys.executable, "-c", _CHILD, *map(str, args)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    if after_saves is not None:
        while p.poll() is None and not (mark.exists() and mark.read_text().count("saving") >= after_saves):
            time.sleep(0.005)
        time.sleep(delay)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    p.wait()
    return p.returncode, p.stderr.read()


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_is_bitwise_the_uninterrupted_run(data_dir, tmp_path):
    args = ["train", "--arch", "resnet8", "--batch-size", "32", "--iters", "60", "--eval-every", "6",
            "--log-every", "3", "--data-dir", data_dir, "--no-progress"]
    mark = tmp_path / "mark"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAVE_MARK": str(mark)}
    rc, err = _run_child([*args, "--out", tmp_path / "ref"], env)
    assert rc == 0, err
    out = tmp_path / "killed"
    rng = random.Random(0)
    seen_steps = set()
    for attempt in range(4):  # four kills: one inside a checkpoint write, three at random moments of training
        in_save = attempt == 1
        mark.unlink(missing_ok=True)
        rc, err = _run_child([*args, "--out", out, "--resume"], {**env, "SAVE_SLEEP": "0.5" if in_save else "0"},
                             mark, after_saves=rng.randint(1, 4), delay=0.05 if in_save else rng.uniform(0, 0.4))
        assert rc == -signal.SIGKILL, err
        if in_save:
            assert list(out.glob(".*.tmp")), "the kill was meant to land inside a checkpoint write"
        if (out / "last.pt").exists():
            seen_steps.add(ckpt.read_status(out)["step"])
    assert len(seen_steps) >= 2, seen_steps  # the kills landed at different points of the run
    rc, err = _run_child([*args, "--out", out, "--resume"], env)
    assert rc == 0, err
    a, b = ckpt.load(tmp_path / "ref"), ckpt.load(out)
    assert b["step"] == 60 and not list(out.glob(".*.tmp"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    steps = [(m["kind"], m["step"]) for m in read_metrics(out)]
    assert steps == [(m["kind"], m["step"]) for m in read_metrics(tmp_path / "ref")]


def test_sigterm_saves_at_the_next_step_and_resume_is_bitwise_the_uninterrupted_run(data_dir, tmp_path):
    """`timeout` and job schedulers send SIGTERM before they kill: the run saves the step it reached (its only
    evaluation is at the end, so nothing else was on disk) and exits 143; --resume then finishes the same run."""
    args = ["train", "--arch", "resnet8", "--batch-size", "32", "--iters", "40", "--eval-every", "40",
            "--log-every", "1", "--data-dir", data_dir, "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAVE_MARK": str(tmp_path / "mark")}
    assert _run_child([*args, "--out", tmp_path / "ref"], env)[0] == 0
    out = tmp_path / "termed"
    p = subprocess.Popen([sys.executable, "-c", _CHILD, *map(str, [*args, "--out", out])], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = out / "metrics.jsonl"
    while p.poll() is None and not (log.exists() and log.read_text().count("\n") >= 5):
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    p.wait()
    err = p.stderr.read()
    assert p.returncode == 128 + signal.SIGTERM, err
    step = ckpt.read_status(out)["step"]
    assert 5 <= step < 40 and f"at step {step}" in err and "--resume" in err, err
    assert _run_child([*args, "--out", out, "--resume"], env)[0] == 0
    a, b = ckpt.load(tmp_path / "ref"), ckpt.load(out)
    assert b["step"] == 40
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_to_the_process_group_leaves_the_data_workers_to_the_run(tmp_path, sig):
    """`timeout`, Slurm and `kill -- -PGID` signal the DataLoader workers too, and Ctrl-C at a terminal sends
    SIGINT to the whole foreground group. A worker it ended took the run down with "DataLoader worker is
    killed by signal" (or "exited unexpectedly") and nothing saved, and Ctrl-C lost every step since the last
    checkpoint; now the workers leave the signal to the run, which saves, exits 128 + the signal, shuts them
    down without a complaint, and resumes bitwise."""
    from conftest import make_jpeg_folder
    root = make_jpeg_folder(tmp_path / "imgs", per_class=8)
    args = ["train", "--arch", "resnet18", "--data", "folder", "--data-dir", root, "--recipe", "imagenet-paper",
            "--crop-size", "32", "--batch-size", "4", "--iters", "30", "--eval-every", "30", "--log-every", "1",
            "--workers", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAVE_MARK": str(tmp_path / "mark")}
    assert _run_child([*args, "--out", tmp_path / "ref"], env)[0] == 0
    out = tmp_path / "termed"
    p = subprocess.Popen([sys.executable, "-c", _CHILD, *map(str, [*args, "--out", out])], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = out / "metrics.jsonl"
    while p.poll() is None and not (log.exists() and log.read_text().count("\n") >= 3):
        time.sleep(0.01)
    os.killpg(p.pid, sig)  # the main process and both workers
    p.wait()
    err = p.stderr.read()
    assert p.returncode == 128 + sig and "DataLoader" not in err and "Traceback" not in err, err
    step = ckpt.read_status(out)["step"]
    assert 3 <= step < 30 and f"at step {step}" in err, err
    assert ("Ctrl-C: saving at the end of this step" in err) == (sig == signal.SIGINT), err
    rc, err = _run_child([*args, "--out", out, "--resume"], env)
    assert rc == 0 and "DataLoader" not in err, err  # and a run that ends normally shuts its workers down quietly
    a, b = ckpt.load(tmp_path / "ref"), ckpt.load(out)
    assert b["step"] == 30
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_sigterm_stops_a_run_set_with_every_run_saved(data_dir, tmp_path):
    """In a run set each run saves the step it reached; the set resumes."""
    from dataclasses import replace
    from reslab.interrupt import Interrupted
    from reslab.runset import train_set
    from reslab.engine import Trainer
    r = get_recipe("cifar-paper").with_overrides(batch_size=32, iters=24, eval_every=24, log_every=6)
    base = RunConfig.build(tmp_path / "a", "resnet8", r, data_dir=data_dir, progress=False)
    configs = [base, replace(base, seed=1, out=str(tmp_path / "b"))]
    after = Trainer.after_step

    def term_at_7(self, *a):
        after(self, *a)
        if self.state.step == 7 and self.cfg.seed == 1:
            signal.raise_signal(signal.SIGTERM)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "after_step", term_at_7)
        with pytest.raises(Interrupted, match="at step 7"):
            train_set(configs)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are gone with the run
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    from reslab import interrupt
    assert not interrupt.requested()  # and the request: a later run in this process is not asked to stop
    assert [ckpt.read_status(c.out)["step"] for c in configs] == [7, 7]
    train_set(configs, resume=True)
    assert all(ckpt.read_status(c.out)["finished"] for c in configs)


def test_likely_mistakes_are_said_when_a_run_starts(data_dir, tmp_path, capsys):
    """An ImageNet net on 32x32 images (its last stage 1x1) and fp16 on the CPU run, but are said once."""
    assert _train("--arch", "resnet50", "--width", "0.125", "--iters", 1, "--data-dir", data_dir,
                  "--out", tmp_path / "a") == 0
    err = capsys.readouterr().err
    assert "resnet50 is the ImageNet net" in err and "cifar_resnet50 at this depth" in err
    assert _train("--arch", "resnet8", "--precision", "fp16", "--iters", 1, "--data-dir", data_dir,
                  "--out", tmp_path / "b") == 0
    err = capsys.readouterr().err
    assert "fp16 training on the CPU is very slow" in err and "ImageNet net" not in err


def test_old_checkpoints_convert_and_are_refused_for_resume(tmp_path, capsys):
    """State dicts as PyTorch < 0.4.1 wrote them: no num_batches_tracked, no _metadata, legacy serialisation."""
    from reslab import create_model
    net = create_model("resnet20", zero_pad="both")
    sd = {"module." + k.replace("fc.", "linear."): v for k, v in net.state_dict().items()
          if not k.endswith("num_batches_tracked")}
    buf = io.BytesIO()
    torch.save({"state_dict": sd, "best_prec1": 91.7}, buf, _use_new_zipfile_serialization=False)
    # the reproduction's published files (2018) were saved from a GPU: each storage says "cuda:0", which a
    # machine without one can only read with map_location
    old = buf.getvalue().replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
    (tmp_path / "old.th").write_bytes(old)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "old.th", weights_only=True)
    assert main(["convert", str(tmp_path / "old.th"), "--from", "cifar-repro", "--arch", "resnet20",
                 "--out", str(tmp_path / "r20.pt")]) == 0
    import reslab
    m = reslab.load(tmp_path / "r20.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), net.eval()(x))
    assert main(["convert", str(tmp_path / "old.th"), "--from", "cifar-repro", "--arch", "resnet32",
                 "--out", str(tmp_path / "r32.pt")]) == 2
    assert "does not fit resnet32" in capsys.readouterr().err
    tv = create_model("resnet18", stride_in_1x1=False)
    old = {k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "tv.pth")
    assert main(["convert", str(tmp_path / "tv.pth"), "--from", "torchvision", "--arch", "resnet18",
                 "--out", str(tmp_path / "r18.pt")]) == 0
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes((tmp_path / "r20.pt").read_bytes())  # a weights-only file where a run should be
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 2
    assert "no training state inside" in capsys.readouterr().err


def test_a_run_set_equals_its_runs_trained_alone(data_dir, tmp_path, capsys):
    """Three runs in one process (two seeds and another depth) are bitwise the three runs trained alone."""
    from dataclasses import replace
    from reslab.engine import train
    from reslab.runset import train_set
    r = get_recipe("cifar-paper").with_overrides(batch_size=32, iters=24, eval_every=12, log_every=6)
    base = RunConfig.build(tmp_path / "alone" / "a", "resnet8", r, data_dir=data_dir, progress=False)
    configs = [base, replace(base, seed=1, out=str(tmp_path / "alone" / "b")),
               replace(base, out=str(tmp_path / "alone" / "c"), model=replace(base.model, arch="resnet14"))]
    for c in configs:
        train(c)
    together = [replace(c, out=c.out.replace("alone", "set")) for c in configs]
    train_set(together, stop_at=18)  # an interrupted set resumes as a set
    train_set(together, resume=True)
    for a, b in zip(configs, together):
        x, y = ckpt.load(a.out), ckpt.load(b.out)
        assert x["step"] == y["step"] == 24
        for k in x["model"]:
            assert torch.equal(x["model"][k], y["model"][k]), (a.out, k)
        assert x["metrics"]["top1_err"] == y["metrics"]["top1_err"]
    # the CLI form: one run per seed, each in OUT-sSEED
    assert _train("--iters", 6, "--eval-every", 6, "--seeds", 0, 1, "--data-dir", data_dir, "--out",
                  tmp_path / "cli") == 0
    assert ckpt.read_status(tmp_path / "cli-s1")["finished"] and "cli-s0" in capsys.readouterr().out
    assert _train("--seeds", 0, "--seed", 1, "--data-dir", data_dir) == 2


def test_a_failed_evaluation_stops_its_run_alone_saved_and_the_set_resumes(data_dir, tmp_path, monkeypatch):
    """An evaluation that raises (an unreadable file, say) stops that run alone, saved at the step before
    the evaluation; the others train to the end, the set reports it, and the resume evaluates that step first:
    both runs end bitwise as trained alone."""
    from dataclasses import replace
    from reslab import engine
    from reslab.engine import StoppedAfterSaving
    from reslab.runset import train_set
    r = get_recipe("cifar-paper").with_overrides(batch_size=32, iters=24, eval_every=12, log_every=6)
    base = RunConfig.build(tmp_path / "alone" / "a", "resnet8", r, data_dir=data_dir, progress=False)
    configs = [base, replace(base, seed=1, out=str(tmp_path / "alone" / "b"))]
    for c in configs:
        train(c)
    together = [replace(c, out=c.out.replace("alone", "set")) for c in configs]
    real, calls = engine.evaluate, []

    def second_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # run b's evaluation at step 12
            raise OSError("[Errno 5] Input/output error: 'test_batch'")
        return real(*a, **k)
    monkeypatch.setattr(engine, "evaluate", second_fails)
    with pytest.raises(StoppedAfterSaving, match=r"1 of 2 runs stopped .*set/b.*Input/output error"):
        train_set(together)
    a, b = (ckpt.load(c.out) for c in together)
    assert a["finished"] and b["step"] == 12 and b["eval_pending"] and not b["finished"]
    assert [x["step"] for x in read_metrics(together[1].out) if x["kind"] == "eval"] == []
    train_set(together, resume=True)
    for x, y in zip(configs, together):
        x, y = ckpt.load(x.out), ckpt.load(y.out)
        assert y["finished"] and all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"])
        assert x["metrics"]["top1_err"] == y["metrics"]["top1_err"] and x["best_err"] == y["best_err"]
    assert [x["step"] for x in read_metrics(together[1].out) if x["kind"] == "eval"] == [12, 24]


def test_loader_plans_rebuild_its_batches():
    """The graphed step gathers batches itself from (indices, variants): the same batches as iteration."""
    from reslab.data import Normalizer, ResidentLoader
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(100) % 10
    a = ResidentLoader(x, y, 16, Normalizer.fit(x), train=True, seed=3, channels_last=True)
    b = ResidentLoader(x, y, 16, Normalizer.fit(x), train=True, seed=3, channels_last=True)
    batches, plans = list(a), list(b.plans())
    assert len(batches) == len(plans) == 6
    for (xa, ya), (idx, var) in zip(batches, plans):
        xb, yb = b.batch_of(idx, var)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.state_dict() == b.state_dict() == {"epoch": 1, "batch": 0, "seed": 3}
    # each batch's crop/flip variants are its own keyed draw (seed, epoch, batch), though an epoch's are
    # moved to the device in one copy; a loader restored mid-epoch plans exactly the rest
    from reslab.data.resident import mix_seed
    for i, (_, var) in enumerate(plans):
        own = torch.Generator().manual_seed(mix_seed(3, 0, i))
        assert torch.equal(var, torch.randint(b.variants, (16,), generator=own))
    c = ResidentLoader(x, y, 16, Normalizer.fit(x), train=True, seed=3, channels_last=True)
    c.load_state_dict({"epoch": 0, "batch": 4, "seed": 3})
    rest = list(c.plans())
    assert len(rest) == 2 and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(rest, plans[4:]))


def test_graphs_say_why_not_and_refuse_when_asked_where_impossible(data_dir, tmp_path, capsys):
    from reslab.step import graph_fallback
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert "CUDA device" in graph_fallback(cpu, "fp32", None, None, False, False, False)
    from reslab.data import Normalizer, ResidentLoader
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    res = ResidentLoader(x, torch.zeros(4, dtype=torch.long), 2, Normalizer.fit(x), train=True)
    assert graph_fallback(cuda, "bf16", res, None, False, False, False) is None
    assert "GradScaler" in graph_fallback(cuda, "fp16", res, None, False, False, False)
    assert "opt-in" in graph_fallback(cuda, "bf16", object(), None, False, False, False)  # image folders
    assert graph_fallback(cuda, "bf16", object(), None, False, False, False, asked=True) is None
    assert "DDP" in graph_fallback(cuda, "bf16", res, None, True, False, False)
    assert "EMA" in graph_fallback(cuda, "bf16", res, object(), False, False, False)
    assert _train("--graphs", "--iters", 2, "--data-dir", data_dir, "--out", tmp_path / "g") == 2
    assert "--graphs: CUDA graphs need a CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_graphed_training_follows_the_eager_trajectory(data_dir, tmp_path, monkeypatch):
    """300 steps (lr steps at 150 and 225) with the step captured as a CUDA graph against the eager step,
    fp32 without TF32 and cuDNN's deterministic algorithms: the same kernels in the same order, so the two
    agree to rounding (measured bound below), not bitwise (the graph's allocations differ)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # restored after: later tests see the default
    r = get_recipe("cifar-paper").with_overrides(batch_size=32, iters=300, eval_every=300, log_every=50)
    runs = {}
    for graphs in (False, True):
        cfg = RunConfig.build(tmp_path / str(graphs), "resnet8", r, data_dir=data_dir, progress=False,
                              device="cuda", precision="fp32", graphs=graphs, deterministic=True)
        train(cfg)
        runs[graphs] = ckpt.load(cfg.out)
    eager, graphed = runs[False], runs[True]
    for k, v in eager["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(graphed["model"][k], v, rtol=1e-3, atol=1e-4, msg=k)
    assert abs(graphed["metrics"]["top1_err"] - eager["metrics"]["top1_err"]) <= 0.02
    tl = [m["loss"] for m in read_metrics(tmp_path / "True") if m["kind"] == "train"]
    te = [m["loss"] for m in read_metrics(tmp_path / "False") if m["kind"] == "train"]
    assert tl == pytest.approx(te, rel=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_a_graphed_run_set_on_cuda_streams_matches_its_runs_alone_and_a_graphed_resume(data_dir, tmp_path,
                                                                                     monkeypatch):
    """What the table6/seeds phases train: K graphs replayed on K streams. Each run of a set of two must
    follow the same run trained alone (graphed, deterministic fp32: the same kernels), and a graphed run
    stopped at step 30 and resumed (momentum buffers loaded before the capture's warm-up) must follow the
    run that never stopped. Written before any GPU ran it: the tolerances are the graphed-vs-eager test's."""
    from dataclasses import replace
    from reslab.runset import train_set
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    r = get_recipe("cifar-paper").with_overrides(batch_size=32, iters=60, eval_every=60, log_every=10)

    def cfg(name, seed):
        return RunConfig.build(tmp_path / name, "resnet8", r, data_dir=data_dir, progress=False, device="cuda",
                               precision="fp32", graphs=True, deterministic=True, seed=seed)
    alone = [cfg(f"alone{s}", s) for s in (0, 1)]
    for c in alone:
        train(c)
    together = [replace(c, out=str(tmp_path / f"set{c.seed}")) for c in alone]
    train_set(together)
    stopped = replace(alone[0], out=str(tmp_path / "stopped"))
    train(stopped, stop_at=30)
    assert ckpt.read_status(stopped.out)["step"] == 30
    train(stopped, resume=True)

    def losses(c):
        return [m["loss"] for m in read_metrics(c.out) if m["kind"] == "train"]
    for a, b in [*zip(alone, together), (alone[0], stopped)]:
        assert len(losses(b)) == 6 and losses(b) == pytest.approx(losses(a), rel=1e-3), b.out
        ma, mb = ckpt.load(a.out)["model"], ckpt.load(b.out)["model"]
        for k, v in ma.items():
            if v.is_floating_point():
                torch.testing.assert_close(mb[k], v, rtol=1e-3, atol=1e-4, msg=f"{b.out}: {k}")


def test_graph_warmup_is_undone_exactly():
    """GraphedStep's warm-up steps (needed before a capture) leave no trace: after snapshot, three steps and
    restore, training continues bitwise as if they had never run — checked here with the eager step."""
    import copy
    from reslab import create_model
    from reslab.step import TrainStep, make_optimizer, restore, snapshot
    r = get_recipe("cifar-paper")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(6)]
    torch.manual_seed(0)
    a = create_model("resnet8")
    b = copy.deepcopy(a)
    steps = []
    for m in (a, b):
        opt = make_optimizer(m, r)
        steps.append(TrainStep(m, m, opt, torch.amp.GradScaler("cpu", enabled=False), None, "fp32",
                               torch.device("cpu")))
    saved = snapshot(steps[1])
    for x, y in batches[3:]:  # warm-up on other data; creates the momentum buffers
        steps[1](x, y, 0.1)
    restore(steps[1], saved)
    for x, y in batches:
        for st in steps:
            st(x, y, 0.1)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    assert torch.equal(steps[0].acc, steps[1].acc)


def test_resume_keeps_the_ema_exactly(data_dir, tmp_path):
    r = get_recipe("cifar-paper").with_overrides(batch_size=32, iters=20, eval_every=10, log_every=5,
                                                 ema_decay=0.9)
    a = RunConfig.build(tmp_path / "a", "resnet8", r, data_dir=data_dir, progress=False)
    b = RunConfig.build(tmp_path / "b", "resnet8", r, data_dir=data_dir, progress=False)
    train(a)
    train(b, stop_at=7)
    train(b, resume=True)
    x, y = ckpt.load(a.out), ckpt.load(b.out)
    for k, v in x["train"]["ema"].items():
        assert torch.equal(v, y["train"]["ema"][k]), k
    assert x["train"]["ema_n"] == y["train"]["ema_n"] == 20
    m = ckpt.load_model(b.out, key="ema")  # the EMA weights as a model
    assert m.cfg.name == "resnet8"


def test_the_closing_line_says_where_a_stopped_run_is(data_dir, tmp_path, capsys):
    """--stop-at 25 with evaluations every 20: the run is at 25, the error shown is step 20's and says so."""
    common = ("--data-dir", data_dir, "--out", tmp_path / "r", "--iters", 40, "--eval-every", 20)
    assert _train(*common, "--stop-at", 25) == 0
    out = capsys.readouterr().out
    assert "stopped: " in out and "at step 25 of 40 (--resume continues it); last evaluation at step 20: test" in out
    assert "top-5 " in out  # ten classes
    assert _train(*common, "--resume") == 0
    assert "done: " in capsys.readouterr().out
