"""Experiments as data, the runner, the report and the layer-response hooks."""
import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from reslab import checkpoint as ckpt
from reslab import create_model
from reslab.cli import main
from reslab.errors import ReslabError
from reslab.experiments import BUDGETS, EXPERIMENTS, get_experiment
from reslab.flags import parse_train_args
from reslab.reproduce import command
from reslab.report import write_report
from reslab.runrecord import summarize
from reslab.responses import layer_response_std, response_layers

from conftest import make_cifar_archive


def test_experiment_definitions():
    deg = get_experiment("cifar-degradation")
    names = {c.model.arch for c in deg.configs("paper", "o")}
    assert names == {"plain20", "plain32", "plain44", "plain56", "resnet20", "resnet32", "resnet44", "resnet56",
                     "resnet110"}
    quick = deg.configs("quick", "o")
    assert {"plain20", "plain56", "resnet20", "resnet56"} <= {c.model.arch for c in quick}
    assert all(c.recipe.name == "cifar-paper" and c.recipe.batch_size == 128 for c in quick)
    assert quick[0].recipe.iters == round(64000 * BUDGETS["quick"].scale)
    assert quick[0].out == str(Path("o") / "quick" / "plain20-s0")
    paper = deg.configs("paper", "o")[0].recipe
    assert (paper.iters, paper.milestones, paper.eval_every) == (64000, (32000, 48000), 2000)
    t6 = get_experiment("cifar-table6").configs("paper", "o")
    assert len(t6) == 25 and {c.seed for c in t6} == set(range(5))
    sc = get_experiment("shortcut-options").configs("quick", "o", data_dir="D")
    assert [c.model.kwargs()["shortcut"] for c in sc] == ["A", "B", "C"]
    assert "--shortcut B" in command(sc[1]) and "--data-dir D" in command(sc[1])
    with pytest.raises(ValueError, match="quick, medium, paper"):
        deg.configs("huge", "o")
    # Table 2: ResNet-18/34 with option A, "no extra parameter compared to the plain counterparts"
    t2 = {c.out.rsplit("/", 1)[-1]: c.model for c in get_experiment("imagenet-degradation").configs("paper", "o", "D")}
    params = {k: sum(p.numel() for p in create_model(m.arch, **m.kwargs()).parameters()) for k, m in t2.items()}
    assert params["resnet18-s0"] == params["plain18-s0"] and params["resnet34-s0"] == params["plain34-s0"]
    assert t2["resnet34-s0"].kwargs()["shortcut"] == "A"


@pytest.mark.parametrize("budget", list(BUDGETS))
def test_every_recorded_command_rebuilds_its_config(budget):
    """The manifest's command for every run of every experiment parses back to the run's exact config."""
    for name, exp in EXPERIMENTS.items():
        for cfg in exp.configs(budget, "runs/x", data_dir="data dir" if exp.needs else None, seeds=2):
            cmd = shlex.split(command(cfg))
            assert cmd[0] == "reslab"
            assert parse_train_args(cmd[1:]) == cfg, (name, cmd)


def test_imagenet_experiment_says_what_it_needs(capsys, tmp_path):
    assert main(["reproduce", "imagenet-degradation"]) == 2
    assert "ImageNet-style folder" in capsys.readouterr().err
    # its budgets in its own recipe's terms (they were described as the CIFAR recipe's: "32 iterations")
    assert main(["reproduce", "imagenet-degradation", "--data-dir", str(tmp_path), "--budget", "smoke", "--dry-run",
                 "--out", str(tmp_path / "r")]) == 0
    assert "x0.0005 of the imagenet-paper recipe's schedule: 300 iterations at batch 16, lr x0.1 when the " \
           "validation error plateaus" in capsys.readouterr().out


def test_layer_responses_one_value_per_3x3_layer():
    for depth, n in ((20, 3), (56, 9)):
        for kind in ("resnet", "plain"):
            m = create_model(f"{kind}{depth}")
            layers = response_layers(m)
            assert len(layers) == 6 * n
            assert not any("downsample" in name for name, _ in layers)
    m = create_model("resnet20", shortcut="C")
    assert len(response_layers(m)) == 18  # projections add BNs, but they are not responses
    std = layer_response_std(m, torch.randn(8, 3, 32, 32))
    assert len(std) == 18 and all(s > 0 for s in std)


def _fake_run(root, name, arch, residual, errs, iters=100, seed=0):
    d = root / name
    d.mkdir(parents=True)
    cfg = {"arch": arch, "seed": seed, "recipe": {"iters": iters, "budget": 0.5}, "precision": "fp32",
           "eval_split": "test", "model_config": {"shortcut": "A", "residual": residual}}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "env.json").write_text(json.dumps({"torch": "9.9", "cpu": "TestCPU", "cpu_count": 2, "gpus": [], "git": "abc"}))
    lines = []
    for i, (tr, te) in enumerate(errs):
        step = (i + 1) * iters // len(errs)
        lines.append({"kind": "train", "step": step, "train_err": tr, "elapsed_s": step})
        lines.append({"kind": "eval", "step": step, "top1_err": te, "elapsed_s": step})
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


