"""Greedy tokens from onnxruntime-genai for an slmc ONNX artifact directory, as JSON.

usage: genai_greedy.py DIR PROMPT_IDS N   (PROMPT_IDS comma-separated; stops at N tokens or EOS)
"""
import sys, json, onnxruntime_genai as og
d, ids = sys.argv[1], [int(x) for x in sys.argv[2].split(",")]
n = int(sys.argv[3])
model = og.Model(d)
params = og.GeneratorParams(model)
params.set_search_options(do_sample=False, max_length=len(ids) + n)
gen = og.Generator(model, params)
gen.append_tokens(ids)
out = []
while not gen.is_done() and len(out) < n:
    gen.generate_next_token()
    out.append(int(gen.get_next_tokens()[0]))
print(json.dumps(out))
