"""Architecture adapters, one module per Hugging Face `model_type`."""

from __future__ import annotations

from .base import (
    Adapter,
    IncompleteCheckpointError,
    TensorRecipe,
    UnsupportedModelError,
)
from .deepseek2 import DeepseekV2Adapter, DeepseekV3Adapter
from .deepseek_v32 import DeepseekV32Adapter
from .from_gguf import GGUFAdapter
from .glm4_moe import Glm4MoeAdapter
from .gpt_oss import GptOssAdapter
from .minimax_m2 import MiniMaxM2Adapter
from .mixtral import MixtralAdapter
from .olmoe import OlmoeAdapter
from .qwen2_moe import Qwen2MoeAdapter
from .qwen3_5_moe import Qwen35MoeAdapter, Qwen35MoeTextAdapter
from .qwen3_moe import Qwen3MoeAdapter

ADAPTERS: dict[str, type[Adapter]] = {
    a.model_type: a
    for a in (Qwen3MoeAdapter, MixtralAdapter, DeepseekV3Adapter, DeepseekV2Adapter,
              Qwen2MoeAdapter, OlmoeAdapter, Qwen35MoeAdapter, Qwen35MoeTextAdapter,
              GptOssAdapter, Glm4MoeAdapter, MiniMaxM2Adapter, DeepseekV32Adapter)
}


def adapter_for(config: dict) -> Adapter:
    """The adapter for a config.json dict; UnsupportedModelError names what is supported."""
    model_type = config.get("model_type")
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"unknown architecture {model_type!r} (architectures: "
            f"{config.get('architectures')}); edgemoe supports: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type](config)


def adapter_for_source(source) -> Adapter:
    """The adapter for an opened source: a GGUF describes itself, an HF checkpoint through
    its config.json."""
    if source.kind == "gguf":
        return GGUFAdapter.from_source(source)
    return adapter_for(source.config)


__all__ = [
    "ADAPTERS", "Adapter", "GGUFAdapter", "IncompleteCheckpointError", "TensorRecipe",
    "UnsupportedModelError", "adapter_for", "adapter_for_source",
]