def test_report_from_synthetic_logs(tmp_path):
    _fake_run(tmp_path, "plain20-s0", "plain20", False, [(0.5, 0.5), (0.2, 0.25)])
    _fake_run(tmp_path, "resnet20-s0", "resnet20", True, [(0.4, 0.45), (0.1, 0.0900)])
    _fake_run(tmp_path, "resnet20-s1", "resnet20", True, [(0.4, 0.45), (0.1, 0.1100)], seed=1)
    path = write_report(tmp_path)
    text = path.read_text()
    assert (tmp_path / "degradation.png").stat().st_size > 1000
    t = {r["arch"]: r for r in json.loads((tmp_path / "results.json").read_text())["table6"]}
    assert t["resnet20"]["n"] == 2 and t["resnet20"]["mean"] == pytest.approx(10.0)
    assert t["resnet20"]["std"] == pytest.approx(1.4142, abs=1e-3) and t["resnet20"]["best"] == pytest.approx(9.0)
    assert "| resnet20 | x0.5 | 100 | fp32 | cpu | TestCPU (2 cores) | 10.00 ± 1.41 (2) | 9.00 | 8.75 | 8.27 | 8.29 |" in text
    assert "TestCPU (2 cores)" in text and "x0.5" in text
    assert summarize(tmp_path / "plain20-s0")["test_err"] == pytest.approx(25.0)
    csv_text = (tmp_path / "results.csv").read_text()
    assert csv_text.splitlines()[0].startswith("run,") and len(csv_text.splitlines()) == 4
    # runs gathered into a folder by symbolic links (rglob did not follow them), a link back up not looping
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in ("resnet20-s0", "resnet20-s1"):
        (linked / name).symlink_to(tmp_path / name, target_is_directory=True)
    (linked / "up").symlink_to(linked, target_is_directory=True)
    write_report(linked)
    assert {r["arch"]: r["n"] for r in json.loads((linked / "results.json").read_text())["table6"]} == {"resnet20": 2}


