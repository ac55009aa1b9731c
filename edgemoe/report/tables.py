"""Tables for people: the memory budget, a plan by tensor kind, a GGUF file's contents."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import gguf

from memory_planner import MemoryPlan, format_size
from memory_planner.names import parse_tensor_name


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain left/right aligned text table (numbers right-aligned)."""
    cols = list(zip(header, *rows))
    widths = [max(len(str(c)) for c in col) for col in cols]

    def fmt(row):
        out = []
        for i, c in enumerate(row):
            c = str(c)
            numeric = c[:1].isdigit() or c[:1] == "-" and c[1:2].isdigit()
            out.append(c.rjust(widths[i]) if numeric and i else c.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + [fmt(r) for r in rows])


def budget_table(plan: MemoryPlan) -> str:
    b = plan.budget
    total = plan.total_bytes
    # llama.cpp's own allocation, or the formulas' estimate where llama.cpp was not asked
    source = "as llama.cpp allocates" if b.memory_source == "llama.cpp" else "estimate"
    rows = [
        ["weights (exact, as planned)", format_size(plan.weight_bytes),
         f"{plan.bits_per_weight:.2f} bits/weight"],
        [f"KV cache ({b.ctx} tokens, {b.kv_type})", format_size(b.kv_bytes), source],
        [f"compute buffers (batch {b.n_batch}/{b.n_ubatch}, flash attention "
         f"{'on' if b.flash_attn else 'off'})", format_size(b.compute_bytes), source],
        ["output buffer (logits)", format_size(b.output_bytes), source],
        ["reserve", format_size(b.reserve_bytes), ""],
        ["total", format_size(total), f"{100 * total / b.cap_bytes:.1f}% of cap"],
        ["cap", format_size(b.cap_bytes), "fits" if total <= b.cap_bytes else "OVER THE CAP"],
    ]
    out = table(rows, ["memory", "bytes", ""])
    if b.memory_source != "llama.cpp":  # say why the estimate stands in
        out += f"\nKV, compute and output buffers: {b.memory_source}"
    return out


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _type_summary(types: Iterable[str]) -> str:
    c = Counter(types)
    return " ".join(f"{t}x{n}" if n > 1 else t for t, n in sorted(c.items(), key=lambda x: -x[1]))


def _by_kind(entries: Iterable[tuple[str, str, int, int]]) -> list[list[str]]:
    """entries: (name, type, n_elements, nbytes) -> rows by tensor kind."""
    groups: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
    for name, t, n, nbytes in entries:
        groups[parse_tensor_name(name).kind].append((t, n, nbytes))
    rows = []
    for kind, items in groups.items():
        n = sum(i[1] for i in items)
        nbytes = sum(i[2] for i in items)
        rows.append([kind, str(len(items)), _count(n), _type_summary(i[0] for i in items),
                     f"{8 * nbytes / n:.2f}", format_size(nbytes)])
    return rows


def plan_table(plan: MemoryPlan) -> str:
    rows = _by_kind((t.name, t.type, t.n_elements, t.nbytes) for t in plan.tensors)
    head = (f"plan: {plan.solver}; predicted damage {plan.predicted_damage:.4g} "
            f"({plan.damage_model}); experts per layer {plan.n_experts_kept}/{plan.n_experts}")
    if plan.calibration:
        head += f"\nstatistics {plan.calibration}"
    return head + "\n" + table(rows, ["tensor", "count", "params", "types", "bpw", "bytes"])


def inspect_gguf(path: str | Path) -> str:
    """Types and bits per weight of a GGUF file by tensor kind and by layer."""
    from export.gguf_check import check_gguf

    check_gguf(path)
    r = gguf.GGUFReader(path)
    arch = r.get_field(gguf.Keys.General.ARCHITECTURE)
    arch_name = arch.contents() if arch is not None else "?"
    entries = [(t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes)) for t in r.tensors]
    n = sum(e[2] for e in entries)
    nbytes = sum(e[3] for e in entries)
    lines = [f"{path}: arch {arch_name}, {len(entries)} tensors, {_count(n)} params, "
             f"{format_size(nbytes)} of weights, {8 * nbytes / max(n, 1):.3f} bits/weight"]
    for key in ("expert_count", "expert_used_count", "block_count", "context_length"):
        f = r.get_field(f"{arch_name}.{key}")
        if f is not None:
            lines.append(f"  {key}: {f.contents()}")
    lines.append("\nby tensor kind")
    lines.append(table(_by_kind(entries), ["tensor", "count", "params", "types", "bpw", "bytes"]))
    layers: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
    for name, t, ne, nb in entries:
        kind, layer = parse_tensor_name(name)
        layers["-" if layer is None else str(layer)].append((f"{kind}={t}", ne, nb))
    rows = []
    for layer, items in sorted(layers.items(), key=lambda x: (x[0] == "-", int(x[0]) if
                                                             x[0].isdigit() else 0)):
        ne = sum(i[1] for i in items)
        nb = sum(i[2] for i in items)
        rows.append([layer, f"{8 * nb / ne:.2f}", format_size(nb),
                     " ".join(i[0] for i in items if not i[0].endswith("=F32"))])
    lines.append("\nby layer")
    lines.append(table(rows, ["layer", "bpw", "bytes", "quantized tensors"]))
    return "\n".join(lines)


