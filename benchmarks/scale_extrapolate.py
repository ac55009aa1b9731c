"""Each stage measured by `scale.py`, extrapolated to a target model and machine.

For a stage (one side: edgemoe or llama.cpp) measured on the benchmark model with CPU time
c (user + system of the whole process tree) and a busiest thread of CPU time b:

    s       = 2 b / (CPU time of all threads) - 1      the serial share (2 cores here)
    compute = c * W_target / W_bench * (s + (1 - s) / cores)
    io      = (bytes read + bytes written) at the target / disk bandwidth
    hours   = max(compute, io) / 3600,   disk = peak extra disk * bytes_target / bytes_bench

CPU time, not wall time: the benchmark machine is shared (load 20 on 2 cores while these
ran), which stretches wall time several-fold but not CPU time. Threads are assumed to scale
to all cores where they ran in parallel here (Amdahl with the measured serial share b);
llama.cpp's threads spin while waiting, which counts as CPU time (pessimistic for it).

- W, the work that scales the stage: parameters P for convert, export and quantize; for
  plan, the rows its damage measurement quantizes: 256 rows of every dense tensor and of 16
  experts of every expert tensor, times the row length (D below); tokens x
  active parameters T*A for running the model (calibration windows with their probes,
  imatrix, validation), with the same tokens as measured. The probes run for a share of the
  calibration run's time (PROBE_SHARE, calibrate's default budget), so they scale with the
  run. An edgemoe calibration of an HF source is its Q8_0 intermediate (the measured
  `export --type Q8_0`, scaled by P) + the rest (scaled by T*A); a GGUF source runs as it is;
  in layer segments (`--max-disk` = the output's size) the same intermediate is written a
  segment at a time.
- io: the source is read once; each model-sized file written is written once; a model run
  reads its GGUF once if it fits in the page cache (RAM - 28 GB), else once per ubatch of
  512 tokens (llama.cpp streams every expert from disk for each batch of a model larger than
  memory: a 512-token batch routes to nearly every expert). The probes read for their share
  of the run's time at the same rate (PROBE_SHARE x the run's reads). Layer segments (each
  at most the output's size, less the checkpoint) are read once if one fits the page cache,
  else once per ubatch like a whole file: every block is in one segment, so that is the
  Q8_0's bytes per pass; the probes, which run with each segment, read at the same rate for
  their share.
- disk: what the stage writes at the target: the output (the Q8_0 file; the 128 GB plan);
  calibrate: the checkpoint of its sums or its stats file, never both (about 1 GiB with the
  default covariance budget: float32, rewritten in place), with an HF source also its Q8_0
  intermediate;
  in layer segments at most the output's size (its --max-disk).
  Other stages: measured peak x bytes ratio.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from edgemoe.calibration.sensitivity import PROBE_SHARE  # calibrate's default probe budget

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "fixtures" / "configs"
MACHINE = {"ram": 128e9, "cores": 32, "disk_bps": 3e9, "ubatch": 512}
PAGE_CACHE = MACHINE["ram"] - 28e9  # what is left for the page cache beside the processes
Q8_BYTES_PER_PARAM = 34 / 32
CAP = 128e9  # the output: a plan at the machine's memory
# calibrate's checkpoint: float32 covariances (the default --cov-budget) and sums, rewritten in
# place and removed before the stats file (about its size) is written: never both on disk
CHECKPOINT = 2**30


def deepseek_v3() -> dict:
    """Counted by edgemoe's own adapter from the public config."""
    import numpy as np

    from edgemoe.planning.from_config import adapter_for, read_config

    a = adapter_for(read_config(CONFIGS / "deepseek-v3.json"))
    specs = a.tensor_specs()
    n = {s.name: int(np.prod(s.shape)) for s in specs}
    total = sum(n.values())
    routed = sum(n[s.name] for s in specs if s.n_experts)
    embd = sum(n[s.name] for s in specs if s.kind == "token_embd")
    return {"name": "DeepSeek-V3 (671B)", "params": total,
            "active": total - embd - routed * (1 - a.n_expert_used / a.n_expert),
            "source_bytes": total * 1.0,  # FP8 weights (block scales are 0.02%)
            "q8_bytes": 713.29e9, "tensors": len(specs),
            "damage_work": damage_work(specs)}


