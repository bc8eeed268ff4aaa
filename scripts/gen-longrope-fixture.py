#!/usr/bin/env python3
"""Writes fixtures/arch/phi4-mini-longrope-f32: a tiny random Phi3ForCausalLM shaped like
Phi-4-mini (fused qkv and gate/up, 75% partial rotary, GQA, tied embeddings, LongRoPE with
short and long factor lists) and transformers' golden outputs for it, in the format of
../shared/golden/arch (see that README). Needs transformers 5 and torch (the benchmark
venv of scripts/bench-onnx has both): ~/.cache/slmc/bench-venv/bin/python this-script.

original_max_position_embeddings is 32 so that the 16 greedy steps after the 29-token
case cross it: transformers rotates every step whose sequence passes 32 with the long
factors (one token per step after the prompt), and the cached keys of earlier positions
keep their short-factor rotation, which is slmc's per-position rule.
"""
import hashlib
import json
import os
import sys

import torch
from transformers import Phi3Config, Phi3ForCausalLM
import transformers

NAME = "phi4-mini-longrope-f32"
SEED = 4242
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "arch", NAME)

g = torch.Generator().manual_seed(SEED)
hidden, heads, kv_heads, layers, inter, vocab = 128, 2, 1, 2, 256, 320
head_dim = hidden // heads
rotary = int(head_dim * 0.75)
short = [round(1.0 + 0.5 * float(torch.rand(1, generator=g)), 4) for _ in range(rotary // 2)]
long = [round(1.0 + 7.0 * float(torch.rand(1, generator=g)), 4) for _ in range(rotary // 2)]
config = Phi3Config(
    vocab_size=vocab,
    hidden_size=hidden,
    intermediate_size=inter,
    num_hidden_layers=layers,
    num_attention_heads=heads,
    num_key_value_heads=kv_heads,
    max_position_embeddings=256,
    original_max_position_embeddings=32,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    rope_parameters={
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.75,
        "short_factor": short,
        "long_factor": long,
        "original_max_position_embeddings": 32,
    },
)
config._attn_implementation = "eager"
torch.manual_seed(SEED)
model = Phi3ForCausalLM(config).eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith("embed_tokens.weight"):
            p.copy_(0.25 * torch.randn(p.shape, generator=g))
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            p.copy_(4 * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        else:
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
os.makedirs(OUT, exist_ok=True)
model.save_pretrained(OUT)
st = os.path.join(OUT, "model.safetensors")
data = open(st, "rb").read()

cases = []
for length in (1, 7, 29):
    ids = torch.randint(3, vocab, (1, length), generator=g)
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
        out = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, eos_token_id=None)
    gaps = []
    for s in out.scores:
        top = torch.topk(s[0], 2).values
        gaps.append(round(float(top[0] - top[1]), 5))
    cases.append({
        "input_ids": ids[0].tolist(),
        "final_position_logits": [round(float(v), 5) for v in logits],
        "final_position_argmax": int(logits.argmax()),
        "final_position_logsumexp": round(float(torch.logsumexp(logits, 0)), 5),
        "greedy_ids": out.sequences[0, length:].tolist(),
        "greedy_top1_minus_top2": gaps,
    })
golden = {
    "name": NAME,
    "architecture": "Phi3ForCausalLM",
    "model_type": "phi3",
    "storage_dtype": "float32",
    "compute_dtype": "float32",
    "tie_word_embeddings": True,
    "seed": SEED,
    "init": "norm weights 1+0.1*N(0,1); embed_tokens 0.25*N(0,1); o_proj/down_proj 4*N(0,1)/sqrt(fan_in); "
            "other matrices N(0,1)/sqrt(fan_in); LongRoPE short factors U(1,1.5), long U(1,8)",
    "safetensors_sha256": hashlib.sha256(data).hexdigest(),
    "safetensors_bytes": len(data),
    "framework": {"transformers": transformers.__version__, "torch": torch.__version__},
    "settings": {
        "attn_implementation": "eager",
        "device": "cpu",
        "mode": "eval",
        "decoding": "greedy argmax, exactly 16 new tokens, EOS does not stop, KV cache (one token per step "
                    "after the prompt, so steps past position 32 use the long factors)",
        "logit_rounding_decimals": 5,
        "positions": "0..len(input_ids)-1, no BOS added",
    },
    "cases": cases,
}
with open(os.path.join(OUT, "golden.json"), "w") as f:
    json.dump(golden, f)
print(OUT, len(data), "bytes", file=sys.stderr)
