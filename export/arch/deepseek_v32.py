"""DeepSeek-V3.2 (HF `deepseek_v32`) -> GGUF arch `deepseek32`.

V3's MLA and MoE (export.arch.deepseek2) plus DeepSeek Sparse Attention: per block a
lightning indexer (`indexer.attn_q_b` from the Q latent, `indexer.attn_k` and its LayerNorm
`indexer.k_norm` weight and bias, the per-head weights `indexer.proj`) picks `index_topk`
keys for every query. llama.cpp caches the indexer's key (one head of index_head_dim per
token and block) beside MLA's latent, in the same KV type.

As llama.cpp's converter (conversion/deepseek.py, DeepseekV32Model) writes it, the NextN
(MTP) block after the trunk is exported with its own embedding and head
(`nextn_predict_layers`); llama.cpp's decode neither runs nor caches it. A pruned file leaves
it out, as the converter's `--no-mtp` does (expert_count is one number for every block).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import gguf

from memory_planner.quant_types import kv_bytes_per_element
from memory_planner.types import TensorSpec

from .base import blk_spec
from .deepseek2 import DeepseekHParams, DeepseekV3Adapter
from .hparams import config_value


@dataclass(frozen=True, kw_only=True)
class DsaHParams(DeepseekHParams):
    index_n_heads: int
    index_head_dim: int
    index_topk: int


class DeepseekV32Adapter(DeepseekV3Adapter):
    model_type = "deepseek_v32"
    # gguf-py 0.19.0 (pinned) predates MODEL_ARCH.DEEPSEEK32; GLM_DSA's tensor table is the
    # same one (MLA, DSA indexer, NextN), so it names the tensors and "deepseek32" the file
    arch = gguf.MODEL_ARCH.GLM_DSA
    hp: DsaHParams

    @property
    def arch_name(self) -> str:
        return "deepseek32"

    @classmethod
    def parse(cls, config: dict) -> DsaHParams:
        v3 = super().parse(config)
        return DsaHParams(
            **{f.name: getattr(v3, f.name) for f in fields(v3) if f.name != "n_nextn"},
            n_nextn=int(config_value(config, "num_nextn_predict_layers", default=0)),
            index_n_heads=int(config_value(config, "index_n_heads")),
            index_head_dim=int(config_value(config, "index_head_dim")),
            index_topk=int(config_value(config, "index_topk")),
        )

    def nextn_blocks(self, n_experts_kept: int) -> int:
        return self.hp.n_nextn if n_experts_kept == self.hp.n_expert else 0

    # ---- GGUF tensors
    def tensor_specs(self, n_experts_kept: int | None = None) -> list[TensorSpec]:
        """V3's tensors with the indexer in every block, then (unpruned) the NextN blocks."""
        hp = self.hp
        E = n_experts_kept or hp.n_expert
        d, V = hp.n_embd, hp.n_vocab
        specs = [TensorSpec("token_embd.weight", (V, d), "token_embd")]
        for i in range(hp.n_layer + self.nextn_blocks(E)):
            specs += self._attention(i) + self._indexer(i)
            specs += self._dense_ffn(i) if i < hp.n_dense_lead else self._moe_ffn(i, E)
            if i >= hp.n_layer:
                specs += [
                    blk_spec(i, "nextn.eh_proj", (d, 2 * d)),
                    blk_spec(i, "nextn.embed_tokens", (V, d)),
                    blk_spec(i, "nextn.enorm", (d,), quantizable=False),
                    blk_spec(i, "nextn.hnorm", (d,), quantizable=False),
                    blk_spec(i, "nextn.shared_head_head", (V, d)),
                    blk_spec(i, "nextn.shared_head_norm", (d,), quantizable=False),
                ]
        specs += self.head_specs()
        return specs

    def _indexer(self, i: int) -> list[TensorSpec]:
        hp = self.hp
        d, n, k = hp.n_embd, hp.index_n_heads, hp.index_head_dim
        return [
            blk_spec(i, "indexer.k_norm", (k,), quantizable=False),
            blk_spec(i, "indexer.k_norm", (k,), quantizable=False, suffix="bias"),
            blk_spec(i, "indexer.proj", (n, d)),  # llama-quantize quantizes these for deepseek32
            blk_spec(i, "indexer.attn_k", (k, d)),
            blk_spec(i, "indexer.attn_q_b", (n * k, hp.q_lora_rank)),
        ]

    def ignores(self, hf_name: str) -> bool:
        """Only the base's ignored tensors: the NextN blocks are exported (V3 drops them)."""
        return super(DeepseekV3Adapter, self).ignores(hf_name)

    def moe_layers(self) -> list[int]:
        """The trunk's MoE blocks (pruning leaves the NextN block out of the file)."""
        return list(range(self.hp.n_dense_lead, self.hp.n_layer))

    # ---- memory
    def kv_bytes(self, ctx: int, kv_type: str = "f16") -> int:
        """MLA's latent (kv_lora_rank + qk_rope_dim) and the indexer's key (index_head_dim)
        per token and trunk block, both K-only and in the cache type (llama_kv_cache_dsa)."""
        hp = self.hp
        per_token = hp.n_layer * (hp.head_dim + hp.index_head_dim)
        return int(round(per_token * ctx * kv_bytes_per_element(kv_type)))

    # ---- metadata
    def add_metadata(self, w: gguf.GGUFWriter, n_experts_kept: int | None = None) -> None:
        """V3's keys, the NextN block count and the indexer's, as the converter writes them."""
        super().add_metadata(w, n_experts_kept)
        hp = self.hp
        if nextn := self.nextn_blocks(n_experts_kept or hp.n_expert):
            w.add_nextn_predict_layers(nextn)
        w.add_indexer_head_count(hp.index_n_heads)
        w.add_indexer_key_length(hp.index_head_dim)
        w.add_indexer_top_k(hp.index_topk)