def qwen35_397b() -> dict:
    """Counted by hand from the release config (text model; no vision tower, no MTP)."""
    c = json.loads((CONFIGS / "qwen3.5-397b-a17b.json").read_text())["text_config"]
    d, L, E, k = c["hidden_size"], c["num_hidden_layers"], c["num_experts"], \
        c["num_experts_per_tok"]
    ff, sff = c["moe_intermediate_size"], c["shared_expert_intermediate_size"]
    full = sum(t == "full_attention" for t in c["layer_types"])
    hd, nq, nkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    attn = d * (2 * nq * hd) + 2 * d * nkv * hd + nq * hd * d  # q (+ output gate), k, v, o
    kd = c["linear_num_key_heads"] * c["linear_key_head_dim"]
    vd = c["linear_num_value_heads"] * c["linear_value_head_dim"]
    nv = c["linear_num_value_heads"]
    linear = d * (2 * kd + 2 * vd) + d * 2 * nv + vd * d + (2 * kd + vd) * c[
        "linear_conv_kernel_dim"]  # in_proj_qkvz, in_proj_ba, out_proj, conv
    routed = L * E * 3 * d * ff
    dense = L * (3 * d * sff + d * E + d) + full * attn + (L - full) * linear
    embd = out = c["vocab_size"] * d
    total = routed + dense + embd + out
    # per layer: gate/up/down experts (16 measured), shared gate/up/down, attention or linear
    # attention projections (4 of row 4096 + 1 of row 8192), counted as measure_damage would
    dmg = 256 * (L * (16 * (2 * d + ff) + 2 * d + sff + 4 * d + 2 * d) + 2 * d)
    return {"name": "Qwen3.5-397B-A17B", "params": total, "damage_work": dmg,
            "active": total - embd - routed * (1 - k / E), "source_bytes": 2.0 * total,
            "q8_bytes": Q8_BYTES_PER_PARAM * total,
            "tensors": 2 + 60 * 14}


def _serial_share(m: dict) -> float:
    """1 - f: the busiest thread's share b of all threads' CPU time, on the 2 cores here
    b = s + (1 - s) / 2, so s = 2 b - 1."""
    total = m.get("threads_seconds") or 0.0
    b = m.get("busiest_thread_seconds", 0.0) / total if total > 0 else 1.0
    return min(1.0, max(0.0, 2 * b - 1))


def damage_work(specs) -> float:
    """What `edgemoe.damage.measure_damage` quantizes per ladder type: 256 rows of each dense
    tensor, of each of 16 experts of an expert tensor, times the row length."""
    return sum(256 * s.row_length * (min(16, s.n_experts) if s.n_experts else 1)
               for s in specs if s.quantizable)


def _estimate(m: dict | None, parts: list[tuple[float, float]], io_bytes: float,
              scale_b: float) -> dict | None:
    """`parts`: (measured CPU seconds, work ratio); `io_bytes` at the target."""
    if m is None:
        return None
    serial = _serial_share(m)
    per_core = serial + (1 - serial) / MACHINE["cores"]
    compute = sum(c * w for c, w in parts) * per_core
    io = io_bytes / MACHINE["disk_bps"]
    return {"hours": max(compute, io) / 3600, "compute_hours": compute / 3600,
            "io_hours": io / 3600, "disk_bytes": m["peak_disk"] * scale_b,
            "serial_share": serial, "speedup_at_target": 1 / per_core,
            "lower_bound": bool(m.get("lower_bound"))}


def _passes(model_bytes: float, tokens: float) -> float:
    return 1.0 if model_bytes <= PAGE_CACHE else math.ceil(tokens / MACHINE["ubatch"])