def tradeoff_table(rows) -> str:
    """The keep-count grid the joint program explored (memory_planner.joint.TradeOff rows)."""
    out = []
    for r in rows:
        if not r.feasible:
            out.append([str(r.n_keep), "-", "-", "-", "-", "does not fit"])
            continue
        out.append([str(r.n_keep), f"{r.bits_per_weight:.2f}", f"{r.quant_damage:.4g}",
                    f"{r.prune_damage:.4g}", f"{r.total_damage:.4g}", format_size(r.weight_bytes)])
    best = min((r for r in rows if r.feasible), key=lambda r: r.total_damage, default=None)
    for row, r in zip(out, rows):
        if r is best:
            row[-1] = row[-1] + "  <- chosen"
    return table(out, ["experts kept", "bpw", "quant damage", "pruning damage", "total",
                       "weights"])


def llama_quantize_command(plan: MemoryPlan, imatrix: str | None = None,
                           src: str = "model-F32.gguf", dst: str = "model-out.gguf") -> str:
    """An equivalent `llama-quantize` command (types only: it cannot prune experts)."""
    by_kind: dict[tuple[str, str], list[str]] = defaultdict(list)
    for t in plan.tensors:
        if t.type == "F32":
            continue
        kind, layer = parse_tensor_name(t.name)
        by_kind[(kind, t.type)].append(None if layer is None else str(layer))
    base = (Counter(t.type for t in plan.tensors if t.type != "F32").most_common(1)
            or [("F32", 0)])[0][0]  # an all-F32 plan is llama-quantize's F32
    args = []
    for (kind, qtype), layers in sorted(by_kind.items()):
        k = re.escape(kind)  # kinds may hold dots (nextn.eh_proj)
        if layers == [None]:
            pattern = rf"^{k}\.weight$"
        else:
            pattern = rf"^blk\.({'|'.join(sorted(layers, key=int))})\.{k}\.weight$"
        args.append(f"--tensor-type '{pattern}={qtype.lower()}'")
    head = "llama-quantize" + (f" --imatrix {imatrix}" if imatrix else "")
    cmd = " \\\n    ".join([head, *args, f"{src} {dst} {base}"])
    note = ""
    if plan.n_experts_kept and plan.n_experts_kept < plan.n_experts:
        note = (f"# note: llama-quantize cannot prune experts; this plan keeps "
                f"{plan.n_experts_kept}/{plan.n_experts} per layer, which only edgemoe "
                "export does\n")
    return note + cmd


def llama_server_command(path: str | Path, plan: MemoryPlan | None = None) -> str:
    """The llama-server command that runs `path` as planned (context, KV cache type; for a
    GPU + CPU plan the offload flags that reproduce its placement), with the flags this
    machine needs (`--no-repack` where llama.cpp's AMX kernels crash)."""
    from ..llamacpp import server_flags

    args = ["llama-server", "-m", str(path)]
    if plan is not None:
        b = plan.budget
        # the context the plan's memory is for (llama-server's own defaults differ)
        args += ["-c", str(b.ctx), "-b", str(b.n_batch), "-ub", str(b.n_ubatch),
                 "-fa", "on" if b.flash_attn else "off", "-np", "1"]
        if b.kv_type.lower() != "f16":
            args += ["--cache-type-k", b.kv_type.lower(), "--cache-type-v", b.kv_type.lower()]
        args += offload_flags(plan)
    return " ".join(args + server_flags())


def offload_flags(plan: MemoryPlan) -> list[str]:
    """`-ngl`, `--tensor-split` and `--n-cpu-moe` or `--override-tensor` for a GPU + CPU
    plan (none for a CPU plan). The regexes are quoted for a POSIX shell."""
    from memory_planner.placement import n_cpu_moe, override_patterns

    gpus = [d for d in plan.devices if d.name != "CPU"]
    if not gpus:
        return []
    out = ["-ngl", "999"]
    if len(gpus) > 1:
        out += ["--tensor-split", ",".join(f"{d.cap_bytes / 1e9:g}" for d in gpus)]
    n = n_cpu_moe(plan)
    if n:
        out += ["--n-cpu-moe", str(n)]
    elif n is None:
        out += ["--override-tensor",
                "'" + ",".join(f"{p}=CPU" for p in override_patterns(plan)) + "'"]
    return out


def device_table(plan: MemoryPlan, specs=None, n_used: int = 0) -> str:
    """Per device of a GPU + CPU plan: weights, what llama.cpp adds there, total and cap;
    with the model's `specs`, the decode speed the bandwidths predict."""
    from memory_planner.placement import decode_seconds, device_weight_bytes

    used = device_weight_bytes(plan.tensors, plan.placement)
    rows = []
    for d in plan.devices:
        w = used.get(d.name, 0)
        total = w + d.fixed_bytes
        rows.append([d.name, format_size(w), format_size(d.fixed_bytes), format_size(total),
                     format_size(d.cap_bytes), f"{100 * total / d.cap_bytes:.1f}%"])
    out = table(rows, ["device", "weights", "KV + buffers + reserve", "total", "cap", "used"])
    if specs is not None and all(d.bandwidth for d in plan.devices):
        s = decode_seconds(plan, specs, n_used)
        out += (f"\ndecode estimate: {1 / s:.1f} tokens/s (weights read per token over "
                + ", ".join(f"{d.name} {d.bandwidth / 1e9:g} GB/s" for d in plan.devices) + ")")
    return out

