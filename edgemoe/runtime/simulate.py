"""llama.cpp's own memory for a planned file, asked of llama.cpp without any weights.

    from edgemoe.runtime.simulate import simulate_allocation
    a = simulate_allocation(adapter, ctx=4096)          # F16 weights, all experts
    a.context, a.compute, a.output                      # bytes, as llama.cpp allocates them

The plan knows every tensor's name, shape and type, so it can write the planned GGUF's
header; the tensor data is a sparse hole (the file has its full size and takes no disk).
llama.cpp opens it with `no_alloc` (`edgemoe.llamacpp.simulated_context`, as common/fit.cpp
does), builds the context at the asked ctx, batch, KV type and flash-attention setting, and
reports through `llama_get_memory_breakdown` the KV cache (or recurrent state) and compute
buffers it would allocate. The logits buffer (`llama_context::output_reserve`, not in the
breakdown) is n_vocab floats per output.

The vocabulary written is a placeholder: tokenizer model "none" with `{arch}.vocab_size`
tokens, which llama.cpp accepts ("adding N dummy tokens"); memory depends only on its size.
So the same header serves HF, GGUF and config-only sources. Works for every architecture
the pinned llama.cpp loads; `SimulationError` otherwise (the caller falls back to formulas).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from export.gguf_io import header_bytes
from memory_planner.quant_types import legal_type, qtype, tensor_nbytes

from ..llamacpp import SimulationError, simulated_context
from .memory import buffer_sums, logits_bytes

__all__ = ["Allocation", "SimulationError", "simulate_allocation", "write_sparse_gguf"]


@dataclass(frozen=True)
class Allocation:
    """Bytes llama.cpp allocates for one context: "model" is its weight buffers (the planned
    weights, padded as llama.cpp lays them out), "context" the KV cache or recurrent state,
    "compute" the scheduler's compute buffers, "output" the logits buffer."""

    model: int
    context: int
    compute: int
    output: int
    seconds: float = 0.0  # time the simulation took, header writing included

    @property
    def runtime_bytes(self) -> int:
        """What the runtime needs beside the weights."""
        return self.context + self.compute + self.output


def write_sparse_gguf(path: str | Path, adapter, types: Mapping[str, str] | None = None,
                      n_experts_kept: int | None = None) -> Path:
    """The GGUF `adapter` would export with `types` (tensor name -> GGUF type; default F16
    for quantizable tensors where the row length allows, F32 otherwise), metadata and a
    placeholder vocabulary, its tensor data a hole: a valid file for llama.cpp's `no_alloc`
    load, not for inference."""
    path = Path(path)
    specs = adapter.tensor_specs(n_experts_kept)
    w = gguf.GGUFWriter(path=None, arch=adapter.arch_name)
    adapter.add_metadata(w, n_experts_kept)
    vocab_key = gguf.Keys.LLM.VOCAB_SIZE.format(arch=adapter.arch_name)
    if not any(vocab_key in kv for kv in w.kv_data):
        w.add_vocab_size(adapter.n_vocab)
    w.add_tokenizer_model("none")  # placeholder vocabulary: vocab_size dummy tokens
    sizes = []
    for s in specs:
        t = (types or {}).get(s.name) or (legal_type("F16", s.row_length) if s.quantizable
                                          else "F32")
        nbytes = tensor_nbytes(s.n_elements, s.row_length, t)
        w.add_tensor_info(s.name, s.shape, np.dtype(np.float32), nbytes, raw_dtype=qtype(t))
        sizes.append(nbytes)
    header = header_bytes(w)
    align = w.data_alignment
    end = -(-len(header) // align) * align + sum(-(-n // align) * align for n in sizes)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(end)  # the data: a hole, no disk blocks
    return path


def simulate_allocation(adapter, *, ctx: int, kv_type: str = "f16", n_batch: int = 512,
                        n_ubatch: int = 512, flash_attn: bool = False,
                        types: Mapping[str, str] | None = None,
                        n_experts_kept: int | None = None) -> Allocation:
    """llama.cpp's allocation for the file `adapter` would export (with `types`, keeping
    `n_experts_kept` experts) run at context `ctx` with a `kv_type` cache, one sequence,
    `n_batch`/`n_ubatch` tokens per batch (clamped as llama-cpp-python does: n_batch <= ctx,
    n_ubatch <= n_batch) and flash attention on or off. Raises SimulationError where the
    pinned llama.cpp cannot load the architecture or refuses the context."""
    import llama_cpp

    from .model import kv_type_id

    t0 = time.perf_counter()
    n_batch = min(ctx, n_batch)
    # swa_full off: sliding-window layers (gpt-oss) cache their window only, as llama-server
    # and edgemoe's runtime allocate them (the C API's default is a full-size cache)
    fields = dict(n_ctx=ctx, n_batch=n_batch, n_ubatch=min(n_batch, n_ubatch), n_seq_max=1,
                  swa_full=False,
                  type_k=kv_type_id(kv_type), type_v=kv_type_id(kv_type),
                  flash_attn_type=llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    with tempfile.TemporaryDirectory(prefix="edgemoe-sim-") as tmp:
        try:
            path = write_sparse_gguf(Path(tmp) / "planned.gguf", adapter, types,
                                     n_experts_kept)
        except OSError as e:  # a file system without sparse files or this large a file
            raise SimulationError(f"cannot write the planned header in {tmp}: {e}") from e
        with simulated_context(path, **fields) as (model, ctx_ptr):
            sums = buffer_sums(ctx_ptr)
            n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    return Allocation(sums["model"], sums["context"], sums["compute"],
                      logits_bytes(int(n_vocab)), time.perf_counter() - t0)
