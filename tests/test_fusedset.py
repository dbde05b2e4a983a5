"""Design (b) in the engine: seeds trained as one fused model, each still an ordinary run (fusedset.py)."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from reslab import checkpoint as ckpt
from reslab.cli import main
from reslab.config import RunConfig
from reslab.engine import train
from reslab.fusedset import FusedSet, config_refusal, train_fused
from reslab.logs import read_metrics
from reslab.recipes import get_recipe

from conftest import make_cifar_archive

# How close a fused member stays to its run trained alone. The arithmetic is the same but not its order (a
# grouped convolution sums its products otherwise; tests/test_fused.py shows the fused model equal to its
# members to 1e-9 in float64), and this small synthetic task amplifies rounding fast: the same run on one
# and on two threads already differs by 1e-2 in training loss within 6 steps and ends with other weights
# (measured 2026-11-23 on the 2-core AMD EPYC: this file's ResNet-8 recipe, seeds 0-2, 24 steps, logged
# every 2, trained once under torch.set_num_threads(1) and once under 2; fused vs alone stayed closer).
# So members are compared step by step while rounding is still small (the first 3 steps: batches, initial
# weights, weight decay and momentum all enter), and exactly where exactness is owed: a fused set stopped
# and resumed is bitwise the uninterrupted fused set (every weight, BN statistic, momentum buffer and loader
# position goes out to the members' checkpoints and back).
FIRST_STEPS_RTOL = 1e-4   # seen: < 1e-5; a member fed another's batch or given no momentum: > 1e-2


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    make_cifar_archive(d / "cifar-10-python.tar.gz", n_train=320, n_test=101)
    return d


def _configs(root, data_dir, seeds=(0, 1, 2), **recipe):
    r = get_recipe("cifar-paper").with_overrides(**{"batch_size": 32, "iters": 24, "eval_every": 12,
                                                   "log_every": 6, **recipe})
    base = RunConfig.build(root / "s0", "resnet8", r, data_dir=data_dir, progress=False)
    return [replace(base, seed=s, out=str(root / f"s{s}")) for s in seeds]


def _max_diff(a: dict, b: dict) -> float:
    return max((x.double() - b[k].double()).abs().max().item() for k, x in a.items() if x.is_floating_point())


def _losses(run) -> list[float]:
    return [m["loss"] for m in read_metrics(run) if m["kind"] == "train"]


def test_fused_seeds_equal_their_runs_trained_alone(data_dir, tmp_path):
    """Three seeds fused: each member's folder is the run trained alone's (config, logs at the same steps,
    loader position, the first steps' losses within rounding); stopped at step 10 and resumed, the set is
    bitwise the uninterrupted set; a member's checkpoint goes on alone as an ordinary run."""
    kw = {"iters": 16, "eval_every": 8, "log_every": 1}
    alone = _configs(tmp_path / "alone", data_dir, **kw)
    for c in alone:
        train(c)
    fused = _configs(tmp_path / "fused", data_dir, **kw)
    FusedSet(fused).fit()
    resumed = _configs(tmp_path / "resumed", data_dir, **kw)
    FusedSet(resumed).fit(stop_at=10)
    assert ckpt.read_status(resumed[0].out)["step"] == 10
    FusedSet(resumed, resume=True).fit()
    for a, b, c in zip(alone, fused, resumed):
        x, y, z = ckpt.load(a.out), ckpt.load(b.out), ckpt.load(c.out)
        assert x["step"] == y["step"] == z["step"] == 16 and y["finished"] and z["finished"]
        assert y["config"] == {**x["config"], "out": b.out}  # the run's config, as if trained alone
        assert x["train"]["loader"] == y["train"]["loader"] == z["train"]["loader"]
        steps = [[(m["kind"], m["step"]) for m in read_metrics(run)] for run in (a.out, b.out)]
        assert steps[0] == steps[1]
        assert _losses(b.out)[:3] == pytest.approx(_losses(a.out)[:3], rel=FIRST_STEPS_RTOL)
        for k in y["model"]:
            assert torch.equal(y["model"][k], z["model"][k]), (b.out, k)
        my, mz = y["train"]["optimizer"]["state"], z["train"]["optimizer"]["state"]
        assert my.keys() == mz.keys() == x["train"]["optimizer"]["state"].keys()
        assert all(torch.equal(my[i]["momentum_buffer"], mz[i]["momentum_buffer"]) for i in my)
        assert _losses(b.out) == _losses(c.out) and y["metrics"]["top1_err"] == z["metrics"]["top1_err"]
    # members differ from one another (each its own seed), and a member resumes alone as an ordinary run
    assert _max_diff(ckpt.load(fused[0].out)["model"], ckpt.load(fused[1].out)["model"]) > 1e-2
    train(fused[1], resume=True, extend_to=20)
    assert ckpt.read_status(fused[1].out)["step"] == 20


def test_what_cannot_be_fused_says_why_and_falls_back_to_a_run_set(data_dir, tmp_path, capsys):
    cs = _configs(tmp_path / "a", data_dir, seeds=(0, 1))
    assert config_refusal(cs) is None
    other = [cs[0], replace(cs[1], model=replace(cs[1].model, arch="resnet14"))]
    assert "differs in model.arch" in config_refusal(other)
    assert "own EMA" in config_refusal(_configs(tmp_path / "b", data_dir, ema_decay=0.999))
    assert "fp16" in config_refusal([replace(c, runtime=replace(c.runtime, precision="fp16")) for c in cs])
    # ResNet-110's warm-up rule: each member would leave it at its own step; a run set trains them instead
    rule = _configs(tmp_path / "c", data_dir, seeds=(0, 1), iters=2, eval_every=2, log_every=1,
                    warmup_rule=replace(get_recipe("cifar-paper").warmup_rule, min_depth=8))
    finals = train_fused(rule)
    assert "cannot fuse these runs: the warm-up rule" in capsys.readouterr().err and len(finals) == 2
    assert all(ckpt.read_status(c.out)["finished"] for c in rule)


def test_cli_fused_seeds_and_reproduce_groups(data_dir, tmp_path, capsys):
    args = ["train", "--arch", "resnet8", "--batch-size", "32", "--no-progress", "--iters", "6", "--eval-every", "6",
            "--data-dir", str(data_dir), "--out", str(tmp_path / "cli")]
    assert main([*args, "--seeds", "3", "4", "--fused"]) == 0
    for s in (3, 4):
        st = ckpt.read_status(tmp_path / f"cli-s{s}")
        assert st["finished"] and st["config"]["seed"] == s
    assert "fused" in (tmp_path / "cli-s3" / "config.json").read_text()
    assert main([*args, "--fused"]) == 2
    assert "use it with --seeds" in capsys.readouterr().err

    from reslab.reproduce import groups_of
    cs = _configs(tmp_path / "g", data_dir, seeds=(0, 1, 2))
    deeper = [replace(c, out=c.out + "-deep", model=replace(c.model, arch="resnet14")) for c in cs[:2]]
    groups = groups_of([cs[0], deeper[0], cs[1], deeper[1], cs[2]], 2, fused=True)
    assert [[c.out for c in g] for g in groups] == [[cs[0].out, cs[1].out], [cs[2].out],
                                                    [deeper[0].out, deeper[1].out]]
    assert len(groups_of(cs + deeper, 2, fused=False)) == 3


def test_a_diverging_fused_set_stops_with_every_checkpoint_good(data_dir, tmp_path, capsys):
    """lr 1e9, evaluations (and saves) every 3 steps, log lines every 100: the set stops with the NaN error,
    and no member's checkpoint holds a non-finite weight."""
    assert main(["train", "--arch", "resnet8", "--batch-size", "32", "--no-progress", "--iters", "30",
                 "--eval-every", "3", "--log-every", "100", "--lr", "1e9", "--data-dir", str(data_dir),
                 "--out", str(tmp_path / "R"), "--seeds", "0", "1", "--fused"]) == 2
    assert "NaN/Inf" in capsys.readouterr().err
    steps = set()
    for s in (0, 1):
        run = tmp_path / f"R-s{s}"
        if (run / "last.pt").exists():
            ck = ckpt.load(run)
            assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
            steps.add(ck["step"])
        else:
            steps.add(None)
    assert len(steps) == 1  # no member saved at the step where one diverged


def test_one_member_diverging_stops_the_set_with_all_checkpoints_at_one_step(data_dir, tmp_path, monkeypatch):
    """NaN injected into member 1 alone (its weights, after step 7): member 0, first in order, must not save
    at step 9 before member 1's failure is seen; both stay at step 6, and the error names member 1."""
    from reslab.engine import TrainingDiverged
    cs = _configs(tmp_path / "d", data_dir, seeds=(0, 1), iters=12, eval_every=3, log_every=3)
    fs = FusedSet(cs)
    real = fs.step_fn.update

    def poisoned(x, y, ctx):
        wrong = real(x, y, ctx)
        if fs.trainers[0].state.step == 6:  # the 7th step: member 1's block of the first conv's weights
            w = fs.model.net.conv1.weight
            w.data[w.shape[0] // 2:] = float("nan")
        return wrong
    monkeypatch.setattr(fs.step_fn, "update", poisoned)
    with pytest.raises(TrainingDiverged, match="s1: the training loss or the weights became NaN"):
        fs.fit()
    assert [ckpt.read_status(c.out)["step"] for c in cs] == [6, 6]
    # member 1's log says it diverged, at the step it was found (after its checkpoint: a resume drops the
    # line); member 0 only stopped
    import json
    last = [json.loads((Path(c.out) / "metrics.jsonl").read_text().splitlines()[-1]) for c in cs]
    assert last[0]["kind"] != "diverged" and (last[1]["kind"], last[1]["step"]) == ("diverged", 9)
    from reslab.reproduce import run_status
    assert run_status(Path(cs[1].out)) == "diverged@9" and run_status(Path(cs[0].out)) == "resume@6"


def test_resumed_members_are_judged_by_their_own_configs(data_dir, tmp_path, capsys):
    """Runs trained with EMA, resumed with --fused: the checkpoints' EMA refuses the fused set, and the runs
    go on as a run set."""
    cs = _configs(tmp_path / "e", data_dir, seeds=(0, 1), iters=12, ema_decay=0.9)
    from reslab.runset import train_set
    train_set(cs, stop_at=6)
    plain = [replace(c, recipe=replace(c.recipe, ema_decay=0.0)) for c in cs]  # what a command line may say
    train_fused(plain, resume=True, explicit=set())
    assert "own EMA" in capsys.readouterr().err
    assert all(ckpt.read_status(c.out)["step"] == 12 for c in cs)


def test_a_member_that_cannot_begin_gives_its_one_line_error(data_dir, tmp_path, capsys):
    """A failure in a member's begin() (here: --tensorboard without the package) is the run's own one-line
    error, not a traceback from closing members that never began."""
    import importlib.util
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("torch.utils.tensorboard") is None:
        pytest.skip("needs an environment without tensorboard")
    assert main(["train", "--arch", "resnet8", "--batch-size", "32", "--no-progress", "--iters", "4",
                 "--data-dir", str(data_dir), "--out", str(tmp_path / "tb"), "--seeds", "0", "1", "--fused",
                 "--tensorboard"]) == 2
    assert "--tensorboard needs the tensorboard package" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_set_graphed_on_cuda(data_dir, tmp_path):
    """On a GPU the fused step is captured as one CUDA graph and follows the eager fused step."""
    eager = [replace(c, runtime=replace(c.runtime, device="cuda", graphs=False, precision="fp32"))
             for c in _configs(tmp_path / "eager", data_dir, seeds=(0, 1), log_every=1)]
    graphed = [replace(c, out=c.out.replace("eager", "graphed"), runtime=replace(c.runtime, graphs=True))
               for c in eager]
    FusedSet(eager).fit()
    fs = FusedSet(graphed)
    assert fs.graphed is not None
    fs.fit()
    for a, b in zip(eager, graphed):
        assert _losses(b.out)[:3] == pytest.approx(_losses(a.out)[:3], rel=FIRST_STEPS_RTOL)


def test_a_member_whose_evaluation_overflows_stops_the_set_before_any_saves(data_dir, tmp_path, monkeypatch):
    """Finite weights, non-finite evaluation loss in member 1 at step 6: member 0, evaluated first, must not
    save at step 6 either; both stay at step 3, and the error names member 1."""
    from reslab.engine import TrainingDiverged
    import reslab.engine as engine
    cs = _configs(tmp_path / "d", data_dir, seeds=(0, 1), iters=12, eval_every=3, log_every=3)
    fs = FusedSet(cs)
    real, calls = engine.evaluate, []

    def overflowing(model, *a, **k):  # calls 1, 2: step 3 (members 0, 1); calls 3, 4: step 6
        calls.append(model)
        m = real(model, *a, **k)
        return {**m, "loss": float("nan")} if model is fs.trainers[1].model and len(calls) > 2 else m
    monkeypatch.setattr(engine, "evaluate", overflowing)
    with pytest.raises(TrainingDiverged, match="fused member s1: the evaluation at step 6 gave a non-finite loss"):
        fs.fit()
    assert [ckpt.read_status(c.out)["step"] for c in cs] == [3, 3]


def test_a_member_whose_evaluation_fails_saves_with_the_others_and_the_set_resumes(data_dir, tmp_path, monkeypatch):
    """An evaluation that raises (not a divergence) in member 1 at step 6: every member saves step 6 (member 1
    marked to evaluate it on resume), and the resumed set ends bitwise the set that never stopped."""
    from reslab.engine import EvaluationFailed
    import reslab.engine as engine
    kw = {"seeds": (0, 1), "iters": 12, "eval_every": 3, "log_every": 3}
    ref = _configs(tmp_path / "ref", data_dir, **kw)
    FusedSet(ref).fit()
    cs = _configs(tmp_path / "f", data_dir, **kw)
    fs = FusedSet(cs)
    real, calls = engine.evaluate, []

    def failing(model, *a, **k):  # calls 1, 2: step 3 (members 0, 1); call 4: member 1 at step 6
        calls.append(model)
        if model is fs.trainers[1].model and len(calls) == 4:
            raise OSError("[Errno 5] Input/output error")
        return real(model, *a, **k)
    monkeypatch.setattr(engine, "evaluate", failing)
    with pytest.raises(EvaluationFailed, match="1 of 2 fused members could not be evaluated at step 6 .*s1: the "
                                               "evaluation at step 6 failed: OSError"):
        fs.fit()
    monkeypatch.setattr(engine, "evaluate", real)
    loaded = [ckpt.load(c.out) for c in cs]
    assert [x["step"] for x in loaded] == [6, 6] and [x["eval_pending"] for x in loaded] == [False, True]
    train_fused(cs, resume=True)
    for a, b in zip(ref, cs):
        x, y = ckpt.load(a.out), ckpt.load(b.out)
        assert y["finished"] and _max_diff(x["model"], y["model"]) == 0 and x["best_err"] == y["best_err"]
        assert [m["top1_err"] for m in read_metrics(a.out) if m["kind"] == "eval"] == \
               [m["top1_err"] for m in read_metrics(b.out) if m["kind"] == "eval"]
