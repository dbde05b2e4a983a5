"""The independent control script, benchmarks/control_cifar.py: its run folder, its model, its data paths,
and that it stays independent of reslab."""
import ast
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_cifar_archive, make_cifar_batches

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "control_cifar.py"
SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"


def load_script():
    spec = importlib.util.spec_from_file_location("control_cifar", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args, timeout=300):
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def read_run(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return (json.loads((run / "config.json").read_text()), json.loads((run / "env.json").read_text()),
            [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "eval"])


def test_smoke_run_writes_a_run_folder_report_can_read(tmp_path):
    data = tmp_path / "data"
    make_cifar_archive(data / "cifar-10-python.tar.gz", n_train=500, n_test=100)
    run = tmp_path / "run"
    out = run_script("--data-dir", data, "--iters", 30, "--eval-every", 15, "--log-every", 1, "--workers", 0,
                     "--batch-size", 32, "--seed", 0, "--out", run)
    assert "final test error" in out.strip().splitlines()[-1]
    cfg, env, train, evals = read_run(run)

    assert cfg["implementation"] == "control" and cfg["script"] == "benchmarks/control_cifar.py"
    assert "control_cifar.py" in cfg["command"] and "--iters 30" in cfg["command"]
    assert (cfg["arch"], cfg["seed"], cfg["precision"], cfg["eval_split"]) == ("resnet20", 0, "fp32", "test")
    recipe = cfg["recipe"]
    assert recipe["name"] == "cifar-paper"
    assert (recipe["iters"], recipe["batch_size"], recipe["milestones"]) == (30, 32, [15, 22])
    assert (recipe["lr"], recipe["momentum"], recipe["weight_decay"]) == (0.1, 0.9, 1e-4)
    assert recipe["budget"] == pytest.approx(30 / 64000)
    assert cfg["model_config"] == {**cfg["model_config"], "name": "resnet20", "depth": 20, "shortcut": "A",
                                   "residual": True}
    assert cfg["data"]["dir"] == str(data) and cfg["data"]["normalization"] == "pixel"
    for key in ("torch", "torchvision", "python", "cpu", "cpu_count", "gpus", "git"):
        assert key in env
    assert env["gpus"] == [] or isinstance(env["gpus"][0], str)

    # one train line per iteration (--log-every 1), all finite; lr /10 after iterations 15 and 22
    assert [r["step"] for r in train] == list(range(1, 31))
    for r in train:
        assert set(r) >= {"step", "epoch", "lr", "loss", "train_err", "images_per_s", "elapsed_s"}
        assert math.isfinite(r["loss"]) and 0 <= r["train_err"] <= 1 and r["images_per_s"] > 0
        expected = 0.1 if r["step"] <= 15 else 0.01 if r["step"] <= 22 else 0.001
        assert r["lr"] == pytest.approx(expected), r
    assert train[-1]["epoch"] == pytest.approx(30 * 32 / 500)

    assert [e["step"] for e in evals] == [15, 30]
    for e in evals:
        assert e["split"] == "test" and e["n"] == 100
        assert math.isfinite(e["loss"]) and 0 <= e["top5_err"] <= e["top1_err"] <= 1
    assert evals[1]["elapsed_s"] >= evals[0]["elapsed_s"] > 0

    # the report's reader sees a complete run
    from reslab.runrecord import summarize
    row = summarize(run)
    assert row["complete"] and row["test_err"] == pytest.approx(100 * evals[-1]["top1_err"])


def test_resnet20_has_the_papers_parameter_count():
    control = load_script()
    count = lambda depth: sum(p.numel() for p in control.resnet_cifar(depth).parameters())
    assert count(20) == 269_722
    # Table 6 (0.27M, 0.46M, 0.66M, 0.85M, 1.7M): option A adds no parameters
    for depth, millions in ((32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)):
        assert round(count(depth) / 1e6, 2 if depth < 100 else 1) == millions
    model = control.resnet_cifar(20)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError):
        control.resnet_cifar(21)


def test_script_imports_nothing_from_reslab():
    tree = ast.parse(SCRIPT.read_text())
    modules = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    modules += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert modules and not [m for m in modules if m.split(".")[0] == "reslab"]
    assert all(node.level == 0 for node in ast.walk(tree) if isinstance(node, ast.ImportFrom))
    assert "import_module" not in SCRIPT.read_text() and "__import__" not in SCRIPT.read_text()


