"""Looking inside a training step: per-layer cost predicted from shapes.

FLOP model (multiply-add = 2 FLOPs; N = B * T tokens):
  linear forward 2 N in out; its input gradient the same; its weight gradient the same
  causal attention forward 2 * (2 B H T^2 D / 2) (scores and weighted sum over the lower
  triangle); backward 2.5x that (scores recomputed, then four products)
A block below the lowest trainable one runs forward only; the lowest trainable block needs no
input gradient at its own input; frozen weights inside the range cost no weight gradient.
"""
from __future__ import annotations


def _linears(block):
    return [m for m in (block.q, block.k, block.v, block.o, block.gate, block.up, block.down) if m]


def block_costs(model, B: int, T: int, everything: bool = False) -> list[dict]:
    """One row per block plus the head: parameters, trainable, predicted FLOPs of forward,
    input-gradient and weight-gradient work, and activation bytes kept for backward.
    everything=True: as if every parameter were trainable (full fine-tuning)."""
    c = model.config
    N = B * T
    G = set(model.params) if everything else set(model.grads)
    low = -1 if everything else model.lowest_trainable_block()
    attn_fwd = 2 * B * c.n_head * T * T * c.head_dim  # two causal products
    rows = []
    for b in model.blocks:
        lin = _linears(b)
        params = sum(model.params[n].size for n in b.shapes())
        fwd = sum(2 * N * m.n_in * m.n_out for m in lin) + attn_fwd
        in_range = b.index >= low
        dx = (sum(2 * N * m.n_in * m.n_out for m in lin) + 2.5 * attn_fwd) if in_range else 0
        dw = sum(2 * N * m.n_in * m.n_out for m in lin if m.w in G) if in_range else 0
        F, C, Hd, Kd = c.d_ff, c.d_model, c.n_head * c.head_dim, c.n_kv_head * c.head_dim
        kept = 0
        if in_range:
            kept = 4 * (N * (5 * C + 2 * Hd + 2 * Kd) + N * F * (3 if c.mlp == "swiglu" else 2)
                        + B * c.n_head * T + 4 * N)
        rows.append({"layer": f"blocks.{b.index}", "params": params,
                     "trainable": any(n in G for n in b.shapes()), "fwd_flops": fwd,
                     "dx_flops": dx, "dw_flops": dw, "kept_bytes": kept})
    head = 2 * N * c.d_model * c.vocab_size
    rows.append({"layer": "ln_f + head", "params": c.d_model + c.vocab_size * c.d_model *
                 (0 if c.tie_embeddings else 1), "trainable": any(n in G for n in ("ln_f.weight", model.head)),
                 "fwd_flops": head, "dx_flops": head if low < c.n_layer or "ln_f.weight" in G else 0,
                 "dw_flops": head if model.head in G else 0, "kept_bytes": 4 * N * c.d_model * 2})
    return rows


def cost_table(model, B: int, T: int) -> str:
    rows = block_costs(model, B, T)
    lines = [f"per training step of {B} x {T} tokens (GFLOP predicted from shapes):",
             f"{'layer':<14}{'params':>12}  {'train':<6}{'forward':>9}{'input-grad':>12}"
             f"{'weight-grad':>13}{'kept MiB':>10}"]
    for r in rows:
        lines.append(f"{r['layer']:<14}{r['params']:>12,}  {'yes' if r['trainable'] else '-':<6}"
                     f"{r['fwd_flops'] / 1e9:>9.2f}{r['dx_flops'] / 1e9:>12.2f}{r['dw_flops'] / 1e9:>13.2f}"
                     f"{r['kept_bytes'] / 2**20:>10.1f}")
    total = lambda rs: sum(r["fwd_flops"] + r["dx_flops"] + r["dw_flops"] for r in rs)  # noqa: E731
    step, full = total(rows), total(block_costs(model, B, T, everything=True))
    lines.append(f"step: {step / 1e9:.1f} GFLOP; full fine-tuning would be about {full / 1e9:.1f} "
                 f"GFLOP ({full / step:.2f}x); trainable {model.num_params(True):,} of "
                 f"{model.num_params():,} parameters")
    return "\n".join(lines)
