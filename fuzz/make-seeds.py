#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora, fuzz/corpus/<target>/ (see fuzz/README.md).

Small valid inputs of every format slmc reads from untrusted files, built here from the
formats' specifications and the repository's own material (tiny checkpoints in fixtures/,
the IR filetests in passes/filetests/, SmolLM2's chat template from
../shared/golden/smollm2-135m-gguf-facts.json), plus a few hand-made hostile ones
(truncated, lying counts and lengths, paths that leave their directory). Deterministic:
rerunning rewrites the same bytes. Only files this script names are written; anything
else in the corpus folders (inputs merged from fuzzing runs) is left alone.

Input layouts (as compiler/src/fuzzing.rs splits them):
  gguf                a .gguf file
  safetensors_config  config.json NUL model.safetensors.index.json (empty: none) NUL model.safetensors
  tokenizer_files     tokenizer.json NUL tokenizer_config.json (empty: none) NUL text / chat_template.jinja
  ir_text             IR text
  bundle_json         a manifest.json or artifact.json
  coreml              u32 LE length of model.mlmodel, model.mlmodel, weight.bin

Run from anywhere: python3 fuzz/make-seeds.py
"""

import hashlib
import json
import os
import random
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CORPUS = os.path.join(HERE, "corpus")
MAX_SEED = 200 * 1024
written = {}


def out(target, name, data):
    if isinstance(data, str):
        data = data.encode()
    assert len(data) <= MAX_SEED, f"{target}/{name}: {len(data)} bytes"
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
    written.setdefault(target, []).append((name, len(data)))


rng = random.Random(20240601)


def floats(n, scale=0.1):
    return [rng.uniform(-scale, scale) for _ in range(n)]


def smollm2_template():
    with open(os.path.join(ROOT, "..", "shared", "golden", "smollm2-135m-gguf-facts.json")) as f:
        return json.load(f)["summary"]["chat_template"]


# ---------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}
# ggml type id: (block elements, block bytes)
GGML = {0: (1, 4), 1: (1, 2), 30: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34), 12: (256, 144), 14: (256, 210)}
T_F32, T_F16, T_BF16, T_Q4_0, T_Q4_1, T_Q8_0, T_Q4_K, T_Q6_K = 0, 1, 30, 2, 3, 8, 12, 14


def gstr(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gval(ty, v):
    if ty == STR:
        return gstr(v)
    if ty == ARR:
        elem, items = v
        return struct.pack("<IQ", elem, len(items)) + b"".join(gval(elem, i) for i in items)
    return struct.pack(SCALAR[ty], v)


def f32_bytes(values):
    return struct.pack(f"<{len(values)}f", *values)


def f16_bytes(values):
    return struct.pack(f"<{len(values)}e", *values)


def bf16_bytes(values):
    return b"".join(struct.pack("<I", struct.unpack("<I", struct.pack("<f", v))[0])[2:] for v in values)


def tensor_data(ggml_type, n):
    if ggml_type == T_F32:
        return f32_bytes(floats(n))
    if ggml_type == T_F16:
        return f16_bytes(floats(n))
    if ggml_type == T_BF16:
        return bf16_bytes(floats(n))
    block_len, block_bytes = GGML[ggml_type]
    assert n % block_len == 0
    out_ = bytearray()
    for _ in range(n // block_len):
        block = bytearray(rng.getrandbits(8) for _ in range(block_bytes))
        block[0:2] = struct.pack("<e", 0.01)  # a sane scale (d) first in every block type used here
        out_ += block
    return bytes(out_)


def gguf(metadata, tensors, version=3, alignment=32):
    """metadata: [(key, type, value)]; tensors: [(name, ne (fastest first), ggml type, data or None)]."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata))
    kv = b"".join(gstr(k) + struct.pack("<I", t) + gval(t, v) for k, t, v in metadata)
    infos, blobs, offset = b"", [], 0
    for name, ne, ty, data in tensors:
        n = 1
        for d in ne:
            n *= d
        if data is None:
            data = tensor_data(ty, n)
        infos += gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        infos += struct.pack("<IQ", ty, offset)
        pad = (-len(data)) % alignment
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
    body = head + kv + infos
    body += b"\0" * ((-len(body)) % alignment)
    return body + b"".join(blobs)


def gguf_model(arch, d, hq, hk, hd, ff, blocks, vocab, *, tied=True, types=None, extra_md=(), extra_tensors=(),
               qk_norm=False, biases=False, fused=False, layernorm=False, sandwich=False, tokenizer=(), key_length=None):
    """A GGUF of `arch` whose every tensor is the one slmc's lowering asks for."""
    t = {"embed": T_F16, "norm": T_F32, "attn": T_F32, "ffn": T_F32, "out": T_F32}
    t.update(types or {})
    md = [("general.architecture", STR, arch), ("general.name", STR, f"tiny {arch}"),
          (f"{arch}.block_count", U32, blocks), (f"{arch}.context_length", U32, 128),
          (f"{arch}.embedding_length", U32, d), (f"{arch}.feed_forward_length", U32, ff),
          (f"{arch}.attention.head_count", U32, hq), (f"{arch}.attention.head_count_kv", U32, hk),
          (f"{arch}.rope.freq_base", F32, 10000.0)]
    if key_length:
        md.append((f"{arch}.attention.key_length", U32, key_length))
    eps = "attention.layer_norm_epsilon" if layernorm else "attention.layer_norm_rms_epsilon"
    md.append((f"{arch}.{eps}", F32, 1e-5))
    md += list(extra_md) + list(tokenizer)
    ts = [("token_embd.weight", [d, vocab], t["embed"], None), ("output_norm.weight", [d], T_F32, None)]
    if layernorm:
        ts.append(("output_norm.bias", [d], T_F32, None))
    if not tied:
        ts.append(("output.weight", [d, vocab], t["out"], None))
    for b in range(blocks):
        p = f"blk.{b}."
        ts.append((p + "attn_norm.weight", [d], T_F32, None))
        if layernorm:
            ts.append((p + "attn_norm.bias", [d], T_F32, None))
        if fused:
            ts.append((p + "attn_qkv.weight", [d, (hq + 2 * hk) * hd], t["attn"], None))
        else:
            ts.append((p + "attn_q.weight", [d, hq * hd], t["attn"], None))
            ts.append((p + "attn_k.weight", [d, hk * hd], t["attn"], None))
            ts.append((p + "attn_v.weight", [d, hk * hd], t["attn"], None))
        if biases:
            ts.append((p + "attn_q.bias", [hq * hd], T_F32, None))
            ts.append((p + "attn_k.bias", [hk * hd], T_F32, None))
            ts.append((p + "attn_v.bias", [hk * hd], T_F32, None))
        if qk_norm:
            ts.append((p + "attn_q_norm.weight", [hd], T_F32, None))
            ts.append((p + "attn_k_norm.weight", [hd], T_F32, None))
        ts.append((p + "attn_output.weight", [hq * hd, d], t["attn"], None))
        if sandwich:
            ts.append((p + "post_attention_norm.weight", [d], T_F32, None))
        ts.append((p + "ffn_norm.weight", [d], T_F32, None))
        if layernorm:
            ts.append((p + "ffn_norm.bias", [d], T_F32, None))
        if fused:
            ts.append((p + "ffn_up.weight", [d, 2 * ff], t["ffn"], None))
        else:
            ts.append((p + "ffn_gate.weight", [d, ff], t["ffn"], None))
            ts.append((p + "ffn_up.weight", [d, ff], t["ffn"], None))
        ts.append((p + "ffn_down.weight", [ff, d], t["ffn"], None))
        if sandwich:
            ts.append((p + "post_ffw_norm.weight", [d], T_F32, None))
    ts += list(extra_tensors)
    return md, ts


BPE_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "H", "e", "l", "o", "\u0120", "w", "r", "d", "!",
              "1", "2", "3", "He", "ll", "llo", "Hello", "\u0120w", "or", "\u0120wor", "ld", "\u0120world", "u", "s",
              "\u010a", "i", "m", "a", "t", "n"]
BPE_MERGES = ["H e", "l l", "ll o", "He llo", "\u0120 w", "o r", "\u0120w or", "l d", "\u0120wor ld"]


