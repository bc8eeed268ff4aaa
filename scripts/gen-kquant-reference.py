#!/usr/bin/env python3
"""Writes fixtures/kquant-reference.json: random blocks of every ggml block type slmc
imports beyond Q4_0/Q4_1/Q8_0 (K-quants, Q5_0/Q5_1, IQ4_NL/IQ4_XS) and their values as
dequantized by gguf-py (llama.cpp's own Python package), the reference slmc's GGUF
dequantizers are tested against. Run in a venv with `pip install gguf numpy`."""
import json, os, sys
import numpy as np
from gguf import GGMLQuantizationType as T, quants
from gguf.constants import GGML_QUANT_SIZES

rng = np.random.default_rng(20261122)
out = {"generator": "gguf-py " + __import__("importlib.metadata").metadata.version("gguf"), "cases": []}
# Byte offsets of each type's f16 scales (overwritten with modest finite values so the
# random bytes decode to ordinary numbers).
F16_AT = {
    T.Q4_K: [0, 2], T.Q6_K: [208], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q2_K: [80, 82],
    T.Q3_K: [108], T.Q5_K: [0, 2], T.IQ4_NL: [0], T.IQ4_XS: [0],
}
for qtype, offsets in F16_AT.items():
    block_bytes = GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, size=3 * block_bytes, dtype=np.uint8)
    view = raw.reshape(3, block_bytes)
    for b in range(3):
        for at in offsets:
            sign = -1.0 if (qtype == T.Q5_1 and at == 2) else 1.0
            view[b, at:at + 2] = np.frombuffer(np.float16(sign * rng.uniform(0.001, 0.05)).tobytes(), np.uint8)
    values = quants.dequantize(raw, qtype).astype(np.float32).reshape(-1)
    out["cases"].append({"type": qtype.name, "bytes": raw.tolist(), "values": [float(v) for v in values]})
path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "fixtures", "kquant-reference.json")
with open(path, "w") as f:
    json.dump(out, f)
print("wrote", path)