def test_tiny_end_to_end_reproduce(tmp_path, capsys):
    d = tmp_path / "data"
    make_cifar_archive(d / "cifar-10-python.tar.gz", n_train=200, n_test=40)
    out = tmp_path / "repro"
    assert main(["reproduce", "layer-responses", "--data-dir", str(d), "--out", str(out), "--budget", "smoke",
                 "--dry-run"]) == 0
    assert "new" in capsys.readouterr().out and not (out / "smoke").exists()
    assert main(["reproduce", "layer-responses", "--data-dir", str(d), "--out", str(out), "--budget", "smoke"]) == 0
    resp = json.loads((out / "smoke" / "layer_responses.json").read_text())
    assert len(resp["resnet56-s0"]["std"]) == 54 and len(resp["plain20-s0"]["std"]) == 18
    report = (out / "report.md").read_text()
    assert "Layer responses" in report and "reslab train --arch plain20" in report
    capsys.readouterr()
    assert main(["reproduce", "layer-responses", "--data-dir", str(d), "--out", str(out), "--budget", "smoke",
                 "--dry-run"]) == 0
    assert capsys.readouterr().out.count(" done ") == 4  # finished runs are skipped
    # ... on the data they were trained on: the data folder is free (it may move), the data is not. Other data
    # into the same --out counted those runs as done, and the manifest said they were trained on it
    other = tmp_path / "other"
    make_cifar_archive(other / "cifar-10-python.tar.gz", n_train=200, n_test=40, seed=1)
    assert main(["reproduce", "layer-responses", "--data-dir", str(other), "--out", str(out), "--budget", "smoke",
                 "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert said.count(" refused ") == 4 and "was trained on other data than --data-dir" in said
    assert main(["reproduce", "layer-responses", "--data-dir", str(other), "--out", str(out), "--budget",
                 "smoke"]) == 2
    assert "was trained on other data" in capsys.readouterr().err
    moved = tmp_path / "moved"
    shutil.copytree(d, moved)
    assert main(["reproduce", "layer-responses", "--data-dir", str(moved), "--out", str(out), "--budget", "smoke",
                 "--dry-run"]) == 0
    assert capsys.readouterr().out.count(" done ") == 4

    # a finished run kept as its record only (checkpoints not copied along with the results): Table 6 needs
    # no more than the record, so it is not trained again; the layer responses need the weights
    r20 = out / "smoke" / "resnet20-s0"
    log = (r20 / "metrics.jsonl").read_text()
    (r20 / "last.pt").unlink()
    (r20 / "best.pt").unlink()
    # a finished run killed between its final save and the log write: its report line comes back
    r56 = out / "smoke" / "resnet56-s0"
    log56 = (r56 / "metrics.jsonl").read_text()
    assert '"kind": "eval", "step": 32' in log56.splitlines()[-1]
    (r56 / "metrics.jsonl").write_text("".join(ln + "\n" for ln in log56.splitlines()[:-1]))
    args = ["--data-dir", str(d), "--out", str(out), "--budget", "smoke"]
    assert main(["reproduce", "cifar-table6", "--seeds", "1", *args]) == 0
    assert (r56 / "metrics.jsonl").read_text() == log56
    said = capsys.readouterr().out
    assert "resnet20-s0      logged" in said and "resnet56-s0      done" in said
    assert not (r20 / "last.pt").exists() and (r20 / "metrics.jsonl").read_text() == log
    # the smoke budget's batch of 16 is not the paper's recipe: its row says so
    assert "| resnet20 (batch_size=16) |" in (out / "report.md").read_text()
    assert main(["reproduce", "layer-responses", *args]) == 2
    assert "holds only the record of its finished run (no last.pt)" in capsys.readouterr().err
    # `reslab train` into that folder would start over and delete the record: refused, the record intact
    assert main(shlex.split(json.loads((r20 / "config.json").read_text())["command"])[1:]) == 2
    assert "holds the log of a run evaluated at step 32 but not its checkpoint" in capsys.readouterr().err
    assert (r20 / "metrics.jsonl").read_text() == log
    # a record cut before its end (an unfinished run whose checkpoint went missing) cannot be continued
    (r20 / "metrics.jsonl").write_text("".join(ln + "\n" for ln in log.splitlines() if json.loads(ln)["step"] <= 16))
    assert main(["reproduce", "cifar-table6", "--seeds", "1", *args]) == 2
    assert "evaluated up to step 16 of 32 but not its checkpoint" in capsys.readouterr().err


def test_report_keeps_the_control_apart_and_tables_comparisons(tmp_path):
    """Control runs (benchmarks/control_cifar.py) get their own section, never Table 6; a comparison
    experiment's manifest gives one row per net with params, MACs and mean error over complete runs."""
    _fake_run(tmp_path, "resnet20-s0", "resnet20", True, [(0.4, 0.45), (0.1, 0.12)])
    ctl = _fake_run(tmp_path / "control", "resnet20-s0", "resnet20", True, [(0.4, 0.45), (0.1, 0.10)])
    cfg = json.loads((ctl / "config.json").read_text())
    (ctl / "config.json").write_text(json.dumps({**cfg, "implementation": "control"}))
    # a control run still training: its mid-schedule error must not be averaged in
    busy = _fake_run(tmp_path / "control", "resnet20-s1", "resnet20", True, [(0.4, 0.45)], iters=50, seed=1)
    (busy / "config.json").write_text(json.dumps({**cfg, "implementation": "control", "seed": 1}))  # at 50 of 100
    from reslab.config import RunConfig
    wide = RunConfig.build(tmp_path / "wide-s0", "resnet20", model={"width": 2.0})
    (tmp_path / "manifest-width-vs-depth.json").write_text(json.dumps({
        "experiment": "width-vs-depth", "paper": "width vs depth", "budget": "quick", "budget_description": "q",
        "runs": [{"name": "resnet20-s0", "config": RunConfig.build(tmp_path / "resnet20-s0").to_dict(),
                  "command": "reslab train"}, {"name": "wide-s0", "config": wide.to_dict(), "command": "x"}]}))
    text = write_report(tmp_path).read_text()
    t = {r["arch"]: r for r in json.loads((tmp_path / "results.json").read_text())["table6"]}
    assert t["resnet20"]["n"] == 1 and t["resnet20"]["mean"] == pytest.approx(12.0)  # the control is not in it
    assert ("| resnet20 | x0.5 | 100 | fp32 | same --data-dir (not checked by MD5) | 10.00 ± - (1), 1 unfinished "
            "not counted | 12.00 ± - (1) |") in text
    assert "| control/resnet20-s0 (control) | x0.5 | 100/100 |" in text and "| resnet20-s0 | x0.5 | 100/100 |" in text
    assert "| resnet20 | resnet20  | 0.270M | 40.6M | 12.00 ± - (1) |" in text
    assert "| wide | resnet20 width=2.0 | 1.069M | 156.2M | - |" in text  # no run of it yet
    assert (tmp_path / "width_vs_depth_quick.png").is_file()


def test_a_damaged_run_folder_is_named_and_left_out_of_the_report(tmp_path, capsys):
    """A log line cut in the middle of a log, or a config.json of another shape, leaves that run out of the
    report with the reason; the other runs are still reported (it stopped the whole report)."""
    _fake_run(tmp_path, "resnet20-s0", "resnet20", True, [(0.4, 0.45), (0.1, 0.09)])
    cut = _fake_run(tmp_path, "resnet20-s1", "resnet20", True, [(0.4, 0.45), (0.1, 0.11)], seed=1)
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join([lines[0][:20], *lines[1:]]) + "\n")
    odd = _fake_run(tmp_path, "odd", "resnet20", True, [(0.4, 0.45)], seed=2)
    (odd / "config.json").write_text(json.dumps(["not", "a", "config"]))
    # a run whose log was lost (reproduce counts it done from its checkpoint): named, not passed over
    (tmp_path / "seeds" / "resnet20-s3").mkdir(parents=True)
    (tmp_path / "seeds" / "resnet20-s3" / "last.pt").write_bytes(b"a checkpoint")
    (tmp_path / "seeds" / "resnet20-s3" / "config.json").write_text("{}")
    text = write_report(tmp_path).read_text()
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["run"] for r in res["runs"]] == ["resnet20-s0"] and res["table6"][0]["n"] == 1
    assert [u["path"] for u in res["left_out"]] == ["odd", "resnet20-s1", "seeds/resnet20-s3"]
    assert res["left_out"][2]["reason"].startswith("holds a checkpoint but no metrics.jsonl")
    assert "line 1: not a JSON line" in res["left_out"][1]["reason"]
    assert "Left out, unreadable (3): `odd`: " in text and "`resnet20-s1`: " in text
    err = capsys.readouterr().err
    assert "reslab report: resnet20-s1 left out: " in err and "reslab report: odd left out: " in err
    import shutil
    shutil.rmtree(tmp_path / "resnet20-s0")  # nothing readable: an error that says why, not an empty report
    with pytest.raises(ReslabError, match="no run under .* could be read \\(3 left out: first, odd: "):
        write_report(tmp_path)


