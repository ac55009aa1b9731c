"""The `edgemoe` command as a user runs it."""

from __future__ import annotations

import json

import gguf
import pytest

from edgemoe import cli
from edgemoe.cli import main
from edgemoe.runtime.topany_metadata import read_top_any
from tests.helpers import TEXT


def test_export_plan_inspect(qwen3_dir, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    plan_json = tmp_path / "plan.json"
    assert main(["plan", str(qwen3_dir), "--memory", "12MB", "--ctx", "256",
                 "-o", str(plan_json)]) == 0
    shown = capsys.readouterr().out
    assert "KV cache (256 tokens, f16)" in shown and "fits" in shown
    plan = json.loads(plan_json.read_text())
    assert plan["totals"]["total_bytes"] <= 12 * 10**6
    assert {"name", "type", "nbytes"} <= set(plan["tensors"][0])

    assert main(["export", str(qwen3_dir), "--memory", "12MB", "--ctx", "256",
                 "-o", str(out)]) == 0
    r = gguf.GGUFReader(out)
    assert sum(int(t.n_bytes) for t in r.tensors) == plan["totals"]["weight_bytes"]

    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "ffn_down_exps" in shown and "bits/weight" in shown


def test_errors_are_messages_with_exit_codes(qwen3_dir, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert main(["export", str(qwen3_dir), "--memory", "2MB", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "below the smallest" in err and "MB in all" in err
    assert not out.exists()
    assert main(["export", str(tmp_path / "nope"), "--memory", "1GB"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["plan", str(qwen3_dir), "--memory", "lots"]) == 2
    assert "cannot read 'lots' as a size" in capsys.readouterr().err
    assert main(["export", str(qwen3_dir), "--memory", "1GB", "--type", "Q9_X"]) == 2
    assert "unknown GGUF type" in capsys.readouterr().err


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["plan", "deepseek-ai/DeepSeek-V3", "--memory", "128GB"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the Hugging Face Hub" in err and "config.json" in err
    assert main(["export", "deepseek-ai/DeepSeek-V3", "--memory", "128GB"]) == 2
    assert "needs the weights on disk" in capsys.readouterr().err


def test_shape_only_plan_from_config(tmp_path, capsys):
    from tests.conftest import ROOT

    cfg = ROOT / "tests" / "fixtures" / "configs" / "mixtral-8x7b.json"
    assert main(["plan", str(cfg), "--memory", "32GB", "--ctx", "8192",
                 "-o", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "ffn_down_exps" in out and "llama-quantize" in out
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_calibrate_keeps_covariances_and_export_searches_with_them(qwen3_dir, tmp_path):
    from export.imatrix import read_stats
    from tests.helpers import PROMPT

    text = tmp_path / "calib.txt"
    text.write_text(PROMPT * 12)
    common = ["--text", str(text), "--ctx", "64", "--no-sensitivity"]
    assert main(["calibrate", str(qwen3_dir), *common, "-o", str(tmp_path / "none.gguf"),
                 "--cov-budget", "0"]) == 0
    assert main(["calibrate", str(qwen3_dir), *common, "-o", str(tmp_path / "s.gguf")]) == 0
    assert not read_stats(tmp_path / "none.gguf").in_cov
    assert read_stats(tmp_path / "s.gguf").in_cov

    flags = ["--memory", "12MB", "--ctx", "256", "--stats", str(tmp_path / "s.gguf")]
    files = {}
    for search in ("0", "4"):
        files[search] = tmp_path / f"search{search}.gguf"
        assert main(["export", str(qwen3_dir), *flags, "--search", search,
                     "-o", str(files[search])]) == 0
    a, b = ({t.name: t for t in gguf.GGUFReader(files[s]).tensors} for s in ("0", "4"))
    assert [(t.tensor_type, t.n_bytes) for t in a.values()] == [
        (t.tensor_type, t.n_bytes) for t in b.values()]
    quantized = [n for n, t in a.items() if t.tensor_type.name not in ("F32", "F16")]
    changed = [n for n in quantized if a[n].data.tobytes() != b[n].data.tobytes()]
    assert len(changed) >= len(quantized) - 1, (changed, quantized)  # token_embd: no input


def test_runtime_verbs_are_registered(ggufs, tmp_path, capsys):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    p = cli._parser()
    a = vars(p.parse_args(["validate", "f.gguf", "--json", "r.json", "--max-kld", "0.1",
                           "--top-any", "0.3"]))
    assert a["func"] is cli.validate and a["json_path"] == "r.json" and a["max_kld"] == 0.1
    a = vars(p.parse_args(["run", "f.gguf", "-p", "hello", "-n", "3"]))
    assert a["func"] is cli.run and a["prompt"] == "hello" and a["max_tokens"] == 3
    assert vars(p.parse_args(["chat", "f.gguf"]))["func"] is cli.chat

    out = tmp_path / "tau.gguf"
    a = vars(p.parse_args(["calibrate-top-any", str(ggufs["qwen3"]), "--text", str(text_file),
                           "--share", "0.2", "--method", "uniform", "-o", str(out),
                           "--eval-ctx", "128", "--max-tokens", "256", "--threads", "1"]))
    for flag in ("verb", "verbose", "traceback"):
        a.pop(flag)
    cal = a.pop("func")(**a, progress=False)
    assert "removed" in capsys.readouterr().out
    tau, info = read_top_any(out)
    assert tau.tolist() == pytest.approx(list(cal.thresholds)) and info["method"] == "uniform"
    with pytest.raises(SystemExit):
        p.parse_args(["calibrate-top-any", "f.gguf", "--text", "t", "--share", "0.2",
                      "--max-kld", "0.1"])


def test_calibrate_takes_a_probe_budget():
    a = vars(cli._parser().parse_args(["calibrate", "m", "--probe-seconds", "90"]))
    assert a["func"] is cli.calibrate and a["probe_seconds"] == 90.0
    a = vars(cli._parser().parse_args(["calibrate", "m"]))
    assert a["probe_seconds"] is None  # sensitivity.default_budget
