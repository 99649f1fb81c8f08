"""Freezing schedules change the trainable set as specified, frozen blocks stay bit-identical
while frozen, optimizer state follows the trainable set, and runs are reproducible."""
import json
import math
import os

import numpy as np
import pytest
from conftest import signal_after_steps

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
    m = tiny()
    opt = engine.AdamW(m, lr=1e-2)
    s.apply(m, opt, 50, 100)
    # the final norm anneals with the top block (it used to follow the global cosine instead)
    assert opt.lr_scale["ln_f.weight"] == opt.lr_scale["blocks.5.mlp.up.weight"] == pytest.approx(0.5)


def test_freezeout_cubic_spacing_and_scaled_rates_follow_the_paper():
    """Brock et al.'s strategies: t_i = (b + (1 - b) i / (k - 1))^3 with b = t0^(1/3) (the
    lowest block still leaves at t0), and the scaled variant's rate lr / t_i at the start."""
    s = schedules.make("freezeout", 6, 3, t0=0.5, spacing="cubic", scaled=True)
    b = 0.5 ** (1 / 3)
    stops = {3: 0.5, 4: (b + (1 - b) / 2) ** 3, 5: 1.0}        # 4 leaves at 0.7214
    assert stops[4] == pytest.approx(0.72137, abs=1e-5)
    seen, _, _ = run_schedule(s, 1000)
    for i, t in stops.items():   # in the trainable set exactly while step / 1000 < t_i
        assert [step for step in range(1000) if i in seen[step]] == list(range(math.ceil(t * 1000)))
    for i, t in stops.items():
        assert s.lr_scale(i, 0) == pytest.approx(1 / t)
        assert s.lr_scale(i, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1 / t)) / t)
    lin = schedules.make("freezeout", 6, 3, t0=0.5, spacing="squared", total=100)
    assert lin.blocks(72) == [4, 5] and lin.blocks(73) == [5]  # (sqrt .5 + (1 - sqrt .5) / 2)^2 = .7286
    assert lin.lr_scale(3, 0) == 1.0                           # unscaled: every block starts at lr
    for bad, msg in ((dict(spacing="quartic"), "spacing must be one of linear, squared, cubic"),
                     (dict(scaled="yes"), "scaled must be True or False")):
        with pytest.raises(engine.InputError, match=msg):
            schedules.make("freezeout", 6, 3, **bad)


def test_schedule_change_keeps_adam_state_and_a_new_block_starts_at_step_one():
    """Gradual unfreezing adds block 3 at step 4: blocks 4, 5 keep their moments (the change
    creates state for block 3 only), and block 3's first update is a first Adam step
    (bias-corrected: p - lr * g / (|g| + eps)), not one corrected as the run's 5th step."""
    s = schedules.make("gradual", 6, 2, every=4)
    m = tiny()
    m.train_last(2)
    opt = engine.AdamW(m, lr=1e-2)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 50, (2, 8)), rng.integers(0, 50, (2, 8))
    for step in range(5):
        if step == 4:
            kept = {n: {k: a.copy() for k, a in opt.state[n].items() if k != "t"} for n in opt.state}
            state_objects = {n: opt.state[n] for n in opt.state}
        s.apply(m, opt, step, 10)
        if step == 4:
            assert blocks(m) == [3, 4, 5]
            for n, st in kept.items():   # the same state, untouched by the change
                assert opt.state[n] is state_objects[n] and opt.state[n]["t"] == 4
                assert all(np.array_equal(opt.state[n][k], a) for k, a in st.items())
            w = m.params["blocks.3.mlp.down.weight"].copy()
        m.zero_grad()
        m.forward(x, y)
        m.backward()
        if step == 4:
            g = m.grads["blocks.3.mlp.down.weight"].astype(np.float64)
        opt.step()
    want = w - 1e-2 * g / (np.abs(g) + 1e-8)
    np.testing.assert_allclose(m.params["blocks.3.mlp.down.weight"], want, rtol=1e-5, atol=1e-7)
    assert opt.state["blocks.3.mlp.down.weight"]["t"] == 1 and opt.state["ln_f.weight"]["t"] == 5


