#!/usr/bin/env python3
"""Writes fixtures/kquant-reference.json: random Q4_K and Q6_K blocks and their values as
dequantized by gguf-py (llama.cpp's own Python package), the reference slmc's GGUF
dequantizers are tested against. Run in a venv with `pip install gguf numpy`."""
import json, os, sys
import numpy as np
from gguf import GGMLQuantizationType, quants

rng = np.random.default_rng(20261122)
out = {"generator": "gguf-py " + __import__("importlib.metadata").metadata.version("gguf"), "cases": []}
for qtype, block_bytes in [(GGMLQuantizationType.Q4_K, 144), (GGMLQuantizationType.Q6_K, 210)]:
    raw = rng.integers(0, 256, size=2 * block_bytes, dtype=np.uint8)
    # Keep the f16 scales finite and modest: overwrite them with real f16 values.
    view = raw.reshape(2, block_bytes)
    for b in range(2):
        if qtype == GGMLQuantizationType.Q4_K:
            view[b, 0:2] = np.frombuffer(np.float16(rng.uniform(0.001, 0.05)).tobytes(), np.uint8)
            view[b, 2:4] = np.frombuffer(np.float16(rng.uniform(0.001, 0.05)).tobytes(), np.uint8)
        else:
            view[b, 208:210] = np.frombuffer(np.float16(rng.uniform(0.001, 0.05)).tobytes(), np.uint8)
    values = quants.dequantize(raw, qtype).astype(np.float32).reshape(-1)
    out["cases"].append({"type": qtype.name, "bytes": raw.tolist(), "values": [float(v) for v in values]})
path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "fixtures", "kquant-reference.json")
with open(path, "w") as f:
    json.dump(out, f)
print("wrote", path)