def test_table6_averages_finished_runs_and_names_the_others(tmp_path):
    """Seed 0 finished at 9%, seed 1 stopped mid-schedule at 20%: the row is 9.00 (1 seed), and says that
    one run is unfinished; with no finished run, the unfinished ones are shown, marked incomplete."""
    _fake_run(tmp_path, "resnet20-s0", "resnet20", True, [(0.4, 0.45), (0.1, 0.09)])
    busy = _fake_run(tmp_path, "resnet20-s1", "resnet20", True, [(0.4, 0.20)], seed=1, iters=50)
    cfg = json.loads((busy / "config.json").read_text())
    (busy / "config.json").write_text(json.dumps({**cfg, "recipe": {**cfg["recipe"], "iters": 100}}))  # at 50
    _fake_run(tmp_path, "resnet32-s0", "resnet32", True, [(0.4, 0.30)], iters=200)
    r32 = tmp_path / "resnet32-s0" / "config.json"
    cfg = json.loads(r32.read_text())
    r32.write_text(json.dumps({**cfg, "recipe": {**cfg["recipe"], "iters": 400}}))
    text = write_report(tmp_path).read_text()
    t = {r["arch"]: r for r in json.loads((tmp_path / "results.json").read_text())["table6"]}
    assert (t["resnet20"]["n"], t["resnet20"]["mean"], t["resnet20"]["unfinished"]) == (1, pytest.approx(9.0), 1)
    assert "| resnet20 | x0.5 | 100 | fp32 | cpu | TestCPU (2 cores) | 9.00 ± - (1), 1 unfinished not counted |" in text
    # no finished run: the unfinished one, with its step, and no best-of-n beside the paper's number
    assert not t["resnet32"]["complete"] and t["resnet32"]["unfinished"] == 1
    assert "| resnet32 | x0.5 | 400 | fp32 | cpu | TestCPU (2 cores) | incomplete: 30.00 (1) at step 200 of 400 | - |" in text


