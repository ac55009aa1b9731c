"""`edgemoe validate` on tiny exports: memory against the cap, KLD, exit codes."""

from __future__ import annotations

import json

import pytest

from edgemoe.cli import validate
from tests.helpers import TEXT, export_uniform


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "heldout.txt"
    p.write_text(TEXT)
    return p


def test_file_exported_for_a_cap_fits_and_one_forced_over_is_flagged(qwen3_dir, tmp_path,
                                                                      capsys):
    ok = export_uniform(qwen3_dir, tmp_path / "fits.gguf", "Q8_0", cap="40MB", ctx=256)
    code = validate(str(ok), threads=1, json_path=str(tmp_path / "fits.json"), n_prompt=32,
                      n_decode=4)
    shown = capsys.readouterr().out
    r = json.loads((tmp_path / "fits.json").read_text())
    m = r["memory"]
    assert code == 0 and r["exit_code"] == 0 and "fits" in shown
    assert m["cap_bytes"] == 40 * 10**6 and m["ctx"] == 256 and m["fits"] is True
    assert m["weight_bytes"] == m["planned"]["weight_bytes"]  # llama.cpp's count = the plan's
    # the plan's buffers are llama.cpp's own allocation at the plan's ctx
    assert m["planned"]["memory_source"] == "llama.cpp"
    for kind in ("kv_bytes", "compute_bytes", "output_bytes"):
        assert m[kind] == m["planned"][kind] > 0, kind
    assert m["total_bytes"] <= m["cap_bytes"] and 0 < m["peak_rss_model_bytes"] <= m["cap_bytes"]
    assert r["speed"]["decode_tps"] > 0 and r["speed"]["prompt_tps"] > 0

    # F32 weights alone are 10 MB: forced into a 12 MB cap, validate must say so
    over = export_uniform(qwen3_dir, tmp_path / "over.gguf", "F32", cap="12MB", ctx=256,
                  check_budget=False)
    assert validate(str(over), threads=1, json_path=str(tmp_path / "over.json"), n_prompt=32,
                      n_decode=4) == 1
    assert "OVER THE CAP" in capsys.readouterr().out
    r = json.loads((tmp_path / "over.json").read_text())
    assert r["memory"]["fits"] is False and r["checks"]["memory_cap"] is False
    assert r["memory"]["total_bytes"] > 12 * 10**6


def test_quality_against_gguf_and_hf_references(ggufs, qwen3_dir, text_file, tmp_path):
    code = validate(str(ggufs["qwen3_q8"]), threads=1, reference=str(ggufs["qwen3"]),
                      text=str(text_file), top_any="0.2", json_path=str(tmp_path / "q.json"),
                      max_kld=1.0, eval_ctx=128, max_tokens=512, ctx=256, n_prompt=32,
                      n_decode=4)
    q = json.loads((tmp_path / "q.json").read_text())["quality"]
    assert code == 0
    assert 0 < q["kld_mean"] <= q["kld_p99"] and q["top1_agreement"] > 0.5
    assert q["ppl"] > 1 and q["ppl_reference"] > 1 and q["scored_tokens"] >= 128
    assert q["expert_used_count"] == 2 and 1.0 <= q["experts_per_token"] < 2.0
    assert q["removed_share"] > 0

    # the F32 file against its own checkpoint, converted on the fly: only the F16 KV cache
    # differs; a KLD bound that even this breaks gives exit code 1
    code = validate(str(ggufs["qwen3"]), threads=1, reference=str(qwen3_dir), text=str(text_file),
                      top_any="off", json_path=str(tmp_path / "hf.json"), max_kld=1e-9,
                      eval_ctx=128, max_tokens=256, ctx=256, n_prompt=16, n_decode=2)
    r = json.loads((tmp_path / "hf.json").read_text())
    assert code == 1 and r["checks"]["max_kld"] is False
    assert r["quality"]["removed_share"] == 0 and r["quality"]["experts_per_token"] == 2
    assert 0 < r["quality"]["kld_mean"] < 1e-3 and r["quality"]["top1_agreement"] > 0.97
