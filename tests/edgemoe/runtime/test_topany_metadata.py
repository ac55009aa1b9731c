"""Top-any thresholds in GGUF metadata: stored, read back, used; the user's spec of them."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from edgemoe.llamacpp import eval_logits, open_llama, tokenize
from edgemoe.runtime import topany_metadata
from edgemoe.runtime.model import load
from tests.helpers import PROMPT


def test_thresholds_stored_in_the_file_are_used(ggufs, tmp_path):
    src = ggufs["qwen3"]
    dst = tmp_path / "with-tau.gguf"
    topany_metadata.write_top_any(src, dst, [0.3, 0.6], {"note": "test"})
    tau, info = topany_metadata.read_top_any(dst)
    assert tau.tolist() == pytest.approx([0.3, 0.6]) and info == {"note": "test"}
    # the rest of the file is unchanged
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a.tensors, b.tensors))
    tokens = tokenize(src, PROMPT, 48)
    stored = load(dst, threads=1, n_ctx=64, logits_all=True)
    explicit = load(src, threads=1, top_any=[0.3, 0.6], n_ctx=64, logits_all=True)
    np.testing.assert_array_equal(eval_logits(stored, tokens), eval_logits(explicit, tokens))
    assert 0 < stored.expert_use.removed_share < 0.5
    off = load(dst, threads=1, top_any="off", n_ctx=64, logits_all=True)
    np.testing.assert_array_equal(eval_logits(off, tokens),
                                  eval_logits(open_llama(src, n_ctx=64, threads=1), tokens))


def test_add_top_any_metadata_for_the_exporter(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "m.gguf", arch="qwen3moe")
    topany_metadata.add_top_any_metadata(w, [0.0, 0.25], {"share": 0.2})
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    tau, info = topany_metadata.read_top_any(tmp_path / "m.gguf")
    assert tau.dtype == np.float32 and tau.tolist() == [0.0, 0.25] and info == {"share": 0.2}
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        topany_metadata.add_top_any_metadata(w, [1.5])


def test_parse_spec():
    stored = np.array([0.1, 0.2], np.float32)
    assert topany_metadata.parse_spec(None, 2, stored) is stored
    assert topany_metadata.parse_spec("file", 2, None) is None
    assert topany_metadata.parse_spec("off", 2, stored).tolist() == [0, 0]
    assert topany_metadata.parse_spec("0.25", 2, None).tolist() == [0.25, 0.25]
    assert topany_metadata.parse_spec("0,0.5", 2, None).tolist() == [0, 0.5]
    with pytest.raises(ValueError, match="3 top-any thresholds given, the model has 2"):
        topany_metadata.parse_spec([0.1, 0.1, 0.1], 2, None)
    with pytest.raises(ValueError, match="cannot read top-any spec"):
        topany_metadata.parse_spec("lots", 2, None)
