"""Running an exported GGUF in llama.cpp, and measuring what a user of the file gets.

- `model`: `load`, an `EdgeLlama` (a `llama_cpp.Llama`) with top-any thresholds active.
- `memory`: what llama.cpp allocated (model, KV, compute and output buffers), process memory.
- `topany`: the top-any rule in the graph; `topany_metadata`: its thresholds in a GGUF;
  `topany_calibrate`: choosing the thresholds on calibration text.
- `textscore`: perplexity, KL divergence and top-1 agreement on text.
- `validate`: quality, speed and memory of a file, as the `validate` verb reports them.
- `serve`: an OpenAI-compatible server (llama-cpp-python's) with the thresholds active.
"""
