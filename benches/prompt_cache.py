"""The sidecar's prompt cache and the gateway's prefix affinity, measured (a benchmark, not a
test: it prints a table and asserts nothing).

    .venv/bin/python benches/prompt_cache.py [--skip-reference] [--threads 2]

On SmolLM2-135M-Instruct (fetch it first: `target/release/lumen-llama fetch-model smollm2`),
against llama-cpp-python on the same GGUF and threads in the same run when it is installed
(`pip install llama-cpp-python` into the venv; it builds llama.cpp, about 10 minutes on two
cores; without it those columns are left empty):

1. prompt processing tok/s: a ~2,000-token prompt, cold (nothing cached), 1 token generated;
2. generation tok/s: 128 tokens streamed after a short prompt;
3. time to first token of turn 2 of a chat whose system prompt is ~2,000 tokens (turn 1 ran
   just before, so both keep its prefix), by default (the last answer is read again, for
   byte-identical answers) and with `cache_generated=true` (kept, as llama-cpp-python does);
4. the gateway with two sidecars behind one route (one thread each, 4 slots): 8 conversations
   of 6 turns sharing a ~1,500-token system prompt, mean and p90 time to first token of turns
   2-6 with `prefix_affinity: true` and with plain round robin.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "python"))
from conftest import BIN_DIR, Gateway, free_port, wait_http  # noqa: E402

MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
FILLER = (
    "The harbour master keeps a ledger of every ship that enters the port, its cargo, its crew "
    "and the weather on the day it arrived. "
)


def system_prompt(tokens: int) -> str:
    # About 25 tokens per sentence for this tokenizer; /tokenize gives the exact count below.
    return "You are a helpful assistant. Use this record when asked.\n" + FILLER * (tokens // 25)


class Sidecar:
    def __init__(self, threads: int, slots: int, ctx: int, extra: str = ""):
        self.port = free_port()
        opts = f"ctx={ctx},slots={slots},threads={threads}{extra}"
        self.proc = subprocess.Popen(
            [str(BIN_DIR / "lumen-llama"), "serve", "--port", str(self.port), "--model", f"smollm2={MODEL}:{opts}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        wait_http(f"{self.base}/health", timeout=120, proc=self.proc)

    def post(self, path, body):
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.load(r)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def stream_ttft(url: str, body: dict):
    """(seconds to the first content token, the whole text, usage) of a streamed chat."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    start = time.perf_counter()
    first, text, usage = None, "", None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk.get("choices", []):
                t = c.get("delta", {}).get("content")
                if t:
                    if first is None:
                        first = time.perf_counter() - start
                    text += t
            usage = chunk.get("usage") or usage
    return first if first is not None else time.perf_counter() - start, text, usage


def lumen_figures(threads: int, prefix_tokens: int, extra: str = ""):
    s = Sidecar(threads, slots=1, ctx=4096, extra=extra)
    try:
        system = system_prompt(prefix_tokens)
        count = s.post("/tokenize", {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]})["count"]
        # 1. Prompt processing, cold: a prompt no slot holds (a different first sentence each run).
        pp = []
        for run in range(2):
            body = {"model": "smollm2", "temperature": 0, "max_tokens": 1,
                    "messages": [{"role": "system", "content": f"Run {run}. " + system}, {"role": "user", "content": "Hi"}]}
            t = time.perf_counter()
            r = s.post("/v1/chat/completions", body)
            elapsed = time.perf_counter() - t
            pp.append((r["usage"]["prompt_tokens"] - r["usage"]["prompt_tokens_details"]["cached_tokens"]) / elapsed)
        # 2. Generation.
        body = {"model": "smollm2", "temperature": 0, "max_tokens": 128, "messages": [{"role": "user", "content": "Tell me a long story about a ship."}]}
        t = time.perf_counter()
        ttft, _, usage = stream_ttft(s.base + "/v1/chat/completions", body)
        gen = (usage["completion_tokens"] - 1) / (time.perf_counter() - t - ttft)
        # 3. Turn 2 of a chat with a long system prompt.
        turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "Which ships came in today?"}]
        r = s.post("/v1/chat/completions", {"model": "smollm2", "temperature": 0, "max_tokens": 24, "messages": turn1})
        turn2 = turn1 + [r["choices"][0]["message"], {"role": "user", "content": "And yesterday?"}]
        ttft2, _, usage2 = stream_ttft(s.base + "/v1/chat/completions", {"model": "smollm2", "temperature": 0, "max_tokens": 8, "messages": turn2})
        # 4. The same after a reader's pause (1 s): the sidecar reads the answer again meanwhile.
        turn1 = [{"role": "system", "content": "Today. " + system}, {"role": "user", "content": "Which ships came in today?"}]
        r = s.post("/v1/chat/completions", {"model": "smollm2", "temperature": 0, "max_tokens": 24, "messages": turn1})
        time.sleep(1.0)
        turn2 = turn1 + [r["choices"][0]["message"], {"role": "user", "content": "And yesterday?"}]
        ttft3, _, usage3 = stream_ttft(s.base + "/v1/chat/completions", {"model": "smollm2", "temperature": 0, "max_tokens": 8, "messages": turn2})
        return {"prompt_tokens": count, "pp": max(pp), "gen": gen, "ttft2": ttft2,
                "cached2": usage2["prompt_tokens_details"]["cached_tokens"], "prompt2": usage2["prompt_tokens"],
                "ttft_paused": ttft3, "cached_paused": usage3["prompt_tokens_details"]["cached_tokens"],
                "prompt_paused": usage3["prompt_tokens"]}
    finally:
        s.stop()


