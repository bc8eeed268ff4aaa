#!/usr/bin/env python3
"""Writes a Phi-3.5-mini-shaped random checkpoint as a Q4_0 GGUF (issue 18: the 4B class).

    scripts/gen-phi35-class.py OUT.gguf [--layers 32] [--seed 1]

Shape of Phi-3.5-mini-instruct (3.8B parameters): hidden 3072, 32 layers, 32 heads of 96
(no grouping), feed-forward 8192 (fused gate/up as llama.cpp stores Phi-3), vocabulary 32064,
RMSNorm, rotary over the whole head. The rotary scaling is plain (a 4096-position context,
Phi-3-mini-4k's): slmc refuses LongRoPE past its original length in compiled caches, and
the scaling does not change the bytes a compile moves. Linear weights and the output head
are Q4_0, the token embedding Q8_0, norms f32; codes are random bytes from `--seed`, block
scales fixed so activations stay in range. No tokenizer (slmc's smoke set then uses
synthetic ids). Pure Python, no numpy: 2.2 GB in well under a minute.
"""

import argparse
import math
import random
import struct

ALIGN = 32
GGML_F32, GGML_Q4_0, GGML_Q8_0 = 0, 2, 8
HIDDEN, FF, HEADS, HEAD_DIM, VOCAB, CONTEXT = 3072, 8192, 32, 96, 32064, 4096


def put_str(out, s):
    b = s.encode()
    out += struct.pack("<Q", len(b)) + b


def meta(out, key, value):
    put_str(out, key)
    if isinstance(value, str):
        out += struct.pack("<I", 8)
        put_str(out, value)
    elif isinstance(value, float):
        out += struct.pack("<If", 6, value)
    else:
        out += struct.pack("<II", 4, value)


def blocks(rng, rows, cols, kind):
    """Row-major quantized bytes: Q4_0 (f16 scale + 16 bytes of nibbles a 32-block) or Q8_0."""
    n = rows * cols // 32
    if kind == GGML_Q4_0:
        # Codes 0..15 around 8: weights in [-8d, 7d], std about 4.6 d.
        scale, stride, code_bytes = 0.004, 18, 16
    else:
        scale, stride, code_bytes = 0.0004, 34, 32
    out = bytearray(n * stride)
    d = struct.pack("<e", scale)
    out[0::stride] = d[0:1] * n
    out[1::stride] = d[1:2] * n
    codes = rng.randbytes(n * code_bytes)
    for j in range(code_bytes):
        out[2 + j :: stride] = codes[j::code_bytes]
    return bytes(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    tensors = [("token_embd.weight", (VOCAB, HIDDEN), GGML_Q8_0)]
    for b in range(args.layers):
        tensors += [
            (f"blk.{b}.attn_norm.weight", (HIDDEN,), GGML_F32),
            (f"blk.{b}.attn_qkv.weight", (3 * HIDDEN, HIDDEN), GGML_Q4_0),
            (f"blk.{b}.attn_output.weight", (HIDDEN, HIDDEN), GGML_Q4_0),
            (f"blk.{b}.ffn_norm.weight", (HIDDEN,), GGML_F32),
            (f"blk.{b}.ffn_up.weight", (2 * FF, HIDDEN), GGML_Q4_0),
            (f"blk.{b}.ffn_down.weight", (HIDDEN, FF), GGML_Q4_0),
        ]
    tensors += [("output_norm.weight", (HIDDEN,), GGML_F32), ("output.weight", (VOCAB, HIDDEN), GGML_Q4_0)]

    def size(shape, kind):
        n = 1
        for d in shape:
            n *= d
        return {GGML_F32: n * 4, GGML_Q4_0: n // 32 * 18, GGML_Q8_0: n // 32 * 34}[kind]

    md = [
        ("general.architecture", "phi3"),
        ("general.name", "phi35-class-random"),
        ("phi3.context_length", CONTEXT),
        ("phi3.embedding_length", HIDDEN),
        ("phi3.feed_forward_length", FF),
        ("phi3.block_count", args.layers),
        ("phi3.attention.head_count", HEADS),
        ("phi3.attention.head_count_kv", HEADS),
        ("phi3.attention.layer_norm_rms_epsilon", 1e-5),
        ("phi3.rope.dimension_count", HEAD_DIM),
        ("phi3.rope.freq_base", 10000.0),
        ("tokenizer.ggml.bos_token_id", 1),
        ("tokenizer.ggml.eos_token_id", 32000),
    ]
    head = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(md)))
    for k, v in md:
        meta(head, k, v)
    offset = 0
    for name, shape, kind in tensors:
        put_str(head, name)
        head += struct.pack("<I", len(shape))
        for d in reversed(shape):
            head += struct.pack("<Q", d)
        head += struct.pack("<IQ", kind, offset)
        offset += (size(shape, kind) + ALIGN - 1) // ALIGN * ALIGN
    head += b"\0" * (-len(head) % ALIGN)
    with open(args.out, "wb") as f:
        f.write(head)
        for name, shape, kind in tensors:
            if kind == GGML_F32:
                data = struct.pack("<f", 1.0) * shape[0]
            else:
                data = blocks(rng, shape[0], shape[1], kind)
            f.write(data)
            f.write(b"\0" * (-len(data) % ALIGN))
    params = sum(math.prod(s) for _, s, _ in tensors)
    print(f"wrote {args.out}: {params / 1e9:.2f}B parameters, {len(head) + offset} bytes")


if __name__ == "__main__":
    main()
