"""Drives `slmc serve` with the official `openai` package (tests/serve.rs runs it).

argv: base URL, API key, the greedy answer `slmc run --chat` gives to QUESTION, and the
base URL of a second server on the same bundle with a queue of one (for the 429 answer).
Prints one JSON line with the load tests' figures.
"""
import json
import sys
import threading
import time

import openai

BASE, KEY, EXPECTED, SMALL_QUEUE = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
QUESTION = "What is the capital of France?"
client = openai.OpenAI(base_url=BASE + "/v1", api_key=KEY, max_retries=0, timeout=300)
MESSAGES = [{"role": "user", "content": QUESTION}]


def chat(**kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 24)
    return client.chat.completions.create(model="smollm2", messages=kw.pop("messages", MESSAGES), **kw)


# Greedy chat equals `slmc run`'s answer on the same bundle.
r = chat()
assert r.choices[0].message.content == EXPECTED, (r.choices[0].message.content, EXPECTED)
assert r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason
assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 24, r.usage
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

# Streaming chat: the deltas add up to the same answer; the last chunk has the reason.
parts, finish = [], None
for chunk in chat(stream=True):
    if chunk.choices:
        parts.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
assert "".join(parts) == EXPECTED, ("".join(parts), EXPECTED)
assert finish in ("stop", "length") and len(parts) > 2, (finish, parts)

# A stop sequence ends the text before it, with finish_reason "stop".
word = EXPECTED.split()[2]
cut = EXPECTED[: EXPECTED.index(word)]
r = chat(stop=[word])
assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop", (r.choices[0].message.content, cut)
streamed = "".join(c.choices[0].delta.content or "" for c in chat(stop=word, stream=True) if c.choices)
assert streamed == cut, (streamed, cut)

# Completions: a raw prompt, max_tokens respected, logprobs per token.
c = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=2)
assert c.choices[0].text and c.usage.completion_tokens <= 8, c
lp = c.choices[0].logprobs
assert len(lp.tokens) == c.usage.completion_tokens and all(x <= 0 for x in lp.token_logprobs), lp
# Two alternatives per position; greedy, so the chosen token is the likeliest of them.
assert len(lp.top_logprobs) == len(lp.tokens), lp
for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
    assert 1 <= len(top) <= 2 and abs(max(top.values()) - chosen) < 1e-9 and top.get(token) == chosen, (token, top)

# Chat logprobs, and seeded sampling repeats itself.
r = chat(logprobs=True, max_tokens=6)
content = r.choices[0].logprobs.content
assert len(content) == r.usage.completion_tokens and all(t.logprob <= 0 for t in content), content
assert all(t.top_logprobs == [] for t in content), content
# top_logprobs: the 3 likeliest per position, most likely first, the greedy pick among them.
r = chat(logprobs=True, top_logprobs=3, max_tokens=6)
for t in r.choices[0].logprobs.content:
    tops = t.top_logprobs
    assert len(tops) == 3 and tops[0].logprob >= tops[1].logprob >= tops[2].logprob, t
    assert tops[0].token == t.token and tops[0].logprob == t.logprob, t
assert r.choices[0].message.content == EXPECTED[: len(r.choices[0].message.content)], r
a = chat(temperature=0.9, top_p=0.95, seed=11, max_tokens=12).choices[0].message.content
b = chat(temperature=0.9, top_p=0.95, seed=11, max_tokens=12).choices[0].message.content
assert a == b, (a, b)

# Confidence and abstention (an extension, as `slmc run --abstain-below`).
r = chat(extra_body={"abstain_below": 0.0}).to_dict()
assert 0 < r["confidence"] <= 1 and r["abstained"] is False, r
assert r["choices"][0]["message"]["content"] == EXPECTED, r
r = chat(extra_body={"abstain_below": 1.0}).to_dict()
assert r["abstained"] is True, r
assert r["choices"][0]["message"]["content"] == "I can't answer that with enough confidence.", r

# Models, and OpenAI-style errors.
assert client.models.list().data[0].id
try:
    chat(messages=[])
    raise AssertionError("an empty messages list was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and "messages" in str(e), e
try:
    chat(temperature=5)
    raise AssertionError("temperature 5 was accepted")
except openai.BadRequestError as e:
    assert "temperature" in str(e), e
try:
    openai.OpenAI(base_url=BASE + "/v1", api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401, e

# A client that goes away stops its generation: a long count closed after its first chunk
# leaves the worker free at once (uncancelled, 1,500 tokens take over 10 s here).
count = client.completions.create(
    model="smollm2", prompt="1, 2, 3, 4, 5, 6, 7, 8,", max_tokens=1500, temperature=0, stream=True
)
next(iter(count))
count.close()
started = time.monotonic()
chat(max_tokens=4)
cancelled_within = time.monotonic() - started
assert cancelled_within < 4, f"the closed stream kept the worker busy for {cancelled_within:.1f} s"

# Load: 8 clients, 100 requests, bounded in time; only the queue-full answer may fail.
def load(base, clients, requests):
    c = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=300)
    lock = threading.Lock()
    latencies, limited, errors = [], [0], []
    pending = list(range(requests))

    def client_loop():
        while True:
            with lock:
                if not pending:
                    return
                pending.pop()
            start = time.monotonic()
            try:
                c.chat.completions.create(model="smollm2", messages=MESSAGES, temperature=0, max_tokens=4)
                with lock:
                    latencies.append(time.monotonic() - start)
            except openai.RateLimitError as e:
                assert e.status_code == 429 and "queue" in str(e), e
                with lock:
                    limited[0] += 1
            except Exception as e:  # noqa: BLE001 - any other failure fails the test
                with lock:
                    errors.append(repr(e))

    started = time.monotonic()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads), "the load test ran past its time limit"
    assert not errors, errors
    assert len(latencies) + limited[0] == requests and latencies, (len(latencies), limited[0])
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    return {
        "requests": requests, "completed": len(latencies), "queue_full": limited[0],
        "seconds": round(time.monotonic() - started, 2), "p50_s": round(pick(0.50), 4), "p95_s": round(pick(0.95), 4),
    }


# Eight clients fit the default queue (one running, eight waiting): every request completes.
main = load(BASE, 8, 100)
assert main["completed"] == 100, main
# With a queue of one, eight clients at once meet the documented 429.
small = load(SMALL_QUEUE, 8, 40)
assert small["queue_full"] > 0, small
print(json.dumps({"default_queue": main, "queue_of_one": small, "after_disconnect_s": round(cancelled_within, 3)}))