def extrapolate(entry: dict) -> dict:
    """Per target, per stage row and side: hours (compute, io) and disk, with the inputs."""
    jobs = {r[side + "_job"]: r[side] for r in entry["rows"] for side in ("edgemoe", "llama")
            if r[side]}
    P, A, T = entry["params"], entry["active_params"], entry["tokens"]
    q8_m, src_m = entry["q8_bytes"], entry["checkpoint_bytes"]
    out = {"machine": MACHINE, "formula": __doc__, "targets": {}}
    for tgt in (deepseek_v3(), qwen35_397b()):
        p_r, ta_r = tgt["params"] / P, tgt["active"] / A
        q8, src = tgt["q8_bytes"], tgt["source_bytes"]
        scale_b = q8 / q8_m
        rows = {}

        def est(job: str, parts: list[tuple[float, float]], io_bytes: float,
                scale_b: float = scale_b) -> dict | None:
            return _estimate(jobs.get(job), parts, io_bytes, scale_b)

        conv = jobs.get("em_convert")
        t_conv = conv["cpu_seconds"] if conv else 0.0
        run_io = q8 * _passes(q8, T)
        for job, m in jobs.items():
            t = m["cpu_seconds"]
            if job in ("em_convert", "ll_convert"):
                r = est(job, [(t, p_r)], src + q8)
            elif job in ("em_calib_gguf", "em_calib_gguf_probes"):  # the GGUF as it is
                probes = PROBE_SHARE if job == "em_calib_gguf_probes" else 0.0
                r = est(job, [(t, ta_r)], run_io * (1 + probes))
            elif job in ("em_calib_noprobes", "em_calib"):  # an HF source: its intermediate
                probes = PROBE_SHARE if job == "em_calib" else 0.0
                r = est(job, [(t_conv, p_r), (max(0.0, t - t_conv), ta_r)],
                        src + q8 + run_io * (1 + probes))
            elif job == "em_calib_segments":  # an HF source, a segment at a time; the
                # probes run each segment too, on its budget's share of the run's time
                segment = min(q8, CAP - CHECKPOINT)
                r = est(job, [(t_conv, p_r), (max(0.0, t - t_conv), ta_r)],
                        src + q8 + q8 * _passes(segment, T) * (1 + PROBE_SHARE))
            elif job == "ll_imatrix":
                r = est(job, [(t, ta_r)], run_io)
            elif job == "em_plan":
                r = est(job, [(t, tgt["damage_work"] / entry["damage_work"])],
                        m["read_bytes"] * src / src_m)
            elif job in ("em_export", "em_export_s0"):
                r = est(job, [(t, p_r)], src + CAP)
            elif job == "ll_quantize":  # from a BF16 GGUF (2 bytes per parameter)
                r = est(job, [(t, p_r)], 2 * tgt["params"] + CAP)
            elif job in ("em_validate", "ll_perplexity"):
                r = est(job, [(t, ta_r)], CAP * _passes(CAP, T))
            else:
                continue
            if r:  # what the stage writes at the target (calibration: its checkpoint or its
                # stats file, capped by --cov-budget: about 1 GiB at most)
                r["disk_bytes"] = {"em_export": CAP, "em_export_s0": CAP, "ll_quantize": CAP,
                                   "em_convert": q8, "ll_convert": q8,
                                   "em_calib_noprobes": q8 + CHECKPOINT,
                                   "em_calib": q8 + CHECKPOINT, "em_calib_segments": CAP,
                                   "em_calib_gguf": CHECKPOINT,
                                   "em_calib_gguf_probes": CHECKPOINT}.get(job, r["disk_bytes"])
                rows[job] = r
        calib = "em_calib_gguf_probes" if "em_calib_gguf_probes" in rows else "em_calib"
        probe_passes = None
        if calib in rows:  # how many probe passes the default budget buys at the target
            run = rows[calib]
            n = min(2048, max(512, T // 16))  # calibrate's probe tokens (sensitivity.py)
            # the measured run's probes took the share of its day (0.5 before it was stored)
            run_compute = (run["compute_hours"] if calib == "em_calib_gguf_probes" else
                           run["compute_hours"] - t_conv * p_r / 3600) \
                / (1 + entry.get("probe_share", 0.5))
            per_pass = max(run_compute * n / T,
                           q8 * _passes(q8, n) / MACHINE["disk_bps"] / 3600)
            run_hours = max(run_compute, run_io / MACHINE["disk_bps"] / 3600)
            probe_passes = int(PROBE_SHARE * run_hours / per_pass)
        em = [rows.get(j) for j in (calib, "em_plan", "em_export")]
        hf = [rows.get(j) for j in ("em_calib_segments", "em_plan", "em_export")]
        ll = [rows.get(j) for j in ("ll_convert", "ll_imatrix", "ll_quantize")]
        out["targets"][tgt["name"]] = {
            "model": tgt, "ratios": {"P": p_r, "T*A": ta_r, "bytes": scale_b}, "rows": rows,
            "pipeline_edgemoe_hours": sum(r["hours"] for r in em) if all(em) else None,
            "pipeline_calibration": calib, "probe_passes": probe_passes,
            "pipeline_hf_segments_hours": sum(r["hours"] for r in hf) if all(hf) else None,
            "pipeline_llama_hours": sum(r["hours"] for r in ll) if all(ll) else None}
    return out


LABELS = {"em_convert": "edgemoe export --type Q8_0", "ll_convert": "convert_hf_to_gguf q8_0",
          "em_calib": "edgemoe calibrate (HF, probes)",
          "em_calib_noprobes": "edgemoe calibrate --no-sensitivity",
          "em_calib_gguf": "edgemoe calibrate (GGUF src, no probes)",
          "em_calib_gguf_probes": "edgemoe calibrate (GGUF src, probes)",
          "em_calib_segments": "edgemoe calibrate (HF, layer segments)",
          "em_calib_capped": "edgemoe calibrate --max-disk CAP",
          "ll_imatrix": "llama-imatrix", "em_plan": "edgemoe plan",
          "em_export": "edgemoe export (search)", "em_export_s0": "edgemoe export --search 0",
          "ll_quantize": "llama-quantize", "em_validate": "edgemoe validate",
          "ll_perplexity": "llama-perplexity"}


def fmt_extrapolation(x: dict) -> str:
    m = x["machine"]
    lines = [f"extrapolated to {m['ram'] / 1e9:.0f} GB RAM, {m['cores']} cores, "
             f"{m['disk_bps'] / 1e9:.0f} GB/s disk (formula: benchmarks/scale_extrapolate.py)"]
    for name, t in x["targets"].items():
        md = t["model"]
        lines.append(f"\n{name}: {md['params'] / 1e9:.1f}B parameters, {md['active'] / 1e9:.1f}B "
                     f"active, Q8_0 {md['q8_bytes'] / 1e9:.0f} GB; the default probe "
                     f"budget runs {t.get('probe_passes')} probe passes")
        lines.append(f"{'job':<42}{'hours':>8}{'compute h':>11}{'io h':>8}{'disk GB':>9}")
        for job, r in t["rows"].items():
            ge = ">=" if r.get("lower_bound") else ""
            lines.append(f"{LABELS.get(job, job):<42}{ge + format(r['hours'], '.2f'):>8}"
                         f"{r['compute_hours']:>11.2f}"
                         f"{r['io_hours']:>8.2f}{r['disk_bytes'] / 1e9:>9.0f}")
        em, ll = t["pipeline_edgemoe_hours"], t["pipeline_llama_hours"]
        if em is not None:
            calib = t.get("pipeline_calibration", "em_calib")
            ge = ">= " if t["rows"][calib].get("lower_bound") else ""
            lines.append(f"pipeline edgemoe ({LABELS[calib]} + plan + export): {ge}"
                         f"{em:.1f} h")
        hf = t.get("pipeline_hf_segments_hours")
        if hf is not None:
            lines.append(f"pipeline edgemoe from the HF source ({LABELS['em_calib_segments']}"
                         f" + plan + export): {hf:.1f} h, disk source + {CAP / 1e9:.0f} GB")
        if ll is not None:
            lines.append(f"pipeline llama.cpp (convert + imatrix + quantize): {ll:.1f} h")
    return "\n".join(lines)