def test_resumed_gradual_run_equals_the_uninterrupted_one(tmp_path):
    """Per-parameter step counts are in the checkpoint: a gradual run stopped after step 5
    (block 3 joined at step 4) and resumed ends with the uninterrupted run's weights."""
    model = _tiny_dir(tmp_path / "m")
    data = _text(tmp_path / "d.txt")

    def args(out, *extra):
        return ["finetune", "--model", model, "--data", data, "--out", str(out), "--train-last", "2",
                "--steps", "10", "--batch-size", "2", "--seq-len", "16", "--schedule", "gradual",
                "--schedule-every", "4", "--sample-tokens", "0", *extra]

    assert cli(args(tmp_path / "straight")) == 0
    with signal_after_steps(5):
        assert cli(args(tmp_path / "resumed")) == 130
    assert cli(args(tmp_path / "resumed", "--resume", str(tmp_path / "resumed"))) == 0
    a, b = (engine.load(str(tmp_path / r / "model")).params for r in ("straight", "resumed"))
    assert all(np.array_equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("name", ["freezeout", "lisa"])
def test_resume_at_a_step_where_blocks_leave(tmp_path, name):
    """Stopped after step 4, where FreezeOut stops block 4 (t0 = 0.5 of 8 steps) and LISA draws
    its next blocks: the checkpoint's optimizer state belongs to step 3's set, which the resumed
    run restores before the loop changes it, so it ends as the uninterrupted run does."""
    model = _tiny_dir(tmp_path / "m")
    data = _text(tmp_path / "d.txt")

    def args(out, *extra):
        return ["finetune", "--model", model, "--data", data, "--out", str(out), "--train-last", "2",
                "--steps", "8", "--batch-size", "2", "--seq-len", "16", "--schedule", name,
                "--schedule-every", "4", "--seed", "3", "--sample-tokens", "0", *extra]

    assert cli(args(tmp_path / "straight")) == 0
    with signal_after_steps(4):
        assert cli(args(tmp_path / "resumed")) == 130
    ck = json.load(open(tmp_path / "resumed" / "checkpoint" / "trainer_state.json"))
    assert ck["step"] == 4
    assert cli(args(tmp_path / "resumed", "--resume", str(tmp_path / "resumed"))) == 0
    a, b = (engine.load(str(tmp_path / r / "model")).params for r in ("straight", "resumed"))
    assert all(np.array_equal(a[n], b[n]) for n in a)
    sets = [json.loads(line).get("trainable_blocks") for line in open(tmp_path / "straight" / "metrics.jsonl")]
    assert sets[4] != sets[5]                        # the set did change at the resumed step


def test_an_older_checkpoint_stopped_where_a_block_joins_still_resumes(tmp_path):
    """Checkpoints from before tailtune recorded the trainable set rebuild it from the
    schedule; at a step where gradual unfreezing adds a block, that block has no optimizer
    state yet, which is not a damaged checkpoint."""
    model = _tiny_dir(tmp_path / "m")
    data = _text(tmp_path / "d.txt")
    out = tmp_path / "run"
    args = ["finetune", "--model", model, "--data", data, "--out", str(out), "--train-last", "2",
            "--steps", "6", "--batch-size", "2", "--seq-len", "16", "--schedule", "gradual",
            "--schedule-every", "3", "--sample-tokens", "0"]
    with signal_after_steps(3):
        assert cli(args) == 130
    p = out / "checkpoint" / "trainer_state.json"
    state = json.load(open(p))
    for k in ("trainable", "trained", "data_hashes"):
        state.pop(k)
    p.write_text(json.dumps(state))
    assert cli(args + ["--resume", str(out)]) == 0
    straight = tmp_path / "straight"
    assert cli([str(straight) if a == str(out) else a for a in args]) == 0
    a, b = (engine.load(str(r / "model")).params for r in (straight, out))
    assert all(np.array_equal(a[n], b[n]) for n in a)        # it ends as if never stopped


def test_summary_counts_every_parameter_the_schedule_trained(tmp_path):
    model = _tiny_dir(tmp_path / "m")
    data = _text(tmp_path / "d.txt")
    out = tmp_path / "g"
    assert cli(["finetune", "--model", model, "--data", data, "--out", str(out), "--train-last", "1",
                "--steps", "6", "--batch-size", "2", "--seq-len", "16", "--schedule", "gradual",
                "--schedule-every", "2", "--sample-tokens", "0"]) == 0
    m = engine.load(model)
    want = sum(p.size for n, p in m.params.items()
               if n.startswith(("blocks.3.", "blocks.4.", "blocks.5.", "ln_f.")))
    assert json.load(open(out / "summary.json"))["trainable_params"] == want


def test_resume_refuses_training_flags_that_differ_from_the_run(tmp_path, capsys):
    model = _tiny_dir(tmp_path / "m")
    data = _text(tmp_path / "d.txt")
    base = ["finetune", "--model", model, "--data", data, "--out", str(tmp_path / "r"), "--train-last",
            "2", "--steps", "10", "--batch-size", "2", "--seq-len", "16", "--sample-tokens", "0"]
    with signal_after_steps(2):
        assert cli(base + ["--schedule", "gradual"]) == 130
    capsys.readouterr()
    assert cli(base + ["--schedule", "lisa", "--lr", "0.5", "--resume", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.5 (the run has 0.0001)" in err and "--schedule 'lisa' (the run has 'gradual')" in err
    # flags left at their defaults, or given as the run had them, are fine
    assert cli(base + ["--schedule", "gradual", "--resume", str(tmp_path / "r")]) == 0


def test_freezeout_with_one_block_trains_it_throughout():
    s = schedules.make("freezeout", 6, 1, t0=0.5)
    seen, _, _ = run_schedule(s, 20)
    assert all(b == [5] for b in seen)
    assert s.lr_scale(5, 10) == pytest.approx(0.5)           # annealed over the whole run


def test_autofreeze_compares_norms_summed_over_the_interval():
    """Per-step norms 1, 3 then 3, 1: each interval sums to 4, so the block is stable and
    freezes, although step 1 and step 3 alone differ by a factor of 3."""
    s = schedules.make("autofreeze", 6, 3, every=2, threshold=0.05)
    m = tiny().train_last(3)
    opt = engine.AdamW(m)
    s.apply(m, opt, 0, 10)
    for step, scale in enumerate((1.0, 3.0, 3.0, 1.0)):
        for n, g in m.grads.items():
            g[...] = scale
        s.observe(m, step)
    assert s.frozen_below == 5
    s2 = schedules.make("autofreeze", 6, 3, every=2, threshold=0.05)
    s2.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert s2.state_dict() == s.state_dict()


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
        # each block anneals by its own cosine in place of the global decay: after the one
        # warmup step the logged (highest) rate is the top block's, 0.5 lr (1 + cos(pi t / 1)),
        # annealed once, not a second time by the run's cosine
        lrs = [r["lr"] for r in recs if "lr" in r]
        assert lrs[1:] == [pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi * s / 12)), rel=1e-9)
                           for s in range(1, 12)]


