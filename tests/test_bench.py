"""Benchmark plumbing: the FLOP/s arithmetic and a well-formed quick result. No speed is asserted."""
import json

import pytest

from reslab.bench import achieved, peak_for, train_flops_per_image
from reslab.cli import main


def test_flops_arithmetic():
    assert train_flops_per_image(40_551_040) == 6 * 40_551_040
    # ResNet-50 v1.5: 4.089 GMACs -> about 24.5 GFLOP per trained image (docs/paper.md)
    assert train_flops_per_image(4.089e9) == pytest.approx(24.5e9, rel=0.01)
    assert achieved(1000, 40_000_000) == pytest.approx(2.4e11)
    assert achieved(1000, 40_000_000, train=False) == pytest.approx(8e10)
    assert peak_for("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_for("Some CPU", "fp32") is None


def test_quick_bench_writes_a_well_formed_result(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "--quick", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["quick"] and r["machine"] and r["env"]["torch"]
    kinds = {row["kind"] for row in r["rows"]}
    assert kinds == {"data", "train", "infer"}
    for row in r["rows"]:
        assert row["images_per_s"] > 0
        if row["kind"] != "data":
            assert row["tflops"] > 0 and row["ratio"] > 0
        if "baseline" in row["setting"]:
            assert row["ratio"] == pytest.approx(1.0)
        if row["ratio"] is not None:  # the ratio is the median of per-round ratios to the same-run baseline
            assert len(row["ratio_rounds"]) == len(row["images_per_s_rounds"]) == 2
            assert min(row["ratio_rounds"]) <= row["ratio"] <= max(row["ratio_rounds"])
    md = (tmp_path / "r.md").read_text()
    assert md.count("|") > 20 and "not a measurement" in md
    sets = [row for row in r["rows"] if row["runs"] > 1]  # K runs in one process: aggregate images/s
    assert sets and sets[0]["setting"].endswith("2 runs") and sets[0]["ratio"] > 0
    fused = [row for row in sets if "fused" in row["setting"]]  # design (b): the K runs as one fused model
    assert len(fused) == 1 and fused[0]["runs"] == 2 and fused[0]["ratio"] > 0
    assert all(row["runs"] == 1 for row in r["rows"] if row["kind"] != "train" or "runs" not in row["setting"])
    # the run-set and fused cases measure the same one-run baseline: their case tells the two rows apart
    base = [row for row in r["rows"] if row["setting"].endswith("1 run (baseline)")]
    assert sorted(row["case"] for row in base) == ["resnet8 fused", "resnet8 run sets"]
    assert {row["group"] for row in r["rows"]} == {"data", "cifar", "infer", "runsets"}
    assert "written: " + str(out) + " and " + str(tmp_path / "r.md") in capsys.readouterr().out


def test_a_failing_group_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    """--keep-going (the GPU sessions' mode): the data group breaks; the CIFAR group is still measured, the
    error names the group in the result's `errors`, and the exit status says something failed."""
    import reslab.bench.plans as plans

    def broken(*a, **k):
        raise RuntimeError("no such kernel")
    monkeypatch.setattr(plans, "bench_data", broken)
    out = tmp_path / "k.json"
    assert main(["bench", "--quick", "--only", "data", "cifar", "--keep-going", "--out", str(out)]) == 1
    r = json.loads(out.read_text())
    assert r["errors"] == ["data (data): RuntimeError: no such kernel"]
    assert {row["kind"] for row in r["rows"]} == {"train"}
    assert "failed group: data (data)" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="no such kernel"):  # without it, the first failure stops the bench
        main(["bench", "--quick", "--only", "data", "--out", str(tmp_path / "s.json")])


def test_bench_rejects_zero_rounds_and_a_folder_out_before_measuring(tmp_path, capsys, monkeypatch):
    assert main(["bench", "--quick", "--rounds", "0"]) != 0
    assert "--rounds must be at least 1" in capsys.readouterr().err
    import reslab.bench.plans as plans
    monkeypatch.setattr(plans, "bench_data", lambda *a, **k: pytest.fail("measured before checking --out"))
    assert main(["bench", "--quick", "--only", "data", "--out", str(tmp_path)]) == 2
    assert "is a folder; give the JSON file to write" in capsys.readouterr().err


def test_jpeg_folder_rows_have_their_baselines_and_the_step_alone():
    """The end-to-end group on a tiny folder it writes itself: data rows (textbook DataLoader baseline vs
    reslab's pipeline), e2e rows (plus the step alone on a synthetic batch) and evaluation-view rows."""
    import torch
    from reslab.bench import e2e
    from reslab.bench.harness import Plan, Setting
    cpu, s = torch.device("cpu"), Setting("fp32", True)
    rows = e2e.bench_folder("resnet18", cpu, 4, s, Plan(1, 1, 1, drain=1), "cpu", images=12, workers=1, size=32)
    assert [r["kind"] for r in rows] == ["data", "data", "e2e", "e2e", "e2e"]
    assert "baseline" in rows[0]["setting"] and "baseline" in rows[2]["setting"] and "step alone" in rows[4]["setting"]
    assert all(r["images_per_s"] > 0 and r["ratio"] > 0 and r["runs"] == 1 for r in rows)
    assert rows[2]["arch"] == "resnet18 (v1.5)"
    from reslab.complexity import count_macs
    from reslab.zoo import create_model
    macs = count_macs(create_model("resnet18", stride_in_1x1=False), 32)
    for r in rows[2:]:  # a training step: 6 x forward MACs per image
        assert r["tflops"] == pytest.approx(6 * macs * r["images_per_s"] / 1e12)
    ev = e2e.bench_eval_views("resnet18", cpu, s, Plan(1, 0, 1), "cpu", images=2, workers=0, batch=10)
    assert [r["kind"] for r in ev] == ["eval", "eval"] and "10crop" in ev[0]["setting"] and "multiscale" in ev[1]["setting"]
    # forward passes (2 x MACs) of every view: ten 224 crops; the 4:3 photograph at each multi-scale side
    from reslab.data.folder import MULTISCALE_SIZES
    net = create_model("resnet18", stride_in_1x1=False)
    per_image = {"10crop": 10 * count_macs(net, 224),
                 "multiscale": 4 / 3 * sum(count_macs(net, k) for k in MULTISCALE_SIZES)}
    for r, view in zip(ev, ("10crop", "multiscale")):
        assert r["tflops"] == pytest.approx(2 * per_image[view] * r["images_per_s"] / 1e12, rel=1e-6)


def test_the_step_profile_groups_every_operator_once(capsys):
    """benchmarks/profile_step.py backs the README's account of where a CPU step's time goes."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "profile_step", Path(__file__).resolve().parents[1] / "benchmarks" / "profile_step.py")
    prof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prof)
    assert [prof.group_of(n) for n in ("aten::convolution_backward", "aten::mkldnn_convolution",
                                       "aten::native_batch_norm_backward", "aten::threshold_backward",
                                       "aten::add_", "aten::addmm", "aten::_fused_sgd_", "aten::empty")] == \
        ["convolution", "convolution", "batch norm", "relu", "addition (shortcut)", "loss, pooling, classifier",
         "optimizer", "other"]
    prof.main(["--batch", "8", "--steps", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("resnet20, batch 8, fp32+channels_last, cpu")
    shares = {ln[:30].strip(): float(ln[30:].strip(" %")) for ln in lines[1:]}
    assert {"convolution", "batch norm", "relu"} <= set(shares) and sum(shares.values()) == pytest.approx(100, abs=0.5)


def test_no_compile_leaves_out_the_compiled_settings(tmp_path):
    """The GPU session's bench phase skips the torch.compile rows, which an earlier session measured and
    whose warm-up costs a minute of device time; the CPU plan has one, which this leaves out."""
    from reslab.bench.plans import SETTINGS, run
    assert any(s.compile for s in SETTINGS["cpu"]) and any(s.compile for s in SETTINGS["cuda"])
    r = run(device="cpu", archs=["resnet8"], only=["cifar"], rounds=1, compile=False, out=str(tmp_path / "b.json"))
    settings = [row["setting"] for row in r["rows"]]
    assert settings and not any("compile" in s for s in settings) and any("channels_last" in s for s in settings)