def test_report_never_averages_across_budgets_precisions_or_data(tmp_path):
    """One folder holding a quick run, two paper-budget runs in bf16 and one in fp32 (as `reslab report
    docs/results` sees them): Table 6 has a row for each (budget, precision), the curves a panel per budget,
    and every layer_responses.json its own section."""
    def run(folder, name, budget, precision, err, seed=0, data="copy A"):
        d = _fake_run(tmp_path / folder, name, "resnet20", True, [(0.4, 0.45), (0.1, err)], seed=seed)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "precision": precision, "data": {"description": data},
                                                   "recipe": {**cfg["recipe"], "budget": budget}}))
    run("quick", "resnet20-s0", 0.015, "fp32", 0.36)
    run("paper", "resnet20-s0", 1.0, "bf16", 0.08)
    run("paper", "resnet20-s1", 1.0, "bf16", 0.10, seed=1)
    run("fp32", "resnet20-s0", 1.0, "fp32", 0.09)
    run("c100", "resnet20-s0", 1.0, "bf16", 0.33)  # a CIFAR-100 run: listed with the runs, not in Table 6
    c100 = tmp_path / "c100" / "resnet20-s0" / "config.json"
    c100.write_text(json.dumps({**json.loads(c100.read_text()), "data_name": "cifar100"}))
    for folder, std in (("quick", [1.0, 2.0]), ("paper", [1.0, 1.5])):
        (tmp_path / folder / "layer_responses.json").write_text(json.dumps({"resnet20-s0": {
            "arch": "resnet20", "step": 100, "std": std}}))
    text = write_report(tmp_path).read_text()
    rows = json.loads((tmp_path / "results.json").read_text())["table6"]
    assert [(r["budget"], r["precision"], r["n"], round(r["mean"], 6)) for r in rows] == [
        (1.0, "bf16", 2, 9.0), (1.0, "fp32", 1, 9.0), (0.015, "fp32", 1, 36.0)]
    assert "| resnet20 | x1 | 100 | bf16 | cpu | TestCPU (2 cores) | 9.00 ± 1.41 (2) | 8.00 |" in text
    assert "| resnet20 | x0.015 | 100 | fp32 | cpu | TestCPU (2 cores) | 36.00 ± - (1) | 36.00 |" in text
    assert "## Layer responses (paper Fig. 7): paper" in text and "## Layer responses (paper Fig. 7): quick" in text
    assert (tmp_path / "layer_responses-paper.png").is_file() and (tmp_path / "layer_responses-quick.png").is_file()
    import matplotlib.image
    h, w = matplotlib.image.imread(tmp_path / "degradation.png").shape[:2]
    assert h > w  # two budgets: one panel each, stacked (one budget: a single panel, wider than high)
    # the same seed trained twice counts once; another recipe is its own row, named by what differs; a run
    # evaluated on val5k is not a Table 6 number
    run("paper2", "resnet20-s1", 1.0, "bf16", 0.10, seed=1)
    run("lr", "resnet20-s0", 1.0, "bf16", 0.50)
    cfg_path = tmp_path / "lr" / "resnet20-s0" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "recipe": {**cfg["recipe"], "lr": 0.9, "eval_every": 7}}))
    run("val", "resnet20-s3", 1.0, "bf16", 0.01, seed=3)
    cfg_path = tmp_path / "val" / "resnet20-s3" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "eval_split": "val5k"}))
    text = write_report(tmp_path).read_text()
    assert "| resnet20 | x1 | 100 | bf16 | cpu | TestCPU (2 cores) | 9.00 ± 1.41 (2), 1 repeated seed not counted | 8.00 |" in text
    assert "| resnet20 (lr=0.9) | x1 | 100 | bf16 | cpu | TestCPU (2 cores) | 50.00 ± - (1) |" in text
    assert "1.00" not in text.split("## Table 6")[1].split("## ")[0]  # the val5k run
    for folder in ("paper2", "lr", "val"):
        shutil.rmtree(tmp_path / folder)
    # runs on another copy of the data: their own row, named by the copy
    run("other", "resnet20-s0", 1.0, "bf16", 0.30, data="copy B")
    text = write_report(tmp_path).read_text()
    assert "| resnet20 (copy A) | x1 | 100 | bf16 | cpu | TestCPU (2 cores) | 9.00 ± 1.41 (2) |" in text
    assert "| resnet20 (copy B) | x1 | 100 | bf16 | cpu | TestCPU (2 cores) | 30.00 ± - (1) |" in text


