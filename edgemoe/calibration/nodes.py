"""llama.cpp graph nodes as the eval callback sees them: ggml's tensor struct through ctypes,
read and written on any backend (`Node`), and the MoE routing a layer's nodes hold.

The struct layout is the pinned ggml's (ggml/include/ggml.h); `ggml()` checks its size
against the library before first use, so a changed layout fails loudly.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass, field

import gguf
import numpy as np

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_OBJECT_SIZE = 32  # struct ggml_object: offs, size, next, type + 4 bytes padding


class GGMLTensor(ctypes.Structure):
    """`struct ggml_tensor` (ggml/include/ggml.h); checked against ggml at first use."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


NAME_OFFSET = GGMLTensor.name.offset

# element types a node can be read as; quantized nodes are only available as raw bytes
_DTYPES: dict[gguf.GGMLQuantizationType, type] = {
    gguf.GGMLQuantizationType.F32: np.float32,
    gguf.GGMLQuantizationType.F16: np.float16,
    gguf.GGMLQuantizationType.F64: np.float64,
    gguf.GGMLQuantizationType.I8: np.int8,
    gguf.GGMLQuantizationType.I16: np.int16,
    gguf.GGMLQuantizationType.I32: np.int32,
    gguf.GGMLQuantizationType.I64: np.int64,
    gguf.GGMLQuantizationType.BF16: np.uint16,  # bit patterns; read() widens to float32
}
_NP_DTYPES = {int(t): np.dtype(d) for t, d in _DTYPES.items()}


class HookError(RuntimeError):
    """A handler failed, or llama.cpp's structures are not what this module was written for."""


_checked_layout = False


def ggml() -> ctypes.CDLL:
    """libggml-base (`export.ggml.library`: the copy libllama links, one ggml in the
    process), after checking that `GGMLTensor` matches this ggml's struct ggml_tensor."""
    global _checked_layout
    from export.ggml import library

    lib = library()
    if not _checked_layout:
        got = lib.ggml_tensor_overhead() - GGML_OBJECT_SIZE
        if got != ctypes.sizeof(GGMLTensor):
            raise HookError(f"struct ggml_tensor is {got} bytes in this ggml, "
                            f"{ctypes.sizeof(GGMLTensor)} in edgemoe.calibration.hooks: "
                            "layout changed")
        _checked_layout = True
    return lib




def split_name(name: str) -> tuple[str, int | None]:
    """`ffn_moe_topk-5` -> ("ffn_moe_topk", 5); a name without a layer suffix -> (name, None)."""
    base, sep, tail = name.rpartition("-")
    if sep and tail.isdigit():
        return base, int(tail)
    return name, None


_WEIGHT_LAYER = re.compile(r"^blk\.(\d+)\.")


def shifted(name: str, offset: int) -> str:
    """`name` in a model whose blocks start at block `offset` of the whole model (a layer
    segment, `edgemoe.calibration.segments`): `Qcur-0` -> `Qcur-40`, `blk.0.attn_q.weight`
    -> `blk.40.attn_q.weight`; other names unchanged."""
    if not offset:
        return name
    base, layer = split_name(name)
    if layer is not None:
        return f"{base}-{layer + offset}"
    return _WEIGHT_LAYER.sub(lambda m: f"blk.{int(m[1]) + offset}.", name, count=1)


class Node:
    """A graph node seen from a handler. Valid only during the handler call."""

    def __init__(self, ptr: int, name: str | None = None, offset: int = 0):
        self.ptr = ptr
        self.t = t = GGMLTensor.from_address(ptr)
        # names (and layers) are the whole model's: `offset` is the first block of a segment
        self.offset = offset
        self.name = shifted(t.name.decode(errors="replace"), offset) if name is None else name
        self.kind, self.layer = split_name(self.name)
        self.type = t.type
        self.ne = tuple(t.ne)  # element counts in ggml order (ne[0] is the row length)
        self.nb = tuple(t.nb)
        self.shape = self.ne[::-1]  # what read() returns: (ne[3], ne[2], ne[1], ne[0])
        self._dtype = _NP_DTYPES.get(self.type)

    def memset(self, value: int, offset: int, size: int) -> None:
        """Set `size` bytes at byte `offset` of the node's data to `value` (no read)."""
        ggml().ggml_backend_tensor_memset(self.ptr, value, offset, size)

    @property
    def type_name(self) -> str:
        return gguf.GGMLQuantizationType(self.type).name

    @property
    def op_name(self) -> str:
        """ggml's name of the operation that computed the node ("MUL_MAT", "RMS_NORM" ...)."""
        return ggml().ggml_op_name(self.t.op).decode()

    @property
    def nbytes(self) -> int:
        """Bytes spanned by the node's data (with the gaps of a strided view)."""
        return int(ggml().ggml_nbytes(self.ptr))

    def src(self, i: int) -> Node | None:
        p = self.t.src[i]
        return Node(p, offset=self.offset) if p else None

    def read_raw(self) -> np.ndarray:
        """The bytes the node spans, as uint8 (any type, quantized included)."""
        buf = np.empty(self.nbytes, np.uint8)
        ggml().ggml_backend_tensor_get(self.ptr, buf.ctypes.data, 0, buf.nbytes)
        return buf

    def _strided(self, raw: np.ndarray) -> np.ndarray:
        if self._dtype is None:
            raise HookError(f"{self.name} is {self.type_name}; only read_raw() reads it")
        return np.ndarray(self.shape, self._dtype, buffer=raw, strides=self.nb[::-1])

    @property
    def contiguous(self) -> bool:
        """Elements packed in ggml order, no gaps (not a strided or permuted view)."""
        if self._dtype is None:
            return False
        step = self._dtype.itemsize
        for n, b in zip(self.ne, self.nb):
            if n > 1 and b != step:
                return False
            step *= n
        return True

    def read(self) -> np.ndarray:
        """A copy of the node, shape (ne[3], ne[2], ne[1], ne[0]); BF16 comes as float32."""
        raw = self.read_raw()
        if self.contiguous:
            out = raw.view(self._dtype).reshape(self.shape)
        else:
            out = np.array(self._strided(raw))
        if self.type == gguf.GGMLQuantizationType.BF16:
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out

    def matrix(self) -> np.ndarray:
        """The node as rows of ne[0] elements: (ne[1] * ne[2] * ne[3], ne[0])."""
        return self.read().reshape(-1, self.ne[0])

    def write(self, values) -> None:
        """Write `values` (broadcast to read()'s shape) into the node; strides respected."""
        if self._dtype is None or self.type == gguf.GGMLQuantizationType.BF16:
            raise HookError(f"{self.name}: writing {self.type_name} nodes is not supported")
        nbytes = self.nbytes
        if self.contiguous:
            raw = np.ascontiguousarray(np.broadcast_to(values, self.shape), self._dtype)
        else:  # a strided view spans gaps that belong to other data: keep them as they are
            raw = self.read_raw()
            self._strided(raw)[...] = values
        ggml().ggml_backend_tensor_set(self.ptr, raw.ctypes.data, 0, nbytes)

    def __repr__(self) -> str:
        return f"Node({self.name!r}, {self.type_name}, ne={self.ne})"


