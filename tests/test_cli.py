"""The command line: JSON contracts and one-line errors."""
import json
import subprocess
import sys

import pytest
import torch

from reslab.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "reslab", *args], capture_output=True, text=True, timeout=300)


def test_info_json_resnet110_and_resnet50(capsys):
    assert main(["info", "resnet110", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["name"] == "resnet110" and d["params"] == 1_727_962
    assert abs(d["macs"] - 252.89e6) / 252.89e6 < 1e-3
    assert main(["info", "resnet50", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert abs(d["macs"] - 3.858e9) / 3.858e9 < 1e-3 and d["stride_variant"] == "v1"
    assert main(["info", "resnet50", "--json", "--v1.5", "--shortcut", "C", "--input-size", "160"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["stride_variant"] == "v1.5" and d["shortcut"] == "C" and d["input_size"] == 160


def test_info_text_shows_stage_shapes(capsys):
    assert main(["info", "resnet20"]) == 0
    out = capsys.readouterr().out
    assert "(64, 8, 8)" in out and "269,722" in out
    assert main(["info", "plain20"]) == 0  # its shortcut option builds nothing: `reslab models` says "none" too
    assert "shortcut none (plain)" in capsys.readouterr().out


def test_a_pipe_closed_early_ends_without_a_traceback(monkeypatch, capsys):
    """`reslab info ... | head -1`: the reader went away; 141 (128 + SIGPIPE), no traceback."""
    import builtins
    real = builtins.print

    def closed(*a, **k):
        if k.get("file") is None:
            raise BrokenPipeError(32, "Broken pipe")
        return real(*a, **k)
    monkeypatch.setattr(builtins, "print", closed)
    assert main(["info", "resnet20"]) == 141
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("args, needle", [
    (["info", "resnet21"], "resnet20"),
    (["info", "resnet22"], "6n+2"),
    (["info", "resnet20", "--shortcut", "D"], "invalid choice: 'D'"),
    (["train", "--iters", "many"], "--iters: invalid int"),
])
def test_cli_errors_are_one_line_and_nonzero(args, needle):
    r = run_cli(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reslab: error:") and needle in lines[0]
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_an_unusable_device_or_count_is_a_one_line_error(tmp_path, capsys):
    for args, says in ((["train", "--device", "cuda", "--iters", "1", "--out", str(tmp_path / "a")], "no CUDA device here"),
                       (["train", "--device", "mps", "--iters", "1", "--out", str(tmp_path / "b")], "runs on cpu or cuda"),
                       (["predict", str(tmp_path), "--top", "-1"], "--top: must be at least 1"),
                       (["eval", str(tmp_path), "--precise-bn", "-3"], "--precise-bn: must be at least 0"),
                       (["export", str(tmp_path), "--format", "onnx", "--out", str(tmp_path)], "is a folder; give the file"),
                       # values that crashed at the first step or trained another experiment without a word
                       (["train", "--eval-every", "0", "--out", str(tmp_path / "c")], "eval_every and log_every must be at least 1"),
                       (["train", "--label-smoothing", "2", "--out", str(tmp_path / "d")], "label_smoothing and ema_decay must be in [0, 1)"),
                       (["train", "--weight-decay", "-1", "--out", str(tmp_path / "e")], "weight_decay must not be negative"),
                       (["train", "--milestones", "10", "5", "--out", str(tmp_path / "f")], "increasing order"),
                       (["train", "--stop-at", "0", "--out", str(tmp_path / "g")], "--stop-at: must be at least 1"),
                       (["reproduce", "cifar-table6", "--seeds", "0", "--dry-run"], "--seeds: must be at least 1"),
                       (["bench", "--quick", "--out", str(tmp_path)], "is a folder; give the JSON file")):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