def _new_run(root, name, err, *, seed=0, model=None, recipe=None, runtime=None, world_size=1, md5="aaaa",
             env=None, diverged_at=None, budget=0.015):
    """A run folder as this version's engine writes it (config.json with model_config, data_info, world_size)."""
    from reslab.config import RunConfig
    from reslab.recipes import get_recipe
    cfg = RunConfig.build(root / name, "resnet20", model=model or {}, seed=seed,
                          recipe=get_recipe("cifar-paper").scaled(budget).with_overrides(**(recipe or {})),
                          **{"precision": "fp32", **(runtime or {})})  # a run records its precision resolved
    iters = cfg.recipe.iters
    d = root / name
    d.mkdir(parents=True)
    ident = {"dataset": "cifar10", "official": False, "md5": md5, "pixels_md5": md5, "description": "copy"}
    (d / "config.json").write_text(json.dumps({
        **cfg.to_dict(), "model_config": create_model("resnet20", **(model or {})).metadata, "world_size": world_size,
        "data_info": {"name": "cifar10", "eval_split": "test", "identity": ident}}))
    (d / "env.json").write_text(json.dumps(env or {"torch": "9.9", "cpu": "TestCPU", "cpu_count": 2, "gpus": [],
                                                   "device": "cpu", "world_size": world_size}))
    lines = [{"kind": "train", "step": iters // 2, "train_err": 0.5, "elapsed_s": 1},
             {"kind": "eval", "step": iters // 2, "top1_err": 0.6, "elapsed_s": 1}]
    if diverged_at is None:
        lines += [{"kind": "train", "step": iters, "train_err": 0.3, "elapsed_s": 2},
                  {"kind": "eval", "step": iters, "top1_err": err, "elapsed_s": 2}]
    else:
        lines.append({"kind": "diverged", "step": diverged_at, "elapsed_s": 2, "reason": "NaN"})
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


def test_table6_rows_are_one_way_of_training_and_name_what_left_a_mean(tmp_path):
    """What the review of the report found pooled or hidden: a diverged seed (left out of the mean without
    a word), --shortcut A asked for by name (the paper's net, left out of Table 6), precise BN, several
    ranks and a GPU's TF32 "fp32" (averaged with the CPU's fp32), another copy of the data under the same
    description, a tie between recipes (which made a changed lr the unlabelled row), and NaN in results.json."""
    _new_run(tmp_path, "a/resnet20-s0", 0.30)
    _new_run(tmp_path, "a/resnet20-s1", 0.32, seed=1, model={"shortcut": "A"})  # the default, named
    _new_run(tmp_path, "a/resnet20-s2", None, seed=2, diverged_at=700)
    _new_run(tmp_path, "pbn/resnet20-s0", 0.40, runtime={"precise_bn": 200})
    _new_run(tmp_path, "ddp/resnet20-s0", 0.50, world_size=4)
    _new_run(tmp_path, "gpu/resnet20-s0", 0.20, env={"torch": "9.9", "cpu": "X", "cpu_count": 16,
                                                     "gpus": ["GPU A", "GPU A"], "device": "cuda", "gpu": "GPU A",
                                                     "world_size": 1})
    _new_run(tmp_path, "md5/resnet20-s0", 0.10, md5="bbbb")
    _new_run(tmp_path, "lr/resnet20-s0", 0.90, recipe={"lr": 0.05})
    _new_run(tmp_path, "b/resnet20-s0", 0.36, model={"shortcut": "B"})  # another net: not a Table 6 row
    text = write_report(tmp_path).read_text()
    rows = json.loads((tmp_path / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))["table6"]
    by = {(r["setting"], r["data_md5"], r["recipe"]): r for r in rows}
    main_row = by["cpu", "aaaa", ""]
    assert (main_row["n"], main_row["mean"], main_row["diverged"]) == (2, pytest.approx(31.0), 1)
    assert "| resnet20 (copy, MD5 aaaa) | x0.015 | 960 | fp32 | cpu | TestCPU (2 cores) | 31.00 ± 1.41 (2), " \
           "1 diverged not counted |" in text
    assert "a/resnet20-s2 | x0.015 | 480/960 (diverged at 700) |" in text
    assert by["cpu, precise BN 200", "aaaa", ""]["mean"] == pytest.approx(40.0)
    assert by["cpu, 4 ranks", "aaaa", ""]["mean"] == pytest.approx(50.0)
    assert by["cuda", "aaaa", ""]["hardware"] == ["GPU A x1"]
    assert by["cpu", "bbbb", ""]["mean"] == pytest.approx(10.0)
    assert by["cpu", "aaaa", "lr=0.05"]["mean"] == pytest.approx(90.0)  # the paper's lr is the unlabelled row
    assert len(rows) == 6 and "36.00" not in text.split("## Table 6")[1]


def test_the_control_is_compared_with_reslab_runs_of_its_own_test_images(tmp_path):
    """The control script records the MD5 of its test pixels as the batch file stores them; reslab's runs
    of those images (and only those) are its comparison."""
    _new_run(tmp_path, "reslab/resnet20-s0", 0.30, md5="aaaa")
    _new_run(tmp_path, "reslab-other/resnet20-s0", 0.10, md5="bbbb")
    ctl = _fake_run(tmp_path / "control", "resnet20-s0", "resnet20", True, [(0.4, 0.45), (0.1, 0.35)], iters=960)
    cfg = json.loads((ctl / "config.json").read_text())
    (ctl / "config.json").write_text(json.dumps({**cfg, "implementation": "control", "recipe": {
        "name": "cifar-paper", "iters": 960, "budget": 0.015}, "data": {"test_pixels_md5": "aaaa"}}))
    text = write_report(tmp_path).read_text()
    assert ("| resnet20 | x0.015 | 960 | fp32 | same test images (by MD5) | 35.00 ± - (1) | 30.00 ± - (1) |"
            in text), text.split("## Accuracy control")[1]


def test_hardware_is_the_device_a_run_used_in_every_session(tmp_path):
    """A CPU run on a GPU host is a CPU run; four ranks of an eight-GPU host are x4; a run resumed on other
    hardware names the earlier sessions' too (env.json was overwritten on every resume)."""
    from reslab.logs import environment, hardware_line, session_environment
    host = {"cpu": "EPYC", "cpu_count": 16, "gpus": ["H100"] * 8, "torch": "2.11", "git": "g"}
    assert hardware_line({**host, "device": "cpu", "world_size": 1}) == "EPYC (16 cores)"
    assert hardware_line({**host, "device": "cuda", "gpu": "H100", "world_size": 4}) == "H100 x4"
    assert hardware_line(host) == "H100 x8"  # a record from before the device was kept
    here = environment(torch.device("cpu"))
    assert here["device"] == "cpu" and hardware_line(here).endswith("cores)")
    first = {**host, "device": "cuda", "gpu": "H100", "world_size": 1}
    again = session_environment(dict(first), torch.device("cpu"), 1)
    assert again["earlier"] == [first]
    assert "earlier" not in session_environment(dict(here), torch.device("cpu"), 1)  # same machine: no history
    d = _new_run(tmp_path, "resnet20-s0", 0.3, env=again)
    assert summarize(d)["hardware"] == f"{hardware_line(here)} (earlier sessions: H100 x1)"


def test_report_says_whether_fig7_observations_hold():
    """Seeds are averaged per architecture; each claim is holds / does not hold / holds in part."""
    from reslab.figures import response_claims
    resp = {"plain20-s0": {"arch": "plain20", "std": [2.0, 2.0]}, "resnet20-s0": {"arch": "resnet20", "std": [1.0, 1.2]},
            "resnet20-s1": {"arch": "resnet20", "std": [1.0, 1.0]}, "resnet56-s0": {"arch": "resnet56", "std": [0.9]},
            "resnet110-s0": {"arch": "resnet110", "std": [0.95]}, "plain56-s0": {"arch": "plain56", "std": [0.5]}}
    text = "\n".join(response_claims(resp))
    assert "than their plain counterparts: **holds in part** (resnet20 1.050 vs plain20 2.000; resnet56 0.900" in text
    assert "Deeper ResNets respond less: **holds in part** (resnet20 1.050 → resnet56 0.900 → resnet110 0.950)" in text
    resp["resnet110-s0"]["std"] = [0.8]
    del resp["plain56-s0"]
    text = "\n".join(response_claims(resp))
    assert "counterparts: **holds** (" in text and "respond less: **holds** (" in text
    assert response_claims({"plain20-s0": {"arch": "plain20", "std": [1.0]}}) == []


@pytest.mark.slow
def test_readers_experiments_run_at_the_smoke_budget(tmp_path, capsys):
    d = tmp_path / "data"
    make_cifar_archive(d / "cifar-10-python.tar.gz", n_train=200, n_test=40)
    out = tmp_path / "repro"
    for name, concurrent in (("gross-wilber", 1), ("width-vs-depth", 1), ("block-design", 4)):
        assert main(["reproduce", name, "--data-dir", str(d), "--out", str(out), "--budget", "smoke",
                     "--concurrent", str(concurrent), "--no-report"]) == 0, capsys.readouterr().err
    report = write_report(out).read_text()
    for needle in ("## gross-wilber", "| resnet56-bnadd | resnet56 bn_after_add=True |", "13.56",
                   "## width-vs-depth", "| resnet20-w1.78 | resnet20 width=1.78 | 0.847M |",
                   "## block-design", "| blocks3-d20 | resnet14 block_layers=3 |", "| gated20 | resnet20 shortcut=gated |"):
        assert needle in report, needle
    assert (out / "width_vs_depth_smoke.png").is_file()
    assert report.count("± - (1) |") >= 11  # every net trained to completion once


def test_report_reads_a_torn_last_line_and_a_diverged_run(tmp_path):
    """A kill mid-write tears the last log line (skipped); a diverged run logs NaN (plotted without it); a
    damaged line inside the log leaves that run out, named with the file and line."""
    torn = _fake_run(tmp_path, "resnet20-s0", "resnet20", True, [(0.4, 0.45), (0.1, 0.09)])
    with open(torn / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')
    nan = _fake_run(tmp_path, "resnet20-s1", "resnet20", True, [(0.4, 0.45), (float("nan"), float("nan"))], seed=1)
    assert "NaN" in (nan / "metrics.jsonl").read_text()
    text = write_report(tmp_path).read_text()
    assert "| resnet20-s0 | x0.5 | 100/100 |" in text and (tmp_path / "degradation.png").is_file()
    lines = (torn / "metrics.jsonl").read_text().splitlines()
    (torn / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    text = write_report(tmp_path).read_text()  # that run is left out, named with the file and line
    assert "`resnet20-s0`: " in text and "metrics.jsonl, line 2: not a JSON line" in text
    assert "| resnet20-s1 | x0.5 |" in text


def test_report_leaves_detection_runs_out_and_names_other_splits(tmp_path):
    """A detection run beside classification runs is not a classification row (it was a KeyError that
    stopped the whole report); a run evaluated on another split says which; a folder that does not exist
    says so."""
    _fake_run(tmp_path, "resnet20-s0", "resnet20", True, [(0.4, 0.45), (0.1, 0.09)])
    val = _fake_run(tmp_path, "resnet20-val", "resnet20", True, [(0.4, 0.45), (0.1, 0.12)])
    cfg = json.loads((val / "config.json").read_text())
    (val / "config.json").write_text(json.dumps({**cfg, "eval_split": "val5k"}))
    det = tmp_path / "det"
    det.mkdir()
    (det / "config.json").write_text(json.dumps({"run": {}, "recipe": {"iters": 10}, "detector": {}}))
    (det / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 10, "loss": 1.0}) + "\n")
    text = write_report(tmp_path).read_text()
    assert "| det " not in text and len(json.loads((tmp_path / "results.json").read_text())["runs"]) == 2
    assert "| 12.00 (val5k) |" in text and "| 9.00 |" in text
    with pytest.raises(FileNotFoundError, match="no such folder"):
        write_report(tmp_path / "missing")


def test_reproduce_checks_every_run_on_disk_before_training(tmp_path, capsys):
    """A stranger's unfinished run in the sweep's last folder is an error before the first run trains (it
    used to surface when that run's turn came, with advice to drop a flag nobody gave); --dry-run shows that
    folder as refused, with the reason (it said "resume@1", or "done" for a finished stranger)."""
    from dataclasses import replace
    from reslab.engine import train
    from reslab.errors import ReslabError
    from reslab.experiments import get_experiment
    from reslab.reproduce import reproduce
    d = tmp_path / "data"
    make_cifar_archive(d / "cifar-10-python.tar.gz", n_train=200, n_test=40)
    out = tmp_path / "repro"
    configs = get_experiment("cifar-table6").configs("smoke", out, d, 1)
    last = configs[-1]
    train(replace(last, recipe=replace(last.recipe, lr=0.05)), stop_at=1)
    reproduce("cifar-table6", d, out, budget="smoke", seeds=1, dry_run=True)
    said = capsys.readouterr().out
    name = Path(last.out).name
    assert f"  {name:<16} refused " in said and "its recipe.lr is 0.05" in said
    assert "1 run folder would stop the run before it trains anything" in said
    with pytest.raises(ReslabError, match=r"holds another run than cifar-table6's: its recipe.lr is 0.05"):
        reproduce("cifar-table6", d, out, budget="smoke", seeds=1, report=False)
    assert not any((Path(c.out) / "last.pt").exists() for c in configs[:-1])


def test_sigterm_under_reproduce_says_to_run_reproduce_again(tmp_path, capsys, monkeypatch):
    """A reproduce run stopped by SIGTERM saves like any run, but is continued by the same reproduce command
    (which resumes its runs), not by the `reslab train --resume` a lone run's message names."""
    import signal
    from reslab.engine import Trainer
    d = tmp_path / "data"
    make_cifar_archive(d / "cifar-10-python.tar.gz", n_train=200, n_test=40)
    after = Trainer.after_step

    def term_at_3(self, *a):
        after(self, *a)
        if self.state.step == 3:
            signal.raise_signal(signal.SIGTERM)
    monkeypatch.setattr(Trainer, "after_step", term_at_3)
    args = ["reproduce", "layer-responses", "--data-dir", str(d), "--out", str(tmp_path / "r"), "--budget", "smoke"]
    assert main(args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "at step 3): the same `reslab reproduce` command continues" in err and "--resume" not in err, err
    saved = [ckpt.read_status(p.parent)["step"] for p in (tmp_path / "r" / "smoke").glob("*/last.pt")]
    assert saved == [3]
    # one that lands in a run's last step lets that run finish, and the sweep stops before the next run
    def term_at_end(self, *a):
        after(self, *a)
        if self.state.step == self.cfg.recipe.iters:
            signal.raise_signal(signal.SIGTERM)
    monkeypatch.setattr(Trainer, "after_step", term_at_end)
    assert main(args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "finished; 3 runs not started): the same `reslab reproduce` command continues" in err, err
    status = [ckpt.read_status(p.parent) for p in (tmp_path / "r" / "smoke").glob("*/last.pt")]
    assert [s["finished"] for s in status] == [True]


def test_a_run_given_iters_reports_the_fraction_of_the_schedule_it_trained(tmp_path):
    """`reslab train --iters 40` keeps the recipe's proportions at budget 1: the report called it "x1"."""
    from reslab.config import RunConfig
    from reslab.recipes import get_recipe
    run = _fake_run(tmp_path, "r20", "resnet20", True, [(0.4, 0.45), (0.1, 0.2)], iters=40)
    cfg = RunConfig.build(run, "resnet20", get_recipe("cifar-paper").with_overrides(iters=40)).to_dict()
    (run / "config.json").write_text(json.dumps(cfg))
    r = summarize(run)
    assert r["budget"] == pytest.approx(40 / 64000) and r["iters"] == 40
    assert "| r20 | x0.000625 | 40/40 |" in write_report(tmp_path).read_text()
    scaled = RunConfig.build(run, "resnet20", get_recipe("cifar-paper").scaled(0.01)).to_dict()
    (run / "config.json").write_text(json.dumps(scaled))
    assert summarize(run)["budget"] == 0.01  # a --budget run: its budget


def test_a_record_that_disagrees_with_its_checkpoint_is_left_out(tmp_path, capsys):
    """config.json edited by hand to another arch: the report filed a ResNet-8's result under that arch's
    Table 6 row, while reproduce (which reads last.pt) counted the run as the ResNet-8 it is."""
    d = tmp_path / "data"
    make_cifar_archive(d / "cifar-10-python.tar.gz", n_train=64, n_test=20)
    run = tmp_path / "runs" / "r"
    assert main(["train", "--arch", "resnet8", "--data-dir", str(d), "--iters", "2", "--batch-size", "16",
                 "--out", str(run), "--no-progress"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "model": {**cfg["model"], "arch": "resnet32"}}))
    capsys.readouterr()
    with pytest.raises(ReslabError, match="arch 'resnet32' in config.json, 'resnet8' in last.pt"):
        write_report(tmp_path / "runs")  # the only run: nothing left to report, and the reason
    (run / "config.json").write_text(json.dumps(cfg))
    assert "| r | x" in write_report(tmp_path / "runs").read_text()
    # more iterations in the record than in last.pt: an --extend-to session stopped before its first save,
    # an extension in progress, not a disagreement
    (run / "config.json").write_text(json.dumps({**cfg, "recipe": {**cfg["recipe"], "iters": 4}}))
    assert "| r | x" in write_report(tmp_path / "runs").read_text()
