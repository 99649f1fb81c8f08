"""Export a fine-tuned model to GGUF and run it in llama.cpp: the same tokens, the same greedy
answer as tailtune's own generation.

    tailtune finetune --model smollm2 --data examples/claims/train.jsonl --train-last 2 \
        --steps 40 --lr 3e-4 --seq-len 192 --out runs/claims
    python examples/run_in_llamacpp.py --model runs/claims --dtype Q8_0

At F32, F16 and Q8_0 the two agree token for token (measured on the claims run); llama.cpp
computes quantized dot products on 8-bit activations, so at 4 and 5 bits, where a model of
135M parameters loses its answers anyway, the two drift apart after a few tokens.

The llama.cpp side needs its Python binding (`pip install llama-cpp-python`, which compiles
llama.cpp: ~20 minutes on 2 cores). Without it, the script exports, prints tailtune's answer
and the llama.cpp command line that runs the file.
"""
from __future__ import annotations

import argparse
import os
import sys

import engine
from engine.io.resolve import resolve_model_path

CLAIM = ("To whom it may concern: A delivery van scraped the side of my parked car outside Denver. "
         "The damage comes to $1,315. The incident was 23 days ago.")
SYSTEM = "You triage insurance claims. Answer with the category, severity, fraud risk and route."


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="runs/claims", help="a run directory, HF directory or .gguf")
    ap.add_argument("--out", help="GGUF file to write (default: <model>.<dtype>.gguf)")
    ap.add_argument("--dtype", default="Q8_0", help="F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0")
    ap.add_argument("--prompt", default=CLAIM, help="the user message")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    a = ap.parse_args(argv)

    model = engine.load(a.model)
    tok = engine.load_tokenizer(resolve_model_path(a.model))
    out = a.out or f"{os.path.normpath(a.model)}.{a.dtype.lower()}.gguf"
    model.save(out, dtype=a.dtype, tokenizer=tok)
    print(f"wrote {out} ({os.path.getsize(out) / 2**20:.0f} MiB)")

    # tailtune's answer from the exported file (its weights as llama.cpp will see them)
    exported = engine.load(out)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": a.prompt}]
    prompt = tok.chat_prompt(messages)
    ids = tok.encode(prompt, add_special_tokens=False)
    ours = [int(i) for i in engine.generate(exported, ids, max_new_tokens=a.max_new_tokens,
                                            temperature=0.0, stop=tok.eos_ids)]
    print(f"tailtune:  {tok.decode(ours, skip_special_tokens=True)!r}")

    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python is not installed; with llama.cpp's tools, run:\n  llama-cli -m "
              f"{out} -sys {SYSTEM!r} -p {a.prompt!r} --temp 0 -n {a.max_new_tokens}")
        return 0
    llm = Llama(model_path=out, n_ctx=1024, n_threads=os.cpu_count(), verbose=False)
    theirs_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    print(f"prompt tokens equal: {theirs_ids == ids}")
    theirs = []
    for t in llm.generate(theirs_ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        if t in tok.eos_ids or len(theirs) == a.max_new_tokens:
            break
        theirs.append(int(t))
    print(f"llama.cpp: {tok.decode(theirs, skip_special_tokens=True)!r}")
    same = theirs == [i for i in ours if i not in tok.eos_ids]
    print("same greedy tokens" if same else "the greedy tokens differ")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
