#!/usr/bin/env python3
"""Writes the project's own tiny architecture fixtures, made by transformers, with
transformers' golden outputs, in the format of ../shared/golden/arch (see that README):

* fixtures/arch/phi4-mini-longrope-f32: Phi3ForCausalLM shaped like Phi-4-mini (fused qkv
  and gate/up, 75% partial rotary, GQA, tied embeddings) with LongRoPE short and long
  factor lists. original_max_position_embeddings is 32 so that the 16 greedy steps after
  the 29-token case cross it: there transformers' Phi-3 drops its cache and re-encodes the
  whole sequence with the long factors.
* fixtures/arch/olmo2-f32: Olmo2ForCausalLM (norms after attention and the MLP only, q/k
  RMSNorm over the whole projection), GQA, untied.
* fixtures/arch/smollm3-nope-f32: SmolLM3ForCausalLM with NoPE layers (every 2nd layer has
  no rotary embedding), GQA, tied.

Needs transformers 5 and torch (the benchmark venv of scripts/bench-onnx has both):
~/.cache/slmc/bench-venv/bin/python scripts/gen-arch-fixtures.py [NAME ...]
"""
import hashlib
import json
import os
import sys

import torch
import transformers
from transformers import Olmo2Config, Olmo2ForCausalLM, Phi3Config, Phi3ForCausalLM, SmolLM3Config, SmolLM3ForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "arch")
INIT = ("norm weights 1+0.1*N(0,1); embed_tokens 0.25*N(0,1); o_proj/down_proj 4*N(0,1)/sqrt(fan_in); "
        "other matrices N(0,1)/sqrt(fan_in)")


def phi4_mini_longrope(g):
    hidden, heads = 128, 2
    rotary = int(hidden // heads * 0.75)
    short = [round(1.0 + 0.5 * float(torch.rand(1, generator=g)), 4) for _ in range(rotary // 2)]
    long = [round(1.0 + 7.0 * float(torch.rand(1, generator=g)), 4) for _ in range(rotary // 2)]
    config = Phi3Config(
        vocab_size=320, hidden_size=hidden, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=256,
        original_max_position_embeddings=32, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": short, "long_factor": long, "original_max_position_embeddings": 32,
        },
    )
    return Phi3ForCausalLM, config, INIT + "; LongRoPE short factors U(1,1.5), long U(1,8)", (
        "greedy argmax, exactly 16 new tokens, EOS does not stop, KV cache (one token per step after the "
        "prompt; at the step past position 32 Phi-3's generate drops its cache and re-encodes the sequence "
        "with the long factors)")


def olmo2(g):
    config = Olmo2Config(
        vocab_size=288, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    return Olmo2ForCausalLM, config, INIT, "greedy argmax, exactly 16 new tokens, EOS does not stop, KV cache"


def smollm3_nope(g):
    config = SmolLM3Config(
        vocab_size=352, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        no_rope_layer_interval=2, rope_parameters={"rope_type": "default", "rope_theta": 2000000.0},
    )
    return SmolLM3ForCausalLM, config, INIT, "greedy argmax, exactly 16 new tokens, EOS does not stop, KV cache"


FIXTURES = {
    "phi4-mini-longrope-f32": (4242, phi4_mini_longrope),
    "olmo2-f32": (5151, olmo2),
    "smollm3-nope-f32": (6161, smollm3_nope),
}


def write(name, seed, make):
    out = os.path.join(ROOT, name)
    g = torch.Generator().manual_seed(seed)
    cls, config, init, decoding = make(g)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif pname.endswith("embed_tokens.weight"):
                p.copy_(0.25 * torch.randn(p.shape, generator=g))
            elif pname.endswith(("o_proj.weight", "down_proj.weight")):
                p.copy_(4 * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    data = open(os.path.join(out, "model.safetensors"), "rb").read()
    cases = []
    for length in (1, 7, 29):
        ids = torch.randint(3, config.vocab_size, (1, length), generator=g)
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
            gen = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True, eos_token_id=None)
        gaps = []
        for s in gen.scores:
            top = torch.topk(s[0], 2).values
            gaps.append(round(float(top[0] - top[1]), 5))
        cases.append({
            "input_ids": ids[0].tolist(),
            "final_position_logits": [round(float(v), 5) for v in logits],
            "final_position_argmax": int(logits.argmax()),
            "final_position_logsumexp": round(float(torch.logsumexp(logits, 0)), 5),
            "greedy_ids": gen.sequences[0, length:].tolist(),
            "greedy_top1_minus_top2": gaps,
        })
    golden = {
        "name": name,
        "architecture": cls.__name__,
        "model_type": config.model_type,
        "storage_dtype": "float32",
        "compute_dtype": "float32",
        "tie_word_embeddings": config.tie_word_embeddings,
        "seed": seed,
        "init": init,
        "safetensors_sha256": hashlib.sha256(data).hexdigest(),
        "safetensors_bytes": len(data),
        "framework": {"transformers": transformers.__version__, "torch": torch.__version__},
        "settings": {
            "attn_implementation": "eager",
            "device": "cpu",
            "mode": "eval",
            "decoding": decoding,
            "logit_rounding_decimals": 5,
            "positions": "0..len(input_ids)-1, no BOS added",
        },
        "cases": cases,
    }
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(golden, f)
    print(out, len(data), "bytes", file=sys.stderr)


if __name__ == "__main__":
    for name in sys.argv[1:] or FIXTURES:
        seed, make = FIXTURES[name]
        write(name, seed, make)