def gpt2_tokenizer(pre="smollm", add_bos=False, template=True, tokens=BPE_TOKENS):
    md = [("tokenizer.ggml.model", STR, "gpt2"), ("tokenizer.ggml.pre", STR, pre),
          ("tokenizer.ggml.tokens", ARR, (STR, tokens)),
          ("tokenizer.ggml.token_type", ARR, (I32, [3, 3, 3] + [1] * (len(tokens) - 3))),
          ("tokenizer.ggml.merges", ARR, (STR, BPE_MERGES)),
          ("tokenizer.ggml.bos_token_id", U32, 1), ("tokenizer.ggml.eos_token_id", U32, 2),
          ("tokenizer.ggml.add_bos_token", BOOL, add_bos)]
    if template:
        md.append(("tokenizer.chat_template", STR, smollm2_template()))
    return md


GEMMA_TOKENS = (["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
                + [f"<0x{b:02X}>" for b in (0x0A, 0x20, 0x21, 0xC3, 0xA9)]
                + ["\u2581", "H", "e", "l", "o", "\u2581H", "He", "ll", "llo", "Hello", "\u2581Hello", "  ", "w",
                   "r", "d", "wo", "rld", "world", "\u2581world", "\u2581\u2581"])
GEMMA_TYPES = [3, 3, 3, 2, 4, 3, 3] + [6] * 5 + [1] * 20


def gemma_tokenizer():
    assert len(GEMMA_TOKENS) == len(GEMMA_TYPES)
    return [("tokenizer.ggml.model", STR, "llama"), ("tokenizer.ggml.pre", STR, "default"),
            ("tokenizer.ggml.tokens", ARR, (STR, GEMMA_TOKENS)),
            ("tokenizer.ggml.scores", ARR, (F32, [-float(i) for i in range(len(GEMMA_TOKENS))])),
            ("tokenizer.ggml.token_type", ARR, (I32, GEMMA_TYPES)),
            ("tokenizer.ggml.bos_token_id", U32, 2), ("tokenizer.ggml.eos_token_id", U32, 1),
            ("tokenizer.ggml.unknown_token_id", U32, 3), ("tokenizer.ggml.add_bos_token", BOOL, True)]


def llama3_factors(theta, dim, factor=32.0, low=1.0, high=4.0, old=8192.0):
    """The rope_freqs.weight llama.cpp's converter writes (as the unit test in gguf_config.rs builds it)."""
    import math
    out_ = []
    for j in range(dim // 2):
        freq = 1.0 / theta ** ((2 * j) / dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out_.append(1.0)
        elif wavelen > old / low:
            out_.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out_.append(1.0 / ((1 - smooth) / factor + smooth))
    return out_


def gguf_seeds():
    v = len(BPE_TOKENS)
    llama = gguf(*gguf_model("llama", 16, 2, 1, 8, 32, 2, v, tokenizer=gpt2_tokenizer(),
                             extra_md=[("llama.rope.dimension_count", U32, 8), ("llama.vocab_size", U32, v)]))
    out("gguf", "llama-smollm-tokenizer.gguf", llama)

    qwen_tokens = BPE_TOKENS + [f"x{i}" for i in range(8)]
    qwen = gguf(*gguf_model("qwen2", 32, 4, 2, 8, 64, 1, len(qwen_tokens), tied=False, biases=True,
                            types={"embed": T_Q8_0, "attn": T_Q8_0, "ffn": T_Q4_1, "out": T_Q4_0},
                            tokenizer=gpt2_tokenizer(pre="default", add_bos=True, template=False, tokens=qwen_tokens)))
    out("gguf", "qwen2-quantized-bos.gguf", qwen)

    gemma = gguf(*gguf_model("gemma3", 16, 2, 1, 8, 32, 2, len(GEMMA_TOKENS), qk_norm=True, sandwich=True,
                             key_length=8, tokenizer=gemma_tokenizer(),
                             extra_md=[("gemma3.attention.sliding_window", U32, 4),
                                       ("gemma3.attention.sliding_window_pattern", U32, 2),
                                       ("gemma3.rope.freq_base_swa", F32, 10000.0)]))
    out("gguf", "gemma3-sentencepiece.gguf", gemma)

    gemma2 = gguf(*gguf_model("gemma2", 16, 2, 1, 8, 32, 2, len(GEMMA_TOKENS), sandwich=True, key_length=8,
                              types={"embed": T_F32}, tokenizer=gemma_tokenizer(),
                              extra_md=[("gemma2.attention.sliding_window", U32, 4),
                                        ("gemma2.attn_logit_softcapping", F32, 50.0),
                                        ("gemma2.final_logit_softcapping", F32, 30.0)]))
    out("gguf", "gemma2-softcap.gguf", gemma2)

    factors = llama3_factors(500000.0, 8)
    llama3 = gguf(*gguf_model("llama", 16, 2, 1, 8, 32, 1, 32, types={"embed": T_BF16},
                              extra_md=[("llama.rope.freq_base", F32, 500000.0)],
                              extra_tensors=[("rope_freqs.weight", [4], T_F32, f32_bytes(factors))]))
    # (the generic rope.freq_base comes first; the later duplicate key wins in slmc's map)
    out("gguf", "llama3-rope-freqs-no-tokenizer.gguf", llama3)

    out("gguf", "phi3-fused.gguf", gguf(*gguf_model("phi3", 16, 2, 2, 8, 32, 1, 32, fused=True, tied=False,
                                                     tokenizer=gpt2_tokenizer(pre="gpt2", template=False))))
    out("gguf", "stablelm-layernorm.gguf",
        gguf(*gguf_model("stablelm", 16, 2, 2, 8, 32, 1, 32, layernorm=True, biases=True, tied=False,
                         extra_md=[("stablelm.rope.dimension_count", U32, 4)])))
    out("gguf", "qwen3-qknorm.gguf", gguf(*gguf_model("qwen3", 16, 2, 1, 8, 32, 1, 32, qk_norm=True)))
    out("gguf", "smollm3-nope.gguf", gguf(*gguf_model("smollm3", 16, 2, 1, 8, 32, 4, 32,
                                                       types={"attn": T_Q8_0, "ffn": T_Q8_0}), version=2))
    out("gguf", "llama-kquants-align64.gguf",
        gguf(*gguf_model("llama", 256, 1, 1, 64, 256, 1, 32, key_length=64,
                         types={"embed": T_Q6_K, "attn": T_Q4_K, "ffn": T_Q4_K},
                         extra_md=[("general.alignment", U32, 64)]), alignment=64))

    # Every metadata value type, nested arrays, and tensors of every rank.
    md = [("general.architecture", STR, "llama"), ("general.alignment", U32, 32),
          ("t.u8", U8, 255), ("t.i8", I8, -128), ("t.u16", U16, 65535), ("t.i16", I16, -1), ("t.u32", U32, 1 << 31),
          ("t.i32", I32, -7), ("t.f32", F32, 0.5), ("t.bool", BOOL, True), ("t.str", STR, "caf\u00e9"),
          ("t.u64", U64, 1 << 63), ("t.i64", I64, -(1 << 63)), ("t.f64", F64, float("inf")),
          ("t.nested", ARR, (ARR, [(U8, [1, 2]), (STR, ["a", ""])])), ("t.empty", ARR, (U32, []))]
    ts = [("r1", [4], T_F32, None), ("r2", [4, 2], T_F16, None), ("r3", [2, 2, 2], T_F32, None),
          ("r4", [1, 2, 1, 2], T_BF16, None), ("q", [64, 2], T_Q4_0, None)]
    out("gguf", "all-value-types.gguf", gguf(md, ts))

    # Hostile: truncated, lying counts and lengths, bad alignment and offsets.
    out("gguf", "hostile-truncated-header.gguf", llama[:20])
    out("gguf", "hostile-truncated-metadata.gguf", llama[:300])
    out("gguf", "hostile-truncated-data.gguf", llama[: len(llama) - 100])
    out("gguf", "hostile-bad-magic.gguf", b"GGUG" + llama[4:64])
    out("gguf", "hostile-version-1.gguf", b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    out("gguf", "hostile-huge-tensor-count.gguf", b"GGUF" + struct.pack("<IQQ", 3, 1 << 62, 0) + b"\0" * 64)
    out("gguf", "hostile-huge-kv-count.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, (1 << 64) - 1) + b"\0" * 64)
    out("gguf", "hostile-string-length.gguf",
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", (1 << 64) - 1) + b"key" + b"\0" * 16)
    out("gguf", "hostile-array-count.gguf",
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gstr("a") + struct.pack("<IIQ", ARR, U64, 1 << 40) + b"\0" * 32)
    out("gguf", "hostile-array-nesting.gguf",
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gstr("a")
        + struct.pack("<I", ARR) + struct.pack("<IQ", ARR, 1) * 5 + struct.pack("<IQ", U8, 1) + b"\1" + b"\0" * 16)
    out("gguf", "hostile-unknown-value-type.gguf",
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gstr("a") + struct.pack("<I", 99) + b"\0" * 16)
    out("gguf", "hostile-alignment-3.gguf",
        gguf([("general.architecture", STR, "llama"), ("general.alignment", U32, 3)], [("t", [4], T_F32, None)]))
    bad_infos = [
        ("hostile-rank-0.gguf", [("t", [], T_F32, b"")]),
        ("hostile-rank-5.gguf", [("t", [1, 1, 1, 1, 1], T_F32, None)]),
        ("hostile-unknown-ggml-type.gguf", [("t", [4], 77, b"\0" * 16)]),
        ("hostile-empty-dimension.gguf", [("t", [4, 0], T_F32, b"")]),
        ("hostile-partial-block.gguf", [("t", [33], T_Q8_0, b"\0" * 68)]),
        ("hostile-overflowing-shape.gguf", [("t", [1 << 32, 1 << 32, 1 << 32], T_F32, b"\0" * 32)]),
    ]
    for name, ts in bad_infos:
        out("gguf", name, gguf([("general.architecture", STR, "llama")], ts))
    off = bytearray(gguf([("general.architecture", STR, "llama")], [("t", [8], T_F32, None)]))
    i = off.index(b"\x01\x00\x00\x00" + struct.pack("<Q", 8) + struct.pack("<I", T_F32))
    struct.pack_into("<Q", off, i + 16, 1 << 20)  # the tensor's offset, past the end of the file
    out("gguf", "hostile-offset-past-end.gguf", bytes(off))
    struct.pack_into("<Q", off, i + 16, 4)  # not aligned
    out("gguf", "hostile-offset-unaligned.gguf", bytes(off))
    # A config that is refused: heads that do not divide, an unsupported architecture.
    md, ts = gguf_model("llama", 16, 3, 2, 8, 32, 1, 32)
    out("gguf", "hostile-heads-not-multiple.gguf", gguf(md, ts))
    md, ts = gguf_model("mamba", 16, 2, 1, 8, 32, 1, 32)
    out("gguf", "hostile-unsupported-arch.gguf", gguf(md, ts))
    # More layers than stored (lowering refuses at the first missing tensor).
    md, ts = gguf_model("llama", 16, 2, 1, 8, 32, 2, 32)
    md = [(k, t, 40 if k == "llama.block_count" else v) for k, t, v in md]
    out("gguf", "hostile-missing-layers.gguf", gguf(md, ts))
    # A GPT-2 tokenizer whose merges name pieces outside the vocabulary.
    tok = gpt2_tokenizer(template=False)
    tok = [(k, t, (STR, ["zz qq"]) if k == "tokenizer.ggml.merges" else v) for k, t, v in tok]
    md, ts = gguf_model("llama", 16, 2, 1, 8, 32, 1, v, tokenizer=tok)
    out("gguf", "hostile-merge-outside-vocab.gguf", gguf(md, ts))


# ---------------------------------------------------------------------------------------
# Hugging Face: config.json + safetensors
# ---------------------------------------------------------------------------------------

ST_DTYPES = {"F32": (4, f32_bytes), "F16": (2, f16_bytes), "BF16": (2, bf16_bytes)}


def safetensors(tensors, dtype):
    """tensors: [(name, shape)]; contiguous data in name order, header padded to 8 bytes."""
    size, enc = ST_DTYPES[dtype]
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, shape in sorted(tensors):
        n = 1
        for s in shape:
            n *= s
        blob = enc(floats(n))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((-len(h)) % 8)
    return struct.pack("<Q", len(h)) + h + data


def hf_tensors(cfg, arch):
    d, v, ff = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    hq = cfg["num_attention_heads"]
    hk = cfg.get("num_key_value_heads", hq)
    hd = cfg.get("head_dim", d // hq)
    gemma, olmo, stablelm, phi = arch in ("gemma2", "gemma3"), arch == "olmo2", arch == "stablelm", arch == "phi3"
    bias = arch == "qwen2" or cfg.get("use_qkv_bias") or cfg.get("attention_bias")
    ts = [("model.embed_tokens.weight", [v, d]), ("model.norm.weight", [d])]
    if stablelm:
        ts.append(("model.norm.bias", [d]))
    if not cfg.get("tie_word_embeddings"):
        ts.append(("lm_head.weight", [v, d]))
    for b in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{b}."
        if not olmo:
            ts.append((p + "input_layernorm.weight", [d]))
        if stablelm:
            ts.append((p + "input_layernorm.bias", [d]))
        if phi:
            ts.append((p + "self_attn.qkv_proj.weight", [(hq + 2 * hk) * hd, d]))
        else:
            for proj, n in (("q", hq), ("k", hk), ("v", hk)):
                ts.append((p + f"self_attn.{proj}_proj.weight", [n * hd, d]))
                if bias:
                    ts.append((p + f"self_attn.{proj}_proj.bias", [n * hd]))
        if arch in ("qwen3", "gemma3"):
            ts += [(p + "self_attn.q_norm.weight", [hd]), (p + "self_attn.k_norm.weight", [hd])]
        if olmo:
            ts += [(p + "self_attn.q_norm.weight", [hq * hd]), (p + "self_attn.k_norm.weight", [hk * hd])]
        ts.append((p + "self_attn.o_proj.weight", [d, hq * hd]))
        ts.append((p + "post_attention_layernorm.weight", [d]))
        if stablelm:
            ts.append((p + "post_attention_layernorm.bias", [d]))
        if gemma:
            ts.append((p + "pre_feedforward_layernorm.weight", [d]))
        if gemma or olmo:
            ts.append((p + "post_feedforward_layernorm.weight", [d]))
        if phi:
            ts.append((p + "mlp.gate_up_proj.weight", [2 * ff, d]))
        else:
            ts += [(p + "mlp.gate_proj.weight", [ff, d]), (p + "mlp.up_proj.weight", [ff, d])]
        ts.append((p + "mlp.down_proj.weight", [d, ff]))
    return ts


def hf_seed(config, index, st):
    c = json.dumps(config, indent=1).encode() if isinstance(config, dict) else config
    i = json.dumps(index, indent=1).encode() if isinstance(index, dict) else index
    return c + b"\0" + i + b"\0" + st


BASE = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 8, "num_hidden_layers": 2, "rms_norm_eps": 1e-5, "vocab_size": 32,
        "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2}

HF_MODELS = [
    ("llama-tied-f16", "llama", "F16", {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True,
                                        "hidden_act": "silu", "rope_theta": 10000.0, "eos_token_id": [2, 3]}),
    ("llama3-rope-scaling-f32", "llama", "F32", {"architectures": ["LlamaForCausalLM"], "rope_theta": 500000.0,
                                                 "rope_scaling": {"rope_type": "llama3", "factor": 32.0,
                                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                  "original_max_position_embeddings": 8192}}),
    ("qwen2-untied-bias-bf16", "qwen2", "BF16", {"architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": False,
                                                  "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
                                                  "sliding_window": None, "use_sliding_window": False}),
    ("qwen3-qknorm-f32", "qwen3", "F32", {"architectures": ["Qwen3ForCausalLM"], "tie_word_embeddings": True}),
    ("gemma2-softcap-f32", "gemma2", "F32", {"architectures": ["Gemma2ForCausalLM"], "tie_word_embeddings": True,
                                             "hidden_activation": "gelu_pytorch_tanh", "attn_logit_softcapping": 10.0,
                                             "final_logit_softcapping": 8.0, "query_pre_attn_scalar": 8,
                                             "sliding_window": 4, "rms_norm_eps": 1e-6,
                                             "layer_types": ["sliding_attention", "full_attention"]}),
    ("gemma3-pattern-f16", "gemma3", "F16", {"model_type": "gemma3_text", "tie_word_embeddings": True,
                                             "sliding_window": 4, "_sliding_window_pattern": 2,
                                             "query_pre_attn_scalar": 8,
                                             "rope_parameters": {"full_attention": {"rope_theta": 1000000.0,
                                                                                    "rope_type": "default"},
                                                                 "sliding_attention": {"rope_theta": 10000.0,
                                                                                       "rope_type": "default"}}}),
    ("stablelm-partial-rotary-f16", "stablelm", "F16", {"architectures": ["StableLmForCausalLM"],
                                                        "num_key_value_heads": 2, "layer_norm_eps": 1e-5,
                                                        "partial_rotary_factor": 0.5, "use_qkv_bias": True,
                                                        "use_parallel_residual": False, "qk_layernorm": False,
                                                        "tie_word_embeddings": False}),
    ("olmo2-post-norm-f32", "olmo2", "F32", {"architectures": ["Olmo2ForCausalLM"], "tie_word_embeddings": False}),
    ("smollm3-nope-bf16", "smollm3", "BF16", {"architectures": ["SmolLM3ForCausalLM"], "tie_word_embeddings": True,
                                              "no_rope_layers": [1, 0], "use_sliding_window": False}),
    ("phi3-fused-f32", "phi3", "F32", {"architectures": ["Phi3ForCausalLM"], "num_key_value_heads": 2,
                                       "tie_word_embeddings": False}),
]


def hf_seeds():
    built = {}
    for name, arch, dtype, extra in HF_MODELS:
        cfg = dict(BASE)
        cfg.update(extra)
        if arch == "stablelm":
            del cfg["rms_norm_eps"]
        tensors = hf_tensors(cfg, arch)
        st = safetensors(tensors, dtype)
        built[name] = (cfg, tensors, st)
        out("safetensors_config", name + ".bin", hf_seed(cfg, b"", st))

    cfg, tensors, st = built["llama-tied-f16"]
    index = {"metadata": {"total_size": len(st)}, "weight_map": {n: "model.safetensors" for n, _ in tensors}}
    out("safetensors_config", "llama-index-one-shard.bin", hf_seed(cfg, index, st))

    # The repository's MobileLLM fixture (block sharing), as committed.
    fx = os.path.join(ROOT, "fixtures", "tiny-mobilellm-shared")
    with open(os.path.join(fx, "config.json"), "rb") as f:
        fcfg = f.read()
    with open(os.path.join(fx, "model.safetensors"), "rb") as f:
        fst = f.read()
    out("safetensors_config", "fixture-mobilellm-shared.bin", hf_seed(fcfg, b"", fst))

    # Hostile.
    out("safetensors_config", "hostile-truncated-safetensors.bin", hf_seed(cfg, b"", st[: len(st) // 2]))
    lie = bytearray(st)
    struct.pack_into("<Q", lie, 0, len(st) * 4)
    out("safetensors_config", "hostile-header-length-lie.bin", hf_seed(cfg, b"", bytes(lie)))
    out("safetensors_config", "hostile-header-length-max.bin", hf_seed(cfg, b"", struct.pack("<Q", (1 << 64) - 1) + b"{}"))
    hdr = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    out("safetensors_config", "hostile-overlapping-offsets.bin",
        hf_seed(cfg, b"", struct.pack("<Q", len(hdr)) + hdr + b"\0" * 12))
    hdr = json.dumps({"a": {"dtype": "F32", "shape": [1 << 31, 1 << 31, 4], "data_offsets": [0, 8]}}).encode()
    out("safetensors_config", "hostile-overflowing-shape.bin", hf_seed(cfg, b"", struct.pack("<Q", len(hdr)) + hdr + b"\0" * 8))
    q = st.replace(b'"F16"', b'"I64"', 1)
    out("safetensors_config", "hostile-unsupported-dtype.bin", hf_seed(cfg, b"", q))
    for label, edit in [
        ("unknown-architecture", {"architectures": ["MambaForCausalLM"]}),
        ("zero-heads", {"num_attention_heads": 0}),
        ("heads-not-multiple", {"num_attention_heads": 3, "num_key_value_heads": 2}),
        ("more-layers-than-stored", {"num_hidden_layers": 40}),
        ("vocab-too-big", {"vocab_size": 1 << 32}),
        ("string-for-number", {"hidden_size": "16"}),
        ("bad-rope-type", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
        ("llama3-rope-missing-factor", {"rope_scaling": {"rope_type": "llama3"}}),
        ("negative-eps", {"rms_norm_eps": -1}),
        ("partial-rotary-zero", {"partial_rotary_factor": 0.0}),
        ("wrong-shape-for-config", {"hidden_size": 24}),
    ]:
        c = dict(cfg)
        c.update(edit)
        out("safetensors_config", f"hostile-config-{label}.bin", hf_seed(c, b"", st))
    g = dict(built["gemma2-softcap-f32"][0])
    g["layer_types"] = ["sliding_attention"]
    out("safetensors_config", "hostile-config-layer-types-length.bin", hf_seed(g, b"", built["gemma2-softcap-f32"][2]))
    s3 = dict(built["smollm3-nope-bf16"][0])
    s3["no_rope_layers"] = [1, 2]
    out("safetensors_config", "hostile-config-no-rope-layers-values.bin", hf_seed(s3, b"", built["smollm3-nope-bf16"][2]))
    out("safetensors_config", "hostile-config-not-object.bin", hf_seed(b"[1, 2, 3]", b"", st))
    out("safetensors_config", "hostile-config-truncated.bin", hf_seed(json.dumps(cfg).encode()[:40], b"", st))
    out("safetensors_config", "hostile-index-escaping-shard.bin",
        hf_seed(cfg, {"weight_map": {"model.embed_tokens.weight": "../model.safetensors"}}, st))
    out("safetensors_config", "hostile-index-missing-tensor.bin",
        hf_seed(cfg, {"weight_map": {"not.stored": "model.safetensors"}}, st))
    out("safetensors_config", "hostile-index-no-weight-map.bin", hf_seed(cfg, {"metadata": {}}, st))
    out("safetensors_config", "hostile-empty-safetensors.bin", hf_seed(cfg, b"", b""))


# ---------------------------------------------------------------------------------------
# Tokenizer files
# ---------------------------------------------------------------------------------------


def added(i, content, special=True, normalized=False):
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": normalized, "special": special}


def tok_json(model, *, added_tokens=(), normalizer=None, pre=None, post=None, decoder=None, truncation=None,
             padding=None):
    return {"version": "1.0", "truncation": truncation, "padding": padding, "added_tokens": list(added_tokens),
            "normalizer": normalizer, "pre_tokenizer": pre, "post_processor": post, "decoder": decoder,
            "model": model}


def bpe(vocab, merges, **kw):
    m = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
         "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
         "vocab": vocab, "merges": merges}
    m.update(kw)
    return m


def tok_seed(tokenizer, config, text):
    t = json.dumps(tokenizer, indent=1, ensure_ascii=False).encode() if isinstance(tokenizer, dict) else tokenizer
    c = json.dumps(config, indent=1, ensure_ascii=False).encode() if isinstance(config, (dict, list)) else config
    return t + b"\0" + c + b"\0" + (text.encode() if isinstance(text, str) else text)


GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == "
                  "'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | "
                  "trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}"
                  "{% endif %}")


def tokenizer_seeds():
    vocab = {t: i for i, t in enumerate(BPE_TOKENS)}
    smol = tok_json(
        bpe(vocab, BPE_MERGES),
        added_tokens=[added(i, BPE_TOKENS[i]) for i in range(3)],
        pre={"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                   {"type": "ByteLevel", "add_prefix_space": False,
                                                    "trim_offsets": True, "use_regex": True}]},
        post={"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        decoder={"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True})
    smol_cfg = {"add_prefix_space": False, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                "chat_template": smollm2_template(), "model_max_length": 8192,
                "tokenizer_class": "GPT2Tokenizer", "unk_token": "<|endoftext|>"}
    out("tokenizer_files", "bytelevel-bpe-chatml.bin", tok_seed(smol, smol_cfg, "Hello world! 123 <|im_start|>user"))

    gvocab = {t.replace(" ", "\u2581"): i for i, t in enumerate(GEMMA_TOKENS)}
    gmerges = [["\u2581", "H"], ["H", "e"], ["l", "l"], ["ll", "o"], ["He", "llo"], ["\u2581", "Hello"],
               ["w", "o"], ["r", "l"], ["rl", "d"]]
    gmerges = [m for m in gmerges if m[0] in gvocab and m[1] in gvocab and m[0] + m[1] in gvocab]
    gemma = tok_json(
        bpe(gvocab, gmerges, unk_token="<unk>", fuse_unk=True, byte_fallback=True),
        added_tokens=[added(i, t) for i, t in enumerate(GEMMA_TOKENS[:7])],
        normalizer={"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        pre={"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False},
        post={"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}},
                                                       {"Sequence": {"id": "A", "type_id": 0}}],
              "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "<bos>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
              "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}}},
        decoder={"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                                                  {"type": "ByteFallback"}, {"type": "Fuse"}]})
    gemma_cfg = {"bos_token": {"content": "<bos>", "lstrip": False, "normalized": False, "rstrip": False,
                               "single_word": False},
                 "eos_token": {"content": "<eos>"},
                 "chat_template": [{"name": "tool_use", "template": "{{ raise_exception('tools') }}"},
                                   {"name": "default", "template": GEMMA_TEMPLATE}]}
    out("tokenizer_files", "sentencepiece-bpe-named-templates.bin",
        tok_seed(gemma, gemma_cfg, "Hello  world caf\u00e9 \u00e9!\n<start_of_turn>"))

    wp_vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", "##s", "un",
                                            "##believ", "##able", "!", "1", "2"])}
    wordpiece = tok_json(
        {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
         "vocab": wp_vocab},
        added_tokens=[added(i, t) for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])],
        normalizer={"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True, "strip_accents": None,
                    "lowercase": True},
        pre={"type": "BertPreTokenizer"},
        post={"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
        decoder={"type": "WordPiece", "prefix": "##", "cleanup": True})
    jinja = "{% for m in messages %}[{{ m.role | upper }}] {{ m['content'] }}\n{% endfor %}{{ eos_token }}"
    out("tokenizer_files", "wordpiece-jinja-file.bin", tok_seed(wordpiece, b"", jinja))

    unigram = tok_json(
        {"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0], ["\u2581", -1.0], ["\u2581hello", -2.0],
                                                   ["\u2581world", -2.5], ["h", -3.0], ["e", -3.0], ["l", -3.0],
                                                   ["o", -3.0], ["w", -3.5], ["r", -3.5], ["d", -3.5]],
         "byte_fallback": False},
        normalizer={"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]},
        pre={"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True},
        decoder={"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True},
        truncation={"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0},
        padding={"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                 "pad_type_id": 0, "pad_token": "<unk>"})
    cfg = {"bos_token": "<s>", "eos_token": "</s>",
           "chat_template": "{%- for m in messages -%}{%- if m.role not in ['system', 'user', 'assistant'] -%}"
                            "{{ raise_exception('bad role') }}{%- endif -%}{{ loop.index }}:{{ m.content | trim }}"
                            "{% if not loop.last %}|{% endif %}{%- endfor -%}{% if add_generation_prompt %}>{% endif %}"}
    out("tokenizer_files", "unigram-padding-truncation.bin", tok_seed(unigram, cfg, "Hello World hello"))

    wordlevel = tok_json({"type": "WordLevel", "vocab": {"<unk>": 0, "hello": 1, "world": 2}, "unk_token": "<unk>"},
                         pre={"type": "Whitespace"})
    cfg = {"chat_template": "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                            "{{ m.content.strip() }}{{ ', '.join(['a', 'b']) }}{% endfor %}{{ ns.n }}{{ bos_token }}",
           "bos_token": None, "eos_token": 7}
    out("tokenizer_files", "wordlevel-pycompat-template.bin", tok_seed(wordlevel, cfg, "hello world zebra"))

    # Hostile.
    smol_bytes = json.dumps(smol).encode()
    out("tokenizer_files", "hostile-truncated-tokenizer.bin", tok_seed(smol_bytes[: len(smol_bytes) // 2], b"", b"x"))
    bad = json.loads(json.dumps(smol))
    bad["model"]["merges"] = ["zz qq"]
    out("tokenizer_files", "hostile-merge-outside-vocab.bin", tok_seed(bad, b"", b"Hello"))
    bad = json.loads(json.dumps(smol))
    bad["model"]["type"] = "Mamba"
    out("tokenizer_files", "hostile-unknown-model.bin", tok_seed(bad, b"", b"Hello"))
    bad = json.loads(json.dumps(smol))
    bad["added_tokens"].append(added(100000, "<far>"))
    out("tokenizer_files", "hostile-added-token-far-id.bin", tok_seed(bad, b"", b"<far> Hello"))
    bad = json.loads(json.dumps(smol))
    bad["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}
    out("tokenizer_files", "hostile-backtracking-regex.bin", tok_seed(bad, b"", b"a" * 40 + b"!"))
    out("tokenizer_files", "hostile-template-syntax-error.bin",
        tok_seed(b"{}", {"chat_template": "{% for m in messages %}{{ m.content }"}, b""))
    out("tokenizer_files", "hostile-template-raises.bin",
        tok_seed(b"{}", {"chat_template": "{{ raise_exception('Conversation roles must alternate') }}"}, b""))
    out("tokenizer_files", "hostile-template-undefined.bin",
        tok_seed(b"{}", {"chat_template": "{{ messages[99].content.missing() }}{{ 1 / 0 }}"}, b""))
    out("tokenizer_files", "hostile-config-not-object.bin", tok_seed(b"null", b"[1, 2]", b"{{ messages }}"))
    out("tokenizer_files", "hostile-config-template-number.bin",
        tok_seed(b"", {"chat_template": 7, "bos_token": {"content": 5}}, b"\xff\xfe not utf-8"))


# ---------------------------------------------------------------------------------------
# IR text
# ---------------------------------------------------------------------------------------

SMALL_IR = """graph "small" {
  %emb = weight "embed" : f16[10, 4]
  %tokens = input "tokens" : i32[s]
  %x = embed(%emb, %tokens) : f32[s, 4]
  %norm.w = weight "norm" : f32[4]
  %y = rms_norm(%x, %norm.w) {eps = 1e-5} : f32[s, 4]
  %h = reshape(%y) {shape = [s, 2, 2]} : f32[s, 2, 2]
  %pos = positions(%tokens) : i32[s]
  %r = rope(%h, %pos) {theta = 10000.0, rotary_dim = 2, style = half} : f32[s, 2, 2]
  %k = kv_append(%r) {layer = 0, kind = key} : f32[p+s, 2, 2]
  output "logits" = %y
}
"""


def ir_seeds():
    d = os.path.join(ROOT, "passes", "filetests")
    for name in sorted(os.listdir(d)):
        if name.endswith(".slir"):
            with open(os.path.join(d, name), "rb") as f:
                out("ir_text", "filetest-" + name, f.read())
    out("ir_text", "small.slir", SMALL_IR)
    out("ir_text", "escapes.slir", SMALL_IR.replace('weight "norm"', 'weight "n\\u{e9}\\t\\"o\\\\rm\\0"'))
    out("ir_text", "comments-and-blank-lines.slir", "; a comment\n\n" + SMALL_IR.replace("\n", "\n\n; c\n", 3))
    hostile = {
        "empty": "",
        "no-header": "%x = input \"t\" : i32[s]\n",
        "missing-brace": SMALL_IR.replace("}\n", ""),
        "text-after-brace": SMALL_IR + "%z = silu(%x) : f32[s, 4]\n",
        "undefined-operand": SMALL_IR.replace("embed(%emb, %tokens)", "embed(%emb, %nothing)"),
        "cycle": 'graph "c" {\n  %a = silu(%b) : f32[s, 4]\n  %b = silu(%a) : f32[s, 4]\n  output "o" = %a\n}\n',
        "self-cycle": 'graph "c" {\n  %a = silu(%a) : f32[s, 4]\n  output "o" = %a\n}\n',
        "unterminated-string": 'graph "x {\n}\n',
        "bad-unicode-escape": SMALL_IR.replace('"embed"', '"\\u{110000}"'),
        "unknown-escape": SMALL_IR.replace('"embed"', '"\\q"'),
        "unknown-dtype": SMALL_IR.replace("f16[10, 4]", "f8[10, 4]"),
        "bad-dimension": SMALL_IR.replace("f16[10, 4]", "f16[10, 4x]"),
        "huge-dimension": SMALL_IR.replace("f16[10, 4]", "f16[99999999999999999999, 4]"),
        "type-mismatch": SMALL_IR.replace("%y = rms_norm(%x, %norm.w) {eps = 1e-5} : f32[s, 4]",
                                          "%y = rms_norm(%x, %norm.w) {eps = 1e-5} : f16[s, 4]"),
        "duplicate-cache-slot": SMALL_IR.replace('  output "logits" = %y',
                                                 '  %k2 = kv_append(%r) {layer = 0, kind = key} : f32[p+s, 2, 2]\n'
                                                 '  output "logits" = %y\n  output "k2" = %k2'),
        "no-outputs": SMALL_IR.replace('  output "logits" = %y\n', ""),
        "undefined-output": SMALL_IR.replace('output "logits" = %y', 'output "logits" = %nope'),
        "unknown-op": SMALL_IR.replace("silu", "frobnicate").replace("positions(%tokens)", "frobnicate(%tokens)"),
        "wrong-arity": SMALL_IR.replace("embed(%emb, %tokens)", "embed(%emb)"),
        "missing-attribute": SMALL_IR.replace(" {eps = 1e-5}", ""),
        "unknown-attribute": SMALL_IR.replace("{eps = 1e-5}", "{eps = 1e-5, zap = 3}"),
        "bad-number": SMALL_IR.replace("1e-5", "1e-5e5"),
        "integer-overflow": SMALL_IR.replace("layer = 0", "layer = 99999999999999999999"),
        "negative-layer": SMALL_IR.replace("layer = 0", "layer = -1"),
        "duplicate-name": SMALL_IR.replace("%pos = positions", "%x = positions"),
    }
    for name, text in hostile.items():
        out("ir_text", f"hostile-{name}.slir", text)


# ---------------------------------------------------------------------------------------
# Bundle manifest and artifact manifests
# ---------------------------------------------------------------------------------------


def digest(path, data):
    return {"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


MODEL_INFO = {"name": "tiny", "vocab_size": 32, "eos_token_ids": [2], "context_len": 64, "max_step_tokens": 4}


def fixed(n):
    return {"per_token": 0, "constant": n, "divisor": 1}


GPU = {
    "format": "slmc-gpu-1", "target": "webgpu", "required_features": ["shader-f16"], "model": MODEL_INFO,
    "buffers": [
        {"name": "tokens", "kind": {"type": "input"}, "bytes": 16},
        {"name": "embed.w", "kind": {"type": "weight", "offset": 0, "layout": "f16"}, "bytes": 1024},
        {"name": "rope", "kind": {"type": "table", "offset": 1024}, "bytes": 256},
        {"name": "h", "kind": {"type": "activation"}, "bytes": 512},
        {"name": "k_cache", "kind": {"type": "cache"}, "bytes": 4096},
        {"name": "logits", "kind": {"type": "activation"}, "bytes": 512},
        {"name": "next_token", "kind": {"type": "activation"}, "bytes": 4},
    ],
    "kernels": [{"name": "embed", "entry_point": "main", "storage_bindings": 3},
                {"name": "linear_f16", "entry_point": "main", "storage_bindings": 3},
                {"name": "argmax", "entry_point": "main", "storage_bindings": 2}],
    "dispatches": [
        {"value": "embed", "kernel": 0, "bindings": [1, 0, 3],
         "workgroups": [{"per_token": 1, "constant": 0, "divisor": 1}, fixed(1), fixed(1)]},
        {"value": "logits", "kernel": 1, "bindings": [3, 1, 5],
         "workgroups": [{"per_token": 32, "constant": 63, "divisor": 64}, fixed(1), fixed(1)]},
    ],
    "tokens_buffer": 0, "logits_buffer": 5,
    "argmax_dispatch": {"value": "argmax", "kernel": 2, "bindings": [5, 6], "workgroups": [fixed(1), fixed(1), fixed(1)]},
    "next_token_buffer": 6, "weights_file": "weights.bin",
}


def manifest(files):
    return {
        "schema": "slmc-bundle-1",
        "model": {"name": "tiny", "version": "1", "architecture": "LlamaForCausalLM", "source_sha256": "0" * 64},
        "compiler": {"name": "slmc", "version": "0.2.0", "options": {"pipeline": "default", "weights": "q4_1"}},
        "min_runtime_version": "0.2.0",
        "target": {"name": "webgpu", "profile_version": 1, "backend": "wgsl", "family": "webgpu"},
        "quantization": {"weights": "q4_1", "kv_cache": "f32", "weight_dtypes": {"f32": 1024, "q4_1": 4096}},
        "required": {"max_storage_buffer_binding_size": 134217728, "max_buffer_size": 268435456,
                     "features": ["shader-f16"], "executor": "wgpu"},
        "npu_support": {"npu": None, "ops_on_npu": 0, "ops_total": 120, "note": "no NPU on this target"},
        "memory": {"weight_bytes": 5120, "kv_cache_bytes": 8192, "activation_bytes": 4096, "total_bytes": 17408,
                   "context_len": 64, "device_ram_bytes": None},
        "quality": {"method": "teacher-forced", "positions": 64, "top1_agreement": 1.0, "mean_kl": 0.001},
        "smoke": {"near_tie_gap": 0.5, "prompts": [
            {"prompt_ids": [1, 2, 3], "expected_ids": [4, 5, 6], "gaps": [2.5, 0.1, 3.0]},
            {"prompt_ids": [1], "expected_ids": [7], "gaps": [3.0], "prompt_argmax": [7], "prompt_gaps": [1.0]}]},
        "files": files,
    }


def jdump(v):
    return json.dumps(v, indent=1).encode()


def bundle_seeds():
    gpu = jdump(GPU)
    files = [digest("artifact.json", gpu), digest("kernels/embed.wgsl", b"// wgsl\n"),
             digest("weights.bin", b"\0" * 4096)]
    out("bundle_json", "manifest.json", jdump(manifest(files)))
    m = manifest([])
    m["smoke"]["near_tie_may_flip"] = True
    del m["quality"]
    out("bundle_json", "manifest-no-files.json", jdump(m))
    for label, edit in [
        ("schema", lambda m: m.update(schema="slmc-bundle-2")),
        ("newer-runtime", lambda m: m.update(min_runtime_version="99.1.x.")),
        ("unknown-field", lambda m: m.update(extra=1)),
        ("unknown-backend", lambda m: m["target"].update(backend="cuda")),
        ("traversal", lambda m: m.update(files=[digest("../outside", b""), digest("/etc/passwd", b"")])),
        ("empty-component", lambda m: m.update(files=[digest("a//b", b""), digest("", b""), digest("./x", b"")])),
        ("dot-paths", lambda m: m.update(files=[digest(".", b""), digest("kernels/.", b""), digest("a/./b", b"")])),
        ("lists-itself", lambda m: m.update(files=[digest("manifest.json", b"{}")])),
        ("huge-numbers", lambda m: m["memory"].update(total_bytes=18446744073709551615, context_len=18446744073709551615)),
        ("gap-nan-ish", lambda m: m["smoke"].update(near_tie_gap=1e39)),
    ]:
        m = manifest(files)
        edit(m)
        out("bundle_json", f"hostile-manifest-{label}.json", jdump(m))
    out("bundle_json", "hostile-manifest-overflowing-number.json",
        jdump(manifest(files)).replace(b'"weight_bytes": 5120', b'"weight_bytes": 184467440737095516150'))

    out("bundle_json", "gpu-artifact.json", gpu)
    for label, edit in [
        ("weights-outside", lambda a: a.update(weights_file="../weights.bin")),
        ("weights-absolute", lambda a: a.update(weights_file="/dev/zero")),
        ("weights-in-subdir", lambda a: a.update(weights_file="data/weights.bin")),
        ("weights-is-manifest", lambda a: a.update(weights_file="artifact.json")),
        ("kernel-slash", lambda a: a["kernels"][0].update(name="sub/embed")),
        ("kernel-dotdot", lambda a: a["kernels"][0].update(name="..")),
        ("buffer-past-end", lambda a: a["buffers"][1].update(bytes=1 << 20)),
        ("buffer-offset-overflow", lambda a: a["buffers"][2]["kind"].update(offset=18446744073709551615)),
        ("dispatch-kernel-range", lambda a: a["dispatches"][0].update(kernel=9)),
        ("argmax-kernel-range", lambda a: a["argmax_dispatch"].update(kernel=3)),
        ("binding-range", lambda a: a["dispatches"][1].update(bindings=[3, 1, 70])),
        ("binding-count", lambda a: a["dispatches"][1].update(bindings=[3])),
        ("unknown-feature", lambda a: a.update(required_features=["ray-tracing"])),
        ("tokens-buffer-range", lambda a: a.update(tokens_buffer=7)),
        ("logits-buffer-range", lambda a: a.update(logits_buffer=70)),
        ("next-token-range", lambda a: a.update(next_token_buffer=7)),
        ("logits-too-small", lambda a: a["model"].update(vocab_size=33)),
        ("vocab-zero", lambda a: a["model"].update(vocab_size=0)),
        ("logits-overflow", lambda a: a["model"].update(vocab_size=1 << 62, max_step_tokens=8)),
        ("no-buffers", lambda a: a.update(buffers=[], dispatches=[])),
        ("unknown-buffer-kind", lambda a: a["buffers"][0]["kind"].update(type="texture")),
        ("format-onnx", lambda a: a.update(format="slmc-onnx-1")),
    ]:
        a = json.loads(gpu)
        edit(a)
        out("bundle_json", f"gpu-{label}.json", jdump(a))

    onnx = {"format": "slmc-onnx-1", "target": "onnx-cpu", "profile": "ort-contrib", "model": MODEL_INFO, "layers": 2,
            "kv_heads": 1, "head_dim": 8, "accuracy_level": 4, "head_accuracy_level": 4, "kv_buffer_shared": True,
            "files": [digest("model.onnx", b"onnx"), digest("model.onnx.data", b"\0" * 64)]}
    out("bundle_json", "onnx-artifact.json", jdump(onnx))
    o = dict(onnx, files=[])
    out("bundle_json", "onnx-no-files.json", jdump(o))
    o = dict(onnx, files=[digest("../model.onnx", b"x"), digest("artifact.json", b"{}")])
    out("bundle_json", "onnx-files-outside.json", jdump(o))
    o = dict(onnx)
    del o["head_accuracy_level"], o["kv_buffer_shared"]
    out("bundle_json", "onnx-defaults.json", jdump(o))

    coreml = {"format": "slmc-coreml-1", "target": "coreml-ios18", "specification_version": 9,
              "package": "model.mlpackage", "model": MODEL_INFO, "step_tokens": 4, "layers": 1, "kv_heads": 1,
              "head_dim": 4, "kv_cache": "state",
              "placement": {"ops_total": 10, "ops_on_neural_engine": 8,
                            "by_op": {"linear": {"total": 4, "neural_engine": 4}},
                            "off_neural_engine": {"gather at runtime indices": 1}},
              "files": [digest("model.mlpackage/Manifest.json", b"{}"),
                        digest("model.mlpackage/Data/com.apple.CoreML/model.mlmodel", b"\x08\x09")]}
    out("bundle_json", "coreml-artifact.json", jdump(coreml))
    # Valid as both a Core ML and a GPU manifest: the GPU files in memory satisfy its list.
    both = dict(GPU)
    both.update({k: v for k, v in coreml.items() if k not in ("model",)})
    both["files"] = [digest("weights.bin", b"\0" * 4096)]
    out("bundle_json", "coreml-with-gpu-fields.json", jdump(both))

    out("bundle_json", "format-unknown.json", b'{"format": "slmc-tpu-1"}')
    out("bundle_json", "format-only-gpu.json", b'{"format": "slmc-gpu-1"}')
    out("bundle_json", "not-json.json", b"\x00\xffnot json")
    out("bundle_json", "deep-nesting.json", b"[" * 200 + b"]" * 200)
    out("bundle_json", "truncated.json", gpu[: len(gpu) // 2])


# ---------------------------------------------------------------------------------------
# Core ML: model.mlmodel (protobuf, MIL program) + weight.bin (blob storage v2)
# ---------------------------------------------------------------------------------------


def varint(n):
    n &= (1 << 64) - 1
    b = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            b.append(byte | 0x80)
        else:
            b.append(byte)
            return bytes(b)


def fld(num, wire, payload):
    key = varint((num << 3) | wire)
    if wire == 0:
        return key + varint(payload)
    if wire == 2:
        payload = payload.encode() if isinstance(payload, str) else payload
        return key + varint(len(payload)) + payload
    if wire == 5:
        return key + payload
    raise ValueError(wire)


def msg(num, *parts):
    return fld(num, 2, b"".join(parts))


def pmap(num, entries):
    """map<string, message> as repeated entries {1: key, 2: value}."""
    return b"".join(msg(num, fld(1, 2, k), fld(2, 2, v)) for k, v in entries)


FP16, FP32, INT32, BOOLT, STRING, INT8, UINT8, UINT4 = 10, 11, 23, 1, 2, 21, 31, 35


def tensor_type(dt, shape):
    return b"".join([fld(1, 0, dt), fld(2, 0, len(shape))] + [msg(3, msg(1, fld(1, 0, s))) for s in shape])


def value_type(dt, shape):
    return msg(1, tensor_type(dt, shape))  # ValueType.tensorType


def state_type(dt, shape):
    return msg(5, msg(1, value_type(dt, shape)))  # ValueType.stateType{wrappedType}


def named(name, vt):
    return fld(1, 2, name) + fld(2, 2, vt)


def blob_value(dt, shape, offset):
    return fld(2, 2, value_type(dt, shape)) + msg(5, fld(1, 2, "@model_path/weights/weight.bin"), fld(2, 0, offset))


def imm_value(dt, shape, kind, payload):
    """kind: TensorValue field (1 floats, 2 ints, 3 bools, 4 strings, 5 longints, 7 bytes)."""
    return fld(2, 2, value_type(dt, shape)) + msg(3, msg(1, msg(kind, payload)))


def floats_payload(values):
    return fld(1, 2, struct.pack(f"<{len(values)}f", *values))


def ints_payload(values):
    return fld(1, 2, b"".join(varint(v) for v in values))


def op(typ, outputs, inputs=(), attrs=()):
    """inputs: [(name, [binding bytes])]; binding: name string or value bytes."""
    parts = [fld(1, 2, typ)]
    for k, bindings in inputs:
        arg = b"".join(msg(1, fld(1, 2, b) if isinstance(b, str) else fld(2, 2, b)) for b in bindings)
        parts.append(msg(2, fld(1, 2, k), fld(2, 2, arg)))
    parts += [msg(3, named(n, vt)) for n, vt in outputs]
    parts += [msg(5, fld(1, 2, k), fld(2, 2, v)) for k, v in attrs]
    return msg(3, *parts)  # Block.operations


def model(spec, opset, inputs, operations, outputs, functions=None):
    block = b"".join(operations) + b"".join(fld(2, 2, o) for o in outputs)
    function = b"".join(msg(1, named(n, vt)) for n, vt in inputs) + fld(2, 2, opset) + pmap(3, [(opset, block)])
    program = fld(1, 0, 1) + pmap(2, functions if functions is not None else [("main", function)])
    return fld(1, 0, spec) + msg(502, program)


class Blobs:
    def __init__(self):
        self.b = bytearray(64)
        self.b[4:8] = struct.pack("<I", 2)
        self.count = 0

    def add(self, code, data, elements, bits):
        while len(self.b) % 64:
            self.b.append(0)
        meta = len(self.b)
        pad_bits = (8 - (elements * bits) % 8) % 8
        self.b += struct.pack("<IIQQQ", 0xDEADBEEF, code, len(data), meta + 64, pad_bits) + b"\0" * 32
        self.b += data
        self.count += 1
        return meta

    def bytes(self):
        self.b[0:4] = struct.pack("<I", self.count)
        return bytes(self.b)


def coreml_input(model_bytes, weights):
    return struct.pack("<I", len(model_bytes)) + model_bytes + weights


def coreml_program(ios18=True):
    w = Blobs()
    embed = w.add(1, f16_bytes(floats(64)), 64, 16)
    q8 = w.add(4, bytes(rng.getrandbits(8) for _ in range(64)), 64, 8)
    u8 = w.add(3, bytes(rng.getrandbits(8) for _ in range(64)), 64, 8)
    u4 = w.add(11, bytes(rng.getrandbits(8) for _ in range(4)), 8, 4)
    f32b = w.add(2, f32_bytes(floats(4)), 4, 32)
    cache = (state_type if ios18 else value_type)(FP16, [1, 1, 8, 4])
    inputs = [("input_ids", value_type(INT32, [1, 4])), ("position_ids", value_type(INT32, [4])),
              ("causal_mask", value_type(FP16, [1, 1, 4, 12 if not ios18 else 8])),
              ("key_cache_0", cache), ("value_cache_0", cache)]
    if not ios18:
        inputs.append(("window_mask_4", value_type(FP16, [1, 1, 4, 12])))
    ops = [
        op("const", [("embed_w", value_type(FP16, [16, 4]))], attrs=[("val", blob_value(FP16, [16, 4], embed))]),
        op("const", [("half", value_type(FP32, [1]))], attrs=[("val", imm_value(FP32, [1], 1, floats_payload([0.5])))]),
        op("const", [("axis0", value_type(INT32, []))], attrs=[("val", imm_value(INT32, [], 2, ints_payload([0])))]),
        op("const", [("flags", value_type(BOOLT, [2]))], attrs=[("val", imm_value(BOOLT, [2], 3, ints_payload([1, 0])))]),
        op("const", [("shape64", value_type(INT32, [2]))], attrs=[("val", imm_value(INT32, [2], 5, ints_payload([16, 4])))]),
        op("const", [("name", value_type(STRING, []))], attrs=[("val", imm_value(STRING, [], 4, fld(1, 2, "fp16")))]),
        op("const", [("qscale", value_type(FP16, [16, 1]))],
           attrs=[("val", imm_value(FP16, [16, 1], 7, fld(1, 2, f16_bytes([0.01] * 16))))]),
        op("const", [("u4c", value_type(UINT4, [8]))], attrs=[("val", blob_value(UINT4, [8], u4))]),
        op("const", [("f32c", value_type(FP32, [4]))], attrs=[("val", blob_value(FP32, [4], f32b))]),
        op("constexpr_blockwise_shift_scale", [("deq_w", value_type(FP16, [16, 4]))],
           inputs=[("data", [blob_value(INT8, [16, 4], q8)]), ("scale", ["qscale"])]),
        op("constexpr_affine_dequantize", [("deq2", value_type(FP16, [16, 4]))],
           attrs=[("quantized_data", blob_value(UINT8, [16, 4], u8)),
                  ("zero_point", imm_value(UINT8, [1], 2, ints_payload([8]))),
                  ("scale", imm_value(FP16, [1], 7, fld(1, 2, f16_bytes([0.02])))),
                  ("axis", imm_value(INT32, [], 2, ints_payload([0])))]),
        op("gather", [("h", value_type(FP16, [1, 4, 4]))],
           inputs=[("x", ["embed_w"]), ("indices", ["input_ids"]), ("axis", ["axis0"])]),
        op("read_state", [("k", value_type(FP16, [1, 1, 8, 4]))], inputs=[("input", ["key_cache_0"])])
        if ios18 else b"",
        op("linear", [("logits", value_type(FP16, [1, 4, 16]))], inputs=[("x", ["h"]), ("weight", ["deq_w"])]),
    ]
    spec, opset = (9, "CoreML8") if ios18 else (8, "CoreML7")
    return model(spec, opset, inputs, ops, ["logits"]), w.bytes()


def coreml_seeds():
    m18, w18 = coreml_program(True)
    out("coreml", "ios18-state-program.bin", coreml_input(m18, w18))
    m17, w17 = coreml_program(False)
    out("coreml", "ios17-cache-inputs-window-mask.bin", coreml_input(m17, w17))
    blobs = Blobs()
    for code, bits, n in ((1, 16, 9), (2, 32, 3), (3, 8, 5), (4, 8, 7), (11, 4, 33)):
        blobs.add(code, bytes(rng.getrandbits(8) for _ in range((n * bits + 7) // 8)), n, bits)
    bw = blobs.bytes()
    out("coreml", "blobs-only.bin", coreml_input(b"", bw))

    # Hostile.
    out("coreml", "hostile-truncated-model.bin", coreml_input(m18[: len(m18) // 2], w18))
    out("coreml", "hostile-length-prefix-past-end.bin", struct.pack("<I", 0xFFFFFFFF) + m18)
    out("coreml", "hostile-short.bin", b"\x01\x00")
    bad = bytearray(w18)
    bad[64:68] = b"\0\0\0\0"
    out("coreml", "hostile-blob-sentinel.bin", coreml_input(m18, bytes(bad)))
    bad = bytearray(w18)
    bad[4:8] = struct.pack("<I", 3)
    out("coreml", "hostile-blob-version.bin", coreml_input(m18, bytes(bad)))
    bad = bytearray(w18)
    struct.pack_into("<Q", bad, 64 + 8, 1 << 40)  # the first blob's size
    out("coreml", "hostile-blob-size.bin", coreml_input(m18, bytes(bad)))
    bad = bytearray(w18)
    struct.pack_into("<Q", bad, 64 + 16, 0)  # the first blob's data offset
    out("coreml", "hostile-blob-data-offset.bin", coreml_input(m18, bytes(bad)))
    out("coreml", "hostile-weights-truncated.bin", coreml_input(m18, w18[:100]))
    out("coreml", "hostile-no-main.bin",
        coreml_input(model(9, "CoreML8", [], [], ["x"], functions=[("other", fld(2, 2, "CoreML8"))]), w18))
    out("coreml", "hostile-opset-without-block.bin",
        coreml_input(model(9, "CoreML8", [], [], ["x"], functions=[("main", fld(2, 2, "CoreML8"))]), w18))
    out("coreml", "hostile-no-program.bin", coreml_input(fld(1, 0, 9), w18))
    unknown = model(9, "CoreML8", [("x", value_type(FP16, [2]))],
                    [op("frobnicate", [("y", value_type(FP16, [2]))], inputs=[("x", ["x"])])], ["y"])
    out("coreml", "hostile-unknown-op.bin", coreml_input(unknown, w18))
    mismatch = model(9, "CoreML8", [],
                     [op("const", [("c", value_type(FP32, [3]))],
                         attrs=[("val", imm_value(FP32, [2], 1, floats_payload([1.0, 2.0])))])], ["c"])
    out("coreml", "hostile-const-shape-mismatch.bin", coreml_input(mismatch, w18))
    count = model(9, "CoreML8", [],
                  [op("const", [("c", value_type(FP32, [5]))],
                      attrs=[("val", imm_value(FP32, [5], 1, floats_payload([1.0, 2.0])))])], ["c"])
    out("coreml", "hostile-const-value-count.bin", coreml_input(count, w18))
    wrong_blob = model(9, "CoreML8", [], [op("const", [("c", value_type(FP32, [16, 4]))],
                                             attrs=[("val", blob_value(FP32, [16, 4], 64))])], ["c"])
    out("coreml", "hostile-blob-type-mismatch.bin", coreml_input(wrong_blob, w18))
    far_blob = model(9, "CoreML8", [], [op("const", [("c", value_type(FP16, [4]))],
                                           attrs=[("val", blob_value(FP16, [4], (1 << 64) - 64))])], ["c"])
    out("coreml", "hostile-blob-offset-top.bin", coreml_input(far_blob, w18))
    no_ids = model(9, "CoreML8", [("tokens", value_type(INT32, [1, 4]))], [], ["tokens"])
    out("coreml", "hostile-no-input-ids.bin", coreml_input(no_ids, w18))
    no_cache = model(9, "CoreML8", [("input_ids", value_type(INT32, [1, 4]))], [], ["input_ids"])
    out("coreml", "hostile-no-key-cache.bin", coreml_input(no_cache, w18))
    dynamic = model(9, "CoreML8", [("input_ids", fld(1, 2, fld(1, 0, INT32) + fld(2, 0, 2) + msg(3, b"") + msg(3, b"")))],
                    [], ["input_ids"])
    out("coreml", "hostile-dynamic-input-shape.bin", coreml_input(dynamic, w18))


def main():
    gguf_seeds()
    hf_seeds()
    tokenizer_seeds()
    ir_seeds()
    bundle_seeds()
    coreml_seeds()
    total = 0
    for target, files in sorted(written.items()):
        size = sum(n for _, n in files)
        total += size
        print(f"{target}: {len(files)} seeds, {size} bytes (largest {max(n for _, n in files)})")
    print(f"total: {total} bytes")


if __name__ == "__main__":
    main()