@dataclass(frozen=True)
class GraphNodes:
    """Where an architecture's llama.cpp graph (src/models/*.cpp) shows what calibration
    reads: node name -> the tensor kinds of the same block that read it, the routed experts'
    input rows, and the architecture's own names for the other nodes it reads (the common
    spelling -> this graph's)."""

    dense: dict[str, tuple[str, ...]]
    ffn_input: str = "ffn_norm"
    renamed: dict[str, str] = field(default_factory=dict)

    def name(self, common: str) -> str:
        """This graph's name of the node commonly called `common`."""
        return self.renamed.get(common, common)


_DEFAULT_DENSE = {"attn_norm": ("attn_q", "attn_k", "attn_v"), "kqv_out": ("attn_output",)}
_DEFAULT_NODES = GraphNodes(_DEFAULT_DENSE)
_ARCH_NODES = {
    # src/models/qwen35moe.cpp: attn_norm feeds the DeltaNet projections or Q/K/V; the gated
    # attention output feeds attn_output, the gated-normed DeltaNet output ssm_out; the MoE
    # reads the post-attention norm
    "qwen35moe": GraphNodes({"attn_norm": ("attn_q", "attn_k", "attn_v", "attn_qkv",
                                           "attn_gate", "ssm_alpha", "ssm_beta"),
                             "attn_gated": ("attn_output",), "final_output": ("ssm_out",)},
                            "attn_post_norm"),
    # src/models/openai-moe.cpp: the FFN input is "attn_post_norm", the experts' activation
    # the clamped "ffn_moe_swiglu_oai", and each expert's output gets its bias after
    # "ffn_moe_down" ("ffn_moe_down_biased"); its `ffn_moe_weights` are the raw top-k router
    # logits, the weights used the later "ffn_moe_weights_softmax"
    "gpt-oss": GraphNodes(_DEFAULT_DENSE, "attn_post_norm",
                          {"ffn_moe_swiglu": "ffn_moe_swiglu_oai",
                           "ffn_moe_down": "ffn_moe_down_biased"}),
    # src/models/glm4-moe.cpp names the experts' input "post_attn_norm"
    "glm4moe": GraphNodes(_DEFAULT_DENSE, "post_attn_norm"),
}


def graph_nodes(arch: str) -> GraphNodes:
    """The node names of llama.cpp arch `arch` (a GGUF general.architecture)."""
    return _ARCH_NODES.get(arch, _DEFAULT_NODES)


@dataclass
class Routing:
    """The experts chosen for a batch at one layer: ids and router weights, (n_tokens, k)."""

    layer: int
    ids: np.ndarray  # int32, column 0 is the top choice of the router
    weights: np.ndarray  # float32, before renormalisation


def moe_routing(weights_node: Node) -> Routing:
    """Routing of an `ffn_moe_weights` node (F32 [1, k, n_tokens]) and its `ffn_moe_topk`."""
    topk = weights_node.src(1)
    if topk is None or split_name(topk.name)[0] != "ffn_moe_topk":
        got = None if topk is None else topk.name
        raise HookError(f"{weights_node.name}: src[1] is {got}, expected ffn_moe_topk")
    k, n = weights_node.ne[1], weights_node.ne[2]
    return Routing(weights_node.layer, topk.read().reshape(n, k),
                   weights_node.read().reshape(n, k))
