"""generate: greedy decoding of SmolLM2-135M-Instruct (its GGUF), tailtune with and without
the KV cache, and transformers' `generate` on the same model, same prompt, same threads.

    python benches/generate.py [--new-tokens 32] [--repeats 3] [--json out.json]

Verifies first that all three produce the same tokens. Reports decode tokens/s (prompt
processing included, as a user sees it) for a short and a long prompt: without a cache the cost
per token grows with the sequence, with it the prompt runs once.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402


def run(args=None) -> dict:
    args = C.parse_args(build_parser(), args, C.REFERENCE + ("accelerate", "gguf"))
    t0 = time.perf_counter()
    C.set_thread_env(args.threads)
    C.quiet_hf()
    C.ensure_repo_on_path()
    import torch
    from transformers import AutoModelForCausalLM

    import engine
    from engine.io.resolve import resolve_model_path
    path = resolve_model_path("smollm2")
    threads = C.pin_threads(args.threads)
    model = engine.load(path)
    tok = engine.load_tokenizer(path)
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    import json as json_mod
    long_text = inspect.getdoc(json_mod)[:1500]
    # prompts whose answers run past --new-tokens: both sides stop at the end-of-turn token, and
    # forcing a length (min_new_tokens) would make transformers suppress that token
    prompts = {"short": "Write a long poem about the sea.",
               "long": "Explain in detail, step by step, what this documentation describes:\n\n" + long_text}
    results = {}
    for name, text in prompts.items():
        ids = tok.chat_ids([{"role": "user", "content": text}])
        n = args.new_tokens

        def ours(cache=True):
            return engine.generate(model, ids, max_new_tokens=n, use_cache=cache, stop=tok.eos_ids)

        def theirs():
            with torch.no_grad():
                out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                  eos_token_id=list(tok.eos_ids), pad_token_id=tok.eos_ids[0])
            return out[0, len(ids):].tolist()

        a, b, c = ours(True), ours(False), theirs()
        if not (a == b == c):
            raise SystemExit(f"outputs differ on the {name} prompt:\n{a}\n{b}\n{c}")
        times = {"engine_cache": [], "engine_no_cache": [], "torch_generate": []}
        for _ in range(args.repeats):  # alternate the three
            times["engine_cache"].append(C.timed(ours, True)[0])
            times["engine_no_cache"].append(C.timed(ours, False)[0])
            times["torch_generate"].append(C.timed(theirs)[0])
        res = {"prompt_tokens": len(ids), "new_tokens": len(a)}
        for k, ts in times.items():
            res[k] = C.summarize([len(a) / t for t in ts])
        res["cache_speedup"] = res["engine_cache"]["median"] / res["engine_no_cache"]["median"]
        res["engine_vs_torch"] = res["engine_cache"]["median"] / res["torch_generate"]["median"]
        results[name] = res
    result = {"workload": "generate", "threads": threads, "results": results,
              "environment": C.environment(), "elapsed_s": time.perf_counter() - t0}
    return C.finish(args, result, report)


def report(result: dict) -> str:
    rows = [[name, r["prompt_tokens"], r["new_tokens"], C.fmt_range(r["engine_cache"]),
             C.fmt_range(r["engine_no_cache"]), C.fmt_range(r["torch_generate"]),
             f"{r['cache_speedup']:.2f}x", f"{r['engine_vs_torch']:.2f}x"]
            for name, r in result["results"].items()]
    return (C.table(["prompt", "prompt tok", "new tok", "tailtune cache tok/s", "tailtune no-cache tok/s",
                     "torch generate tok/s", "cache speedup", "tailtune/torch"], rows)
            + (f"\n({result['elapsed_s']:.0f} s)" if "elapsed_s" in result else ""))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=C.PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    C.add_output_args(ap)
    return ap


if __name__ == "__main__":
    run(sys.argv[1:])