def test_growing_train_last_by_hand_keeps_the_adam_state_of_blocks_already_training():
    """ULMFiT written by hand with train_last(k), k growing, trains exactly as the gradual
    schedule does: the blocks already training keep their moments and step counts (a freeze-all
    then unfreeze restarted them), and the new block starts its own."""
    def run(by_hand):
        m = tiny(4).train_last(1)
        opt = engine.AdamW(m, lr=1e-2)
        s = schedules.make("gradual", 4, 1, every=3)
        for step in range(9):
            if by_hand:
                m.train_last(1 + step // 3)
            else:
                s.apply(m, opt, step, 9)
            if step == 3:
                assert opt.state["blocks.3.mlp.up.weight"]["t"] == 3
                assert opt.state["blocks.2.mlp.up.weight"]["t"] == 0
            r = np.random.default_rng([2, step])
            x = r.integers(0, 50, (2, 8))
            m.zero_grad()
            m.forward(x, np.roll(x, -1, 1))
            m.backward()
            opt.step()
        return m
    a, b = run(True), run(False)
    assert all(np.array_equal(a.params[n], b.params[n]) for n in a.params)


def test_set_trainable_sets_exactly_the_named_parameters():
    m = tiny(3)   # everything trainable, as engine.Model and engine.load return it
    opt = engine.AdamW(m, lr=1e-2)
    x = np.arange(16).reshape(2, 8)
    m.forward(x, np.roll(x, -1, 1))
    m.backward()
    opt.step()
    kept = opt.state["blocks.2.attn.q.weight"]
    m.set_trainable(["blocks.2.attn.q.weight", "ln_f.weight"])
    assert m.trainable == ["blocks.2.attn.q.weight", "ln_f.weight"]
    assert set(opt.state) == set(m.trainable) and opt.state["blocks.2.attn.q.weight"] is kept
    assert kept["t"] == 1
    with pytest.raises(engine.InputError, match="no parameter named 'blocks.9.x'"):
        m.set_trainable(["blocks.9.x"])
    assert m.trainable == ["blocks.2.attn.q.weight", "ln_f.weight"]


@pytest.mark.parametrize("name", schedules.NAMES)
def test_a_schedule_applied_to_a_fully_trainable_model_trains_only_its_blocks(name):
    """engine.load returns every parameter trainable; a schedule applied to it in one's own loop
    (without train_last first) leaves the embeddings and the head frozen, as the CLI's run does,
    so backward stops at the schedule's lowest block."""
    m = tiny(6)
    opt = engine.AdamW(m, lr=1e-2)
    s = schedules.make(name, 6, 2, every=2, seed=1)
    s.apply(m, opt, 0, 10)
    want = s.blocks(0)
    assert blocks(m) == sorted(want)
    assert [n for n in m.trainable if not n.startswith("blocks.")] == ["ln_f.weight"]
    assert set(opt.state) == set(m.trainable)
    assert m.lowest_trainable_block() == min(want)


def test_freezeout_asked_for_its_blocks_before_it_knows_the_run_length_says_so():
    """FreezeOut's blocks are a function of the fraction of the run done: asked before apply()
    (a researcher planning a study) it used a run of one step and answered wrongly; now it
    takes the length from make(total=) or refuses."""
    s = schedules.make("freezeout", 6, 4, t0=0.5)
    with pytest.raises(engine.InputError, match="make\\(..., total=N\\) or call apply\\(\\) first"):
        s.blocks(10)
    s = schedules.make("freezeout", 6, 4, t0=0.5, total=100)
    assert s.blocks(0) == [2, 3, 4, 5] and s.blocks(55) == [3, 4, 5] and s.blocks(99) == [5]
    with pytest.raises(engine.InputError, match="total must be an integer >= 1"):
        schedules.make("freezeout", 6, 4, total=0)


def test_a_swap_whose_new_state_cannot_be_allocated_changes_nothing(monkeypatch):
    """LISA-style swap (one block leaves, another joins) when the joining block's optimizer
    state cannot be allocated: the trainable set and the leaving block's moments stay as they
    were (dropping them first would restart its Adam at step 0), and the error propagates."""
    m = tiny(4).train_last(1)
    opt = engine.AdamW(m, lr=1e-2)
    x = np.arange(16).reshape(2, 8) % 50
    m.forward(x, np.roll(x, -1, 1))
    m.backward()
    opt.step()
    before = list(m.trainable)
    real = engine.AdamW._new_state

    def no_memory(self, p):
        raise MemoryError("Unable to allocate")
    monkeypatch.setattr(engine.AdamW, "_new_state", no_memory)
    with pytest.raises(MemoryError):
        m.set_trainable(m._match(["ln_f.*", "blocks.1.*"]))
    assert m.trainable == before and set(opt.state) == set(before)
    assert opt.state["blocks.3.mlp.up.weight"]["t"] == 1
    monkeypatch.setattr(engine.AdamW, "_new_state", real)
    assert engine.train.TrainArgs is not None   # the lazy submodule the README names


def test_freezeout_strategy_flags_reach_the_run(tmp_path):
    """--freezeout-spacing cubic --freezeout-scaled: the logged (highest) rate after the warmup
    step is the larger of block 4's, 0.5 (1 + cos(pi f / 0.5)) / 0.5 while it trains, and the
    top block's, 0.5 (1 + cos(pi f)), f = step / 12."""
    model = _tiny_dir(tmp_path / "m")
    data = _text(tmp_path / "d.txt")
    out = str(tmp_path / "r")
    assert cli(["finetune", "--model", model, "--data", data, "--out", out, "--train-last", "2",
                "--steps", "12", "--batch-size", "2", "--seq-len", "16", "--schedule", "freezeout",
                "--freezeout-spacing", "cubic", "--freezeout-scaled", "--sample-tokens", "0"]) == 0
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    lrs = [r["lr"] for r in recs if "lr" in r]
    want = [1e-4 * max(0.5 * (1 + math.cos(math.pi * s / 12)),
                       (1 + math.cos(math.pi * s / 6)) if s < 6 else 0.0) for s in range(1, 12)]
    assert lrs[1:] == [pytest.approx(w, rel=1e-9) for w in want]
    assert [r["trainable_blocks"] for r in recs if "lr" in r][5:7] == [[4, 5], [5]]
    with pytest.raises(engine.InputError, match="--freezeout-spacing quartic: must be linear, squared or cubic"):
        engine.train.TrainArgs(model=model, data=data, out=out, freezeout_spacing="quartic").validate()


def test_lisa_with_the_embeddings_and_head_trains_them_throughout():
    """LISA as its paper runs it: the drawn blocks change, the embeddings and head train at
    every step (and keep their Adam state across redraws); frozen blocks stay bit-identical."""
    s = schedules.make("lisa", 6, 2, every=3, seed=1, also=("wte.*", "lm_head.*"))
    seen, m, opt = run_schedule(s, 12, train=True)
    assert len({tuple(b) for b in seen}) > 1                       # redrawn
    assert {"wte.weight", "lm_head.weight", "ln_f.weight"} <= set(m.grads)
    assert opt.state["wte.weight"]["t"] == opt.state["lm_head.weight"]["t"] == 12   # never reset
    assert m.lowest_trainable_block() == -1                        # backward reaches the lookup
    plain = schedules.make("lisa", 6, 2, every=3, seed=1)
    assert [plain.blocks(i) for i in range(12)] == seen             # the same draws either way
    with pytest.raises(engine.InputError, match="also must be a list of glob patterns"):
        schedules.make("lisa", 6, 2, also="wte.*")


def test_train_last_and_unfreeze_together(tmp_path, capsys):
    """--train-last 2 --unfreeze 'lm_head.*': the last two blocks, the final norm and the head
    train, nothing else moves; under a schedule the globs train beside its blocks."""
    model = _tiny_dir(tmp_path / "m")
    data = _text(tmp_path / "d.txt")
    base = ["finetune", "--model", model, "--data", data, "--steps", "6", "--batch-size", "2",
            "--seq-len", "16", "--sample-tokens", "0", "--lr", "1e-2"]
    out = str(tmp_path / "a")
    assert cli(base + ["--out", out, "--train-last", "2", "--unfreeze", "lm_head.*"]) == 0
    before, after = engine.load(model).params, engine.load(os.path.join(out, "model")).params
    moved = {n for n in before if not np.array_equal(before[n], after[n])}
    assert moved == {n for n in before if n.startswith(("blocks.4.", "blocks.5.", "ln_f.", "lm_head."))}
    out = str(tmp_path / "b")
    assert cli(base + ["--out", out, "--train-last", "1", "--schedule", "lisa", "--schedule-every", "2",
                       "--unfreeze", "wte.*", "lm_head.*"]) == 0
    after = engine.load(os.path.join(out, "model")).params
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    drawn = {b for r in recs if "trainable_blocks" in r for b in r["trainable_blocks"]}
    moved = {n for n in before if not np.array_equal(before[n], after[n])}
    assert moved == {n for n in before if n.startswith(("wte.", "lm_head.", "ln_f."))
                     or any(n.startswith(f"blocks.{b}.") for b in drawn)}
    capsys.readouterr()
    assert cli(base + ["--out", str(tmp_path / "c"), "--unfreeze", "lm_head.*", "--schedule", "lisa"]) == 2
    assert "--schedule lisa works on blocks: give --train-last K" in capsys.readouterr().err


def test_what_also_adds_trains_at_the_top_blocks_rate_under_every_schedule():
    """FreezeOut's stop time extrapolated to a block below its k was negative (linear, cubic)
    or early (squared): block 0 added by --unfreeze went at -0.67x the rate (gradient ascent),
    -32002x, or 0 while still trainable. It now trains throughout at the top block's rate."""
    m = tiny()
    opt = engine.AdamW(m, lr=1e-2)
    for spacing in ("linear", "squared", "cubic"):
        s = schedules.make("freezeout", 6, 2, t0=0.5, spacing=spacing, scaled=True,
                           also=["blocks.0.*", "blocks.4.mlp.*"])
        for step in range(0, 100, 7):
            s.apply(m, opt, step, 100)
            assert 0 in blocks(m) and 4 in blocks(m) and 5 in blocks(m)
            top = s.lr_scale(5, step)
            for n in m.grads:
                if n.startswith(("blocks.0.", "blocks.4.mlp.", "ln_f.", "blocks.5.")):
                    assert opt.lr_scale.get(n, 1.0) == pytest.approx(top) and top >= 0, (spacing, step, n)
    s = schedules.make("lr-decay", 6, 2, decay=0.5, also=("blocks.1.*",))
    s.apply(m, opt, 0, 10)
    assert opt.lr_scale.get("blocks.1.mlp.up.weight", 1.0) == 1.0 and opt.lr_scale["blocks.4.mlp.up.weight"] == 0.5
    for bad in ("wte.*", None.__class__, 3):
        with pytest.raises(engine.InputError, match="also must be a list of glob patterns"):
            schedules.make("lisa", 6, 2, also=bad)
    assert schedules.make("lisa", 6, 2, also=None).also == ()
