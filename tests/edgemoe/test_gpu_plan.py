"""`--gpu-memory`: a GPU + CPU plan exported, and its printed llama-server flags given to
llama.cpp's own loader, which must move exactly the planned tensors to the CPU."""

from __future__ import annotations

import re
import shlex

import pytest

from edgemoe import pipeline
from edgemoe.cli import main
from edgemoe.llamacpp import tensors_moved_to_cpu
from edgemoe.planning.gpu import GPUSetup, devices
from export.gguf_io import read_plan
from memory_planner.quant_types import tensor_nbytes


def _printed_patterns(out: str) -> tuple[list[str], str]:
    """The --override-tensor patterns (or --n-cpu-moe's) of the printed llama-server line."""
    line = next(x for x in out.splitlines() if "llama-server" in x)
    args = shlex.split(line[line.index("llama-server"):])
    assert args[args.index("-ngl") + 1] == "999"
    if "--n-cpu-moe" in args:
        n = int(args[args.index("--n-cpu-moe") + 1])
        # llama.cpp's own expansion of --n-cpu-moe (common/common.h)
        return [rf"blk\.{i}\.ffn_(up|down|gate|gate_up)_(ch|)exps" for i in range(n)], line
    spec = args[args.index("--override-tensor") + 1]
    return [p.rsplit("=", 1)[0] for p in spec.split(",")], line


@pytest.mark.parametrize("expert_share", [0.3, 0.8])
def test_printed_overrides_move_exactly_the_planned_tensors(qwen3_dir, tmp_path, capsys,
                                                              expert_share):
    model = pipeline.open_model(qwen3_dir)
    setup = GPUSetup((1,))
    devs, _, _ = devices(model.adapter, setup, "1GB", 256, "f16")
    # a GPU with room for everything but the experts, and `expert_share` of their Q8_0 bytes
    dense = sum(tensor_nbytes(s.n_elements, s.row_length, "Q8_0" if s.quantizable else "F32")
                for s in model.specs if not s.n_experts and s.kind != "token_embd")
    experts = sum(tensor_nbytes(s.n_elements, s.row_length, "Q8_0")
                  for s in model.specs if s.n_experts)
    gpu = devs[1].fixed_bytes + dense + int(expert_share * experts)
    out = tmp_path / "m.gguf"
    assert main(["export", str(qwen3_dir), "--memory", "1GB", "--gpu-memory", str(gpu),
                 "--ctx", "256", "-o", str(out), "--search", "0"]) == 0
    shown = capsys.readouterr().out
    assert re.search(r"^GPU0 .* (9\d|100)\.\d%$", shown, re.M), shown  # the GPU is filled
    plan = read_plan(out)
    planned = {n for n, d in plan.placement.items() if d == "CPU"} - {"token_embd.weight"}
    all_experts = {s.name for s in model.specs if s.n_experts}
    assert planned and planned <= all_experts
    if expert_share > 0.5:  # most experts fit the GPU: only some are moved
        assert planned != all_experts
    patterns, line = _printed_patterns(shown)
    assert tensors_moved_to_cpu(out, patterns) == planned, line


def test_speed_floor_and_its_refusal(qwen3_dir, capsys):
    args = ["plan", str(qwen3_dir), "--memory", "1GB", "--gpu-memory", "1GB", "--ctx", "256"]
    assert main(args + ["--min-tps", "10"]) == 0
    assert "-ngl 999" in capsys.readouterr().out
    # a floor no device can reach at these bandwidths
    assert main(args + ["--min-tps", "1e9", "--gpu-bandwidth", "1GB"]) == 2
    assert "tokens/s" in capsys.readouterr().err
    assert main(["plan", str(qwen3_dir), "--memory", "1GB", "--min-tps", "5"]) == 2
    assert "give --gpu-memory too" in capsys.readouterr().err
