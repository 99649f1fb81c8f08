"""Freezing schedules change the trainable set as specified, frozen blocks stay bit-identical
while frozen, optimizer state follows the trainable set, and runs are reproducible."""
import json
import os

import numpy as np
import pytest

import engine
from engine import schedules
from engine.cli import main as cli


def tiny(L=6, vocab=50):
    cfg = engine.Config.llama(vocab_size=vocab, n_layer=L, n_head=2, n_kv_head=1, d_model=16, d_ff=24,
                              max_seq_len=32)
    return engine.Model(cfg, seed=3)


def blocks(model):
    return sorted({int(n.split(".")[1]) for n in model.grads if n.startswith("blocks.")})


def run_schedule(s, total, L=6, train=False, seed=0):
    """Apply the schedule step by step; returns trainable blocks per step (and trains if asked)."""
    m = tiny(L)
    m.train_last(s.k)
    opt = engine.AdamW(m, lr=1e-2)
    rng = np.random.default_rng(seed)
    seen = []
    for step in range(total):
        s.apply(m, opt, step, total)
        seen.append(blocks(m))
        assert set(opt.state) == set(m.grads)  # state created / freed with the trainable set
        if train:
            frozen = {n: p.copy() for n, p in m.params.items() if n not in m.grads}
            x, y = rng.integers(0, 50, (2, 8)), rng.integers(0, 50, (2, 8))
            m.zero_grad()
            m.forward(x, y)
            m.backward()
            s.observe(m, step)
            opt.step()
            for n, p in frozen.items():
                assert p.tobytes() == m.params[n].tobytes(), (step, n)  # frozen: untouched
    return seen, m, opt


def test_static_and_gradual():
    seen, _, _ = run_schedule(schedules.make("static", 6, 2), 5)
    assert all(b == [4, 5] for b in seen)
    seen, _, _ = run_schedule(schedules.make("gradual", 6, 1, every=3), 20, train=True)
    assert seen[0] == seen[2] == [5]
    assert seen[3] == [4, 5] and seen[6] == [3, 4, 5] and seen[15] == list(range(6)) == seen[19]


def test_lr_decay_scales():
    s = schedules.make("lr-decay", 6, 3, decay=0.5)
    _, m, opt = run_schedule(s, 1)
    assert "blocks.5.mlp.up.weight" not in opt.lr_scale   # the top block: scale 1
    assert opt.lr_scale["blocks.4.attn.q.weight"] == 0.5
    assert opt.lr_scale["blocks.3.ln1.weight"] == 0.25
    assert "ln_f.weight" not in opt.lr_scale


def test_lr_decay_really_scales_the_update():
    """Block 4's AdamW step with scale 0.5 equals an unscaled step at half the rate."""
    s = schedules.make("lr-decay", 6, 2, decay=0.5)
    x, y = np.arange(16).reshape(2, 8) % 50, (np.arange(16).reshape(2, 8) + 1) % 50
    results = []
    for scaled in (True, False):
        m = tiny().train_last(2)
        opt = engine.AdamW(m, lr=1e-2 if scaled else 5e-3)
        if scaled:
            s.apply(m, opt, 0, 10)
        m.forward(x, y)
        m.backward()
        opt.step()
        results.append(m.params["blocks.4.mlp.down.weight"].copy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-9)


def test_freezeout():
    s = schedules.make("freezeout", 6, 3, t0=0.5)
    seen, _, opt = run_schedule(s, 100, train=True)
    assert seen[0] == [3, 4, 5] and seen[49] == [3, 4, 5]
    assert seen[50] == [4, 5] and seen[74] == [4, 5] and seen[75] == [5]
    assert s.lr_scale(5, 50) == pytest.approx(0.5)          # half way to its stop at 100
    assert s.lr_scale(3, 25) == pytest.approx(0.5)          # half way to its stop at 50
    assert s.lr_scale(3, 0) == 1.0


def test_autofreeze_freezes_lowest_stable_blocks():
    s = schedules.make("autofreeze", 6, 4, every=2, threshold=0.05)
    m = tiny().train_last(4)
    opt = engine.AdamW(m)
    s.apply(m, opt, 0, 10)

    def fake_grads(scales):
        for n, g in m.grads.items():
            if n.startswith("blocks."):
                g[...] = scales[int(n.split(".")[1])]

    fake_grads({2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0})
    s.observe(m, 1)                      # first check: only records
    assert s.frozen_below == 2
    fake_grads({2: 1.01, 3: 1.02, 4: 2.0, 5: 1.0})
    s.observe(m, 3)                      # 2 and 3 changed < 5 %, 4 changed a lot: stop there
    assert s.frozen_below == 4
    s.apply(m, opt, 4, 10)
    assert blocks(m) == [4, 5] and set(opt.state) == set(m.grads)
    assert s.state_dict()["frozen_below"] == 4


def test_lisa_is_random_but_seeded():
    a, _, _ = run_schedule(schedules.make("lisa", 6, 2, every=3, seed=1), 30)
    b, _, _ = run_schedule(schedules.make("lisa", 6, 2, every=3, seed=1), 30)
    c, _, _ = run_schedule(schedules.make("lisa", 6, 2, every=3, seed=2), 30)
    assert a == b and a != c
    assert all(len(x) == 2 for x in a)
    assert all(a[i] == a[i - i % 3] for i in range(30))   # constant within a window of 3
    assert len({tuple(x) for x in a}) > 3                 # and switching between windows


def test_bad_schedule_arguments():
    with pytest.raises(engine.InputError, match="unknown schedule"):
        schedules.make("sometimes", 6, 2)
    with pytest.raises(engine.InputError, match="k=9 blocks"):
        schedules.make("gradual", 6, 9)


def _text(path):
    import inspect
    import json as j
    path.write_text(inspect.getsource(j.decoder)[:20000])
    return str(path)


def _tiny_dir(path):
    tiny(vocab=257).save(str(path))
    engine.ByteTokenizer().save(str(path))
    return str(path)


@pytest.mark.parametrize("name", ["gradual", "lisa", "freezeout"])
def test_schedule_runs_are_reproducible(tmp_path, name):
    model = _tiny_dir(tmp_path / "m")
    data = _text(tmp_path / "d.txt")
    outs = []
    for r in ("a", "b"):
        out = str(tmp_path / r)
        args = ["finetune", "--model", model, "--data", data, "--out", out, "--train-last", "2",
                "--steps", "12", "--batch-size", "2", "--seq-len", "16", "--schedule", name,
                "--schedule-every", "4", "--sample-tokens", "0", "--seed", "5"]
        assert cli(args) == 0
        outs.append(out)
    a, b = (engine.load(os.path.join(o, "model")).params for o in outs)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    recs = [json.loads(line) for line in open(os.path.join(outs[0], "metrics.jsonl"))]
    sets = [r["trainable_blocks"] for r in recs if "trainable_blocks" in r]
    if name == "gradual":
        assert sets[0] == [4, 5] and sets[4] == [3, 4, 5] and sets[8] == [2, 3, 4, 5]
    if name == "freezeout":
        assert sets[0] == [4, 5] and sets[-1] == [5]
