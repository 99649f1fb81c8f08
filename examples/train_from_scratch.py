"""Train a small GPT from scratch on Python's own standard-library sources, byte by byte.

Every machine with Python has this corpus. The model should end far below the unigram entropy of
the bytes (what a model that ignores context can reach).

    python examples/train_from_scratch.py --steps 600 --save runs/stdlib-gpt
    tailtune generate --model runs/stdlib-gpt --prompt "def " --max-new-tokens 80

`--save DIR` writes the model and its tokenizer (bytes as ids: `ByteTokenizer(eos=False)`), so
DIR works with `tailtune generate` and `tailtune eval` like any other model directory (`eval`
with `--seq-len 128` or less: the model's context).
"""
import argparse
import glob
import math
import os
import sysconfig
import time

import numpy as np

import engine


def stdlib_bytes(max_bytes: int) -> np.ndarray:
    """Concatenated .py sources of the standard library (sorted, so the corpus is stable)."""
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return np.frombuffer(b"".join(chunks)[:max_bytes], np.uint8).astype(np.int64)


def unigram_entropy(data: np.ndarray) -> float:
    """Entropy in nats of the byte frequencies."""
    p = np.bincount(data, minlength=256) / len(data)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def batches(data, B, T, rng):
    while True:
        starts = rng.integers(0, len(data) - T - 1, B)
        x = np.stack([data[s:s + T] for s in starts])
        y = np.stack([data[s + 1:s + T + 1] for s in starts])
        yield x, y


def eval_loss(model, data, B, T):
    """Mean loss over consecutive non-overlapping windows of the held-out bytes."""
    n = (len(data) - 1) // T
    losses = []
    for i in range(0, n - B + 1, B):
        x = np.stack([data[(i + j) * T:(i + j + 1) * T] for j in range(B)])
        y = np.stack([data[(i + j) * T + 1:(i + j + 1) * T + 1] for j in range(B)])
        losses.append(model.forward(x, y, grad=False))
    return float(np.mean(losses))


def train(steps=600, batch_size=16, seq_len=128, lr=3e-3, corpus_bytes=2_000_000, seed=0,
          d_model=128, n_layer=4, n_head=4, log=print):
    data = stdlib_bytes(corpus_bytes)
    split = int(len(data) * 0.95)
    train_data, held_out = data[:split], data[split:]
    # The ids are the raw bytes, which is what ByteTokenizer(eos=False) encodes: 256 ids, no
    # end-of-text token. Saved beside the model, it lets the CLI read and write text for it.
    tok = engine.ByteTokenizer(eos=False)
    cfg = engine.Config.gpt2(vocab_size=tok.vocab_size, n_layer=n_layer, n_head=n_head, d_model=d_model,
                             max_seq_len=seq_len)
    model = engine.Model(cfg, seed=seed)
    opt = engine.AdamW(model, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = engine.CosineSchedule(lr, total=steps, warmup=max(1, steps // 20), min_lr=lr / 10)
    rng = np.random.default_rng(seed)
    stream = batches(train_data, batch_size, seq_len, rng)
    entropy = unigram_entropy(train_data)
    log(f"{model}; {len(train_data):,} training bytes; unigram entropy {entropy:.3f} nats")
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = next(stream)
        opt.lr = sched(step)
        model.zero_grad()
        loss = model.forward(x, y)
        model.backward()
        engine.clip_grad_norm(model, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            rate = (step + 1) * batch_size * seq_len / (time.perf_counter() - t0)
            log(f"step {step:5d}  loss {loss:.3f}  lr {opt.lr:.2e}  {rate:,.0f} tok/s")
    held = eval_loss(model, held_out[:200_000], batch_size, seq_len)
    log(f"held-out loss {held:.3f} nats ({held / math.log(2):.2f} bits/byte) vs unigram "
        f"entropy {entropy:.3f} nats; {time.perf_counter() - t0:.0f} s")
    return {"held_out_loss": held, "unigram_entropy": entropy, "model": model, "tokenizer": tok}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    ap.add_argument("--save", help="directory to save the trained model and its tokenizer to "
                    "(Hugging Face layout)")
    a = ap.parse_args()
    out = train(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr)
    if a.save:
        out["model"].save(a.save)
        out["tokenizer"].save(a.save)   # without it the CLI cannot load the directory
        print(f"saved to {a.save}")


if __name__ == "__main__":
    main()