def eviction_figures(threads: int, prefix_tokens: int, extra: str):
    """Turn 2 of conversation A after conversation B took the only slot: A's time to first token."""
    s = Sidecar(threads, slots=1, ctx=4096, extra=extra)
    try:
        system = system_prompt(prefix_tokens)
        chats = [[{"role": "system", "content": f"{who} " + system}, {"role": "user", "content": "Which ships came in today?"}] for who in ["Anna.", "Bert."]]
        for chat in chats:
            r = s.post("/v1/chat/completions", {"model": "smollm2", "temperature": 0, "max_tokens": 24, "messages": chat})
            chat += [r["choices"][0]["message"], {"role": "user", "content": "And yesterday?"}]
        ttft, _, usage = stream_ttft(s.base + "/v1/chat/completions", {"model": "smollm2", "temperature": 0, "max_tokens": 8, "messages": chats[0]})
        return {"ttft": ttft, "cached": usage["prompt_tokens_details"]["cached_tokens"], "prompt": usage["prompt_tokens"]}
    finally:
        s.stop()


def reference_figures(threads: int, prefix_tokens: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(MODEL), n_ctx=4096, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
    system = system_prompt(prefix_tokens)
    pp = []
    for run in range(2):
        llm.reset()
        messages = [{"role": "system", "content": f"Run {run}. " + system}, {"role": "user", "content": "Hi"}]
        t = time.perf_counter()
        r = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=1)
        pp.append(r["usage"]["prompt_tokens"] / (time.perf_counter() - t))
    llm.reset()
    t = time.perf_counter()
    first, n = None, 0
    for chunk in llm.create_chat_completion(messages=[{"role": "user", "content": "Tell me a long story about a ship."}], temperature=0, max_tokens=128, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            n += 1
            if first is None:
                first = time.perf_counter()
    gen = (n - 1) / (time.perf_counter() - first)
    turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "Which ships came in today?"}]
    r = llm.create_chat_completion(messages=turn1, temperature=0, max_tokens=24)
    turn2 = turn1 + [{"role": "assistant", "content": r["choices"][0]["message"]["content"]}, {"role": "user", "content": "And yesterday?"}]
    t = time.perf_counter()
    for chunk in llm.create_chat_completion(messages=turn2, temperature=0, max_tokens=8, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            break
    return {"pp": max(pp), "gen": gen, "ttft2": time.perf_counter() - t}


def affinity_figures(conversations: int, turns: int, prefix_tokens: int):
    sidecars = [Sidecar(1, slots=4, ctx=4096) for _ in range(2)]
    providers = "".join(
        f"  s{i}: {{ base_url: \"{s.base}/v1\", timeout: 600s, health: {{ interval: 500ms }} }}\n" for i, s in enumerate(sidecars)
    )
    targets = "[ { provider: s0, model: smollm2 }, { provider: s1, model: smollm2 } ]"
    g = Gateway(
        "auth: off\nproviders:\n" + providers + "routes:\n"
        f"  - {{ model: sticky, strategy: round_robin, prefix_affinity: true, targets: {targets} }}\n"
        f"  - {{ model: rr, strategy: round_robin, targets: {targets} }}\n"
    )
    try:
        system = system_prompt(prefix_tokens)
        out = {}
        for route in ["sticky", "rr"]:
            histories = [[{"role": "system", "content": system}, {"role": "user", "content": f"Tell me about ship number {i}."}] for i in range(conversations)]
            ttfts, cached = [], []
            for turn in range(turns):
                for h in histories:
                    ttft, text, usage = stream_ttft(g.base_url + "/chat/completions", {"model": route, "temperature": 0, "max_tokens": 16, "messages": h})
                    if turn > 0:
                        ttfts.append(ttft)
                        cached.append(usage["prompt_tokens_details"]["cached_tokens"] / usage["prompt_tokens"])
                    h += [{"role": "assistant", "content": text}, {"role": "user", "content": "What happened next?"}]
            ttfts.sort()
            out[route] = {"mean": statistics.mean(ttfts), "p90": ttfts[int(len(ttfts) * 0.9)], "cached": statistics.mean(cached)}
        return out
    finally:
        g.stop()
        for s in sidecars:
            s.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-affinity", action="store_true")
    args = ap.parse_args()
    if not MODEL.exists():
        sys.exit(f"{MODEL} is missing: run target/release/lumen-llama fetch-model smollm2")
    ours = lumen_figures(args.threads, 2000)
    kept = lumen_figures(args.threads, 2000, ",cache_generated=true")
    ref = None if args.skip_reference else reference_figures(args.threads, 2000)
    evicted = eviction_figures(args.threads, 2000, "")
    restored = eviction_figures(args.threads, 2000, ",prompt_cache_ram=512MiB")
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    ratio = lambda a, b: "—" if b is None else f"{a / b:.2f}x"  # noqa: E731
    print(f"\nSmolLM2-135M-Instruct Q4_1, {args.threads} threads; prompt ~{ours['prompt_tokens']} tokens")
    print("| | lumen-llama | llama-cpp-python | ratio |")
    print("|---|---|---|---|")
    print(f"| prompt processing, tok/s (cold) | {ours['pp']:.0f} | {fmt(ref and ref['pp'], '.0f')} | {ratio(ours['pp'], ref and ref['pp'])} |")
    print(f"| generation, tok/s | {ours['gen']:.0f} | {fmt(ref and ref['gen'], '.0f')} | {ratio(ours['gen'], ref and ref['gen'])} |")
    print(
        f"| turn 2 time to first token, s ({ours['cached2']} of {ours['prompt2']} tokens cached) | {ours['ttft2']:.2f} | "
        f"{fmt(ref and ref['ttft2'], '.2f')} | {ratio(ours['ttft2'], ref and ref['ttft2'])} |"
    )
    print(
        f"| the same, `cache_generated=true` ({kept['cached2']} of {kept['prompt2']} cached) | {kept['ttft2']:.2f} | "
        f"{fmt(ref and ref['ttft2'], '.2f')} | {ratio(kept['ttft2'], ref and ref['ttft2'])} |"
    )
    print(
        f"| the same after a 1 s pause, default ({ours['cached_paused']} of {ours['prompt_paused']} cached) | {ours['ttft_paused']:.2f} | "
        f"{fmt(ref and ref['ttft2'], '.2f')} | {ratio(ours['ttft_paused'], ref and ref['ttft2'])} |"
    )
    print("\nOne slot; conversation B took it between A's turns 1 and 2: A's turn 2")
    print("| | time to first token, s | tokens cached |")
    print("|---|---|---|")
    print(f"| default | {evicted['ttft']:.2f} | {evicted['cached']} of {evicted['prompt']} |")
    print(f"| `prompt_cache_ram=512MiB` | {restored['ttft']:.2f} | {restored['cached']} of {restored['prompt']} |")
    if not args.skip_affinity:
        a = affinity_figures(8, 6, 1500)
        print("\nGateway, two sidecars (1 thread, 4 slots each), 8 conversations x 6 turns, ~1,500-token shared system prompt")
        print("| route | TTFT turns 2-6, mean s | p90 s | prompt share cached |")
        print("|---|---|---|---|")
        for route, label in [("sticky", "prefix_affinity + round_robin"), ("rr", "round_robin")]:
            f = a[route]
            print(f"| {label} | {f['mean']:.2f} | {f['p90']:.2f} | {f['cached']:.0%} |")


if __name__ == "__main__":
    main()