def test_every_data_dir_form_gives_the_same_arrays_and_writes_nothing(tmp_path):
    control = load_script()
    folder = make_cifar_batches(tmp_path / "extracted" / "cifar-10-batches-py", n_train=50, n_test=20)
    archive = make_cifar_archive(tmp_path / "packed" / "cifar-10-python.tar.gz", n_train=50, n_test=20)
    # pickled again with str keys, as the JPEG pack's rebuild.py writes the batches
    again = make_cifar_batches(tmp_path / "rebuilt" / "cifar-10-batches-py", n_train=50, n_test=20, str_keys=True)
    before = sorted(p for p in tmp_path.rglob("*"))
    reference = control.load_cifar10(folder)
    assert reference[0].shape == (50, 32, 32, 3) and reference[2].shape == (20, 32, 32, 3)
    # the pickles' rows are R, G, B planes: pixel (0, 0)'s red value is the row's first byte
    raw = control.open_batches(folder)["data_batch_1"]["data"]
    assert reference[0][0, 0, 0, 0] == raw[0, 0] and reference[0][0, 0, 0, 2] == raw[0, 2048]
    for form in (folder.parent, archive.parent, archive, again):
        got = control.load_cifar10(form)
        for a, b in zip(reference[:4], got[:4]):
            np.testing.assert_array_equal(a, b)
        assert got[4] == [f"class{i}" for i in range(10)]
    assert sorted(p for p in tmp_path.rglob("*")) == before
    with pytest.raises(FileNotFoundError):
        control.load_cifar10(tmp_path / "nowhere")


def test_pixel_mode_pads_with_zeros_after_mean_subtraction():
    """The paper's padding: a padded pixel is 0 after normalisation, i.e. it equals the mean pixel."""
    control = load_script()
    from PIL import Image
    image = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    train_tf, test_tf = control.make_transforms("pixel", np.stack([image] * 4))  # the mean image IS the image
    torch.manual_seed(0)
    for _ in range(10):  # whatever the crop offset, every pixel, padding included, is 0
        assert train_tf(Image.fromarray(image)).abs().max() < 1e-6
    assert test_tf(Image.fromarray(image)).abs().max() < 1e-6
    # channel mode is the textbook pipeline: padding is black BEFORE normalising, so it is -mean/std after
    train_tf, _ = control.make_transforms("channel", np.stack([image, 255 - image]))
    norm = train_tf.transforms[-1]
    pad = (-torch.tensor(norm.mean) / torch.tensor(norm.std))[:, None, None]    # (3, 1, 1), about -2
    crops = [train_tf(Image.fromarray(image)) for _ in range(20)]
    assert any(torch.isclose(x, pad).all(0).any() for x in crops)               # some crop shows padding


@pytest.mark.real_data
@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason="needs ../shared/datasets/cifar10")
def test_real_data_path(tmp_path):
    run = tmp_path / "run"
    before = sorted(SHARED_CIFAR.iterdir())
    run_script("--data-dir", SHARED_CIFAR, "--iters", 5, "--eval-every", 5, "--log-every", 5, "--workers", 0,
               "--batch-size", 32, "--out", run)
    cfg, env, train, evals = read_run(run)
    assert (cfg["data"]["train_size"], cfg["data"]["test_size"]) == (50_000, 10_000)
    assert [e["n"] for e in evals] == [10_000] and math.isfinite(train[-1]["loss"])
    assert sorted(SHARED_CIFAR.iterdir()) == before  # read in place, nothing extracted next to it


def test_resume_of_an_attempt_stopped_before_its_first_checkpoint_starts_afresh(tmp_path):
    """A time limit can stop the control run before its first evaluation: --resume then starts afresh (it
    refused, so every later call of a GPU session failed the same way)."""
    data = make_cifar_batches(tmp_path / "data" / "cifar-10-batches-py", n_train=100, n_test=20)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')  # what a killed attempt left
    run_script("--data-dir", data, "--iters", 4, "--eval-every", 4, "--workers", 0, "--batch-size", 16,
               "--out", run, "--resume")
    _, _, train, evals = read_run(run)
    assert [r["step"] for r in evals] == [4] and train and all("loss" in r for r in train)  # the stale line went


def test_resume_keeps_a_record_whose_checkpoint_is_missing(tmp_path):
    """A finished control run copied as its record only (no last.pt): --resume refuses, the log intact."""
    data = make_cifar_batches(tmp_path / "data" / "cifar-10-batches-py", n_train=100, n_test=20)
    run = tmp_path / "run"
    run_script("--data-dir", data, "--iters", 4, "--eval-every", 4, "--workers", 0, "--batch-size", 16, "--out", run)
    (run / "last.pt").unlink()
    log = (run / "metrics.jsonl").read_text()
    r = subprocess.run([sys.executable, str(SCRIPT), "--data-dir", str(data), "--iters", "4", "--eval-every", "4",
                        "--workers", "0", "--batch-size", "16", "--out", str(run), "--resume"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "holds the log of an evaluated run but not its checkpoint" in r.stderr
    assert (run / "metrics.jsonl").read_text() == log


def test_resume_writes_back_the_evaluation_a_kill_after_the_save_lost(tmp_path):
    """The control run saves before it logs an evaluation; killed in between, --resume restores the line from
    the checkpoint's copy, so the report sees the evaluation the checkpoint holds."""
    data = make_cifar_batches(tmp_path / "data" / "cifar-10-batches-py", n_train=100, n_test=20)
    run = tmp_path / "run"
    args = ["--data-dir", data, "--iters", 4, "--eval-every", 4, "--workers", 0, "--batch-size", 16, "--out", run]
    run_script(*args)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert '"kind": "eval"' in lines[-1]
    (run / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines[:-1]))  # as the kill left it
    run_script(*args, "--resume")
    assert (run / "metrics.jsonl").read_text().splitlines() == lines
