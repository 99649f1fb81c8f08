"""Research instruments: telemetry values against direct computation, CKA's properties, the
per-layer cost table and the measured profile (structure only: no timing assertions)."""
import json
import os

import numpy as np
import pytest

import engine
from engine import probes
from conftest import count_gemm_flops, sparse_targets
from engine.cli import main as cli


def tiny(vocab=257):
    cfg = engine.Config.llama(vocab_size=vocab, n_layer=4, n_head=2, n_kv_head=1, d_model=24,
                              d_ff=32, max_seq_len=32)
    return engine.Model(cfg, seed=4)


def tiny_of(kind, gpt2_layers=4):
    """tiny() for "llama"; Qwen2's (biases on q, k, v only), Qwen3's (q and k norms), SmolLM3's
    (the top block without rope) or GPT-2's (layernorm, GELU, every bias) blocks of the same
    width otherwise."""
    if kind == "llama":
        return tiny()
    if kind in ("qwen2", "qwen3", "smollm3"):
        return engine.Model(getattr(engine.Config, kind)(vocab_size=257, n_layer=4, n_head=2,
                                                         n_kv_head=1, d_model=24, head_dim=12,
                                                         d_ff=32, max_seq_len=32), seed=4)
    return engine.Model(engine.Config.gpt2(vocab_size=257, n_layer=gpt2_layers, n_head=2,
                                           d_model=24, max_seq_len=32), seed=4)


def cka64(x, y):
    """Linear CKA in float64 from the (C, C) cross-covariances: the reference."""
    x, y = (a.reshape(-1, a.shape[-1]).astype(np.float64) for a in (x, y))
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_linear_cka_properties():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 12))
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    assert probes.linear_cka(x, x) == pytest.approx(1.0)
    assert probes.linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0)   # rotation, scale, shift
    assert probes.linear_cka(x, rng.standard_normal((200, 12))) < 0.2


def test_telemetry_values_match_direct_computation():
    m = tiny().train_last(2)
    opt = engine.AdamW(m, lr=1e-2)
    rng = np.random.default_rng(0)
    probe = rng.integers(0, 257, (2, 16))
    w0 = {n: p.copy() for n, p in m.params.items()}
    tel = probes.Telemetry(m, probe, every=1)
    for step in range(3):
        x, y = rng.integers(0, 257, (2, 16)), rng.integers(0, 257, (2, 16))
        m.zero_grad()
        m.forward(x, y)
        m.backward()
        tel.before_update(step)
        before = {n: m.params[n].copy() for n in m.grads}
        opt.step()
        rec = tel.record(step, opt)
    names = [n for n in m.grads if n.startswith("blocks.3.")]
    cat = lambda d: np.concatenate([d[n].ravel().astype(np.float64) for n in names])  # noqa: E731
    w, w_0, g = cat(m.params), cat(w0), cat(m.grads)
    b3 = rec["blocks.3"]
    assert b3["grad_norm"] == pytest.approx(np.linalg.norm(g), rel=1e-6)
    assert b3["drift"] == pytest.approx(np.linalg.norm(w - w_0) / np.linalg.norm(w_0), rel=1e-6)
    assert b3["cosine_to_pretrained"] == pytest.approx(w @ w_0 / np.linalg.norm(w) / np.linalg.norm(w_0), rel=1e-9)
    assert b3["update_ratio"] == pytest.approx(np.linalg.norm(w - cat(before)) / np.linalg.norm(w), rel=1e-6)
    m_norm = np.sqrt(sum(float((opt.state[n]["m"].astype(np.float64) ** 2).sum()) for n in names))
    assert b3["adam_m_norm"] == pytest.approx(m_norm, rel=1e-6)
    # frozen blocks keep their pretrained representation exactly; trained ones move
    assert rec["blocks.0"]["cka_to_pretrained"] == pytest.approx(1.0, abs=1e-12)
    assert rec["blocks.1"]["cka_to_pretrained"] == pytest.approx(1.0, abs=1e-12)
    assert rec["blocks.3"]["cka_to_pretrained"] < 1.0 - 1e-6
    # the probe runs from the lowest trained block only: same CKA as a full forward of both models
    pre = engine.Model(m.config)
    pre.params.update(w0)
    full_ref, full_now = probes.block_outputs(pre, probe), probes.block_outputs(m, probe)
    for i in (2, 3):
        assert rec[f"blocks.{i}"]["cka_to_pretrained"] == pytest.approx(cka64(full_ref[i], full_now[i]), abs=1e-7)
    assert "grad_norm" not in rec["blocks.0"]


def test_cka_compares_the_real_tokens_of_padded_probe_rows():
    """With lengths, the probe's padding positions (no loss, never trained towards anything)
    are left out of the similarity: CKA over the real tokens alone, computed here directly."""
    m = tiny().train_last(2)
    opt = engine.AdamW(m, lr=1e-2)
    rng = np.random.default_rng(1)
    probe = rng.integers(0, 257, (3, 16))
    lengths = [16, 9, 4]
    w0 = {n: p.copy() for n, p in m.params.items()}
    tel = probes.Telemetry(m, probe, every=1, lengths=lengths)
    rec = train_step(m, opt, tel, 0, rng)
    pre = engine.Model(m.config)
    pre.params.update(w0)
    real = np.arange(16) < np.array(lengths)[:, None]
    ref, now = probes.block_outputs(pre, probe)[3], probes.block_outputs(m, probe)[3]
    want = cka64(ref[real], now[real])
    assert rec["blocks.3"]["cka_to_pretrained"] == pytest.approx(want, abs=1e-7)
    assert abs(cka64(ref, now) - want) > 1e-4       # the padded rows would have changed it


def train_step(m, opt, tel, step, rng, clip=None):
    """One step in train.py's order: before_update before clipping and the update."""
    x, y = rng.integers(0, 257, (2, 16)), rng.integers(0, 257, (2, 16))
    m.zero_grad()
    m.forward(x, y)
    m.backward()
    tel.before_update(step)
    if clip is not None:
        engine.clip_grad_norm(m, clip)
    opt.step()
    return tel.record(step, opt) if tel.due(step) else None


def test_grad_norm_is_taken_before_clipping():
    """Per-layer gradient norms of the raw gradients: their squares add up to the global norm
    clip_grad_norm saw, not to the clip value."""
    m = tiny().train_last(2)
    opt = engine.AdamW(m, lr=1e-2)
    rng = np.random.default_rng(3)
    tel = probes.Telemetry(m, rng.integers(0, 257, (2, 16)), every=1)
    x, y = rng.integers(0, 257, (2, 16)), rng.integers(0, 257, (2, 16))
    m.zero_grad()
    m.forward(x, y)
    m.backward()
    raw = {n: g.astype(np.float64) for n, g in m.grads.items()}
    tel.before_update(0)
    total = engine.clip_grad_norm(m, 1e-3)
    opt.step()
    rec = tel.record(0, opt)
    assert total > 1e-2                                        # clipping did scale
    for L in ("blocks.2", "blocks.3", "ln_f"):
        want = np.sqrt(sum((g ** 2).sum() for n, g in raw.items() if n.startswith(L + ".")))
        assert rec[L]["grad_norm"] == pytest.approx(want, rel=1e-6)
    got = np.sqrt(sum(r["grad_norm"] ** 2 for r in rec.values() if "grad_norm" in r))
    assert got == pytest.approx(total, rel=1e-6)


def test_resumed_run_sees_blocks_trained_before_the_checkpoint():
    """Blocks 1 and 3 train, then the run resumes with block 1 frozen: Telemetry, made from
    the base weights with pretrained= naming block 1, still reports block 1's drift against
    the base weights and runs the probe from block 1 (CKA against a float64 reference)."""
    rng = np.random.default_rng(5)
    m = tiny().freeze().unfreeze("blocks.1.*", "blocks.3.*")
    opt = engine.AdamW(m, lr=1e-2)
    tel = probes.Telemetry(m, rng.integers(0, 257, (2, 16)), every=1)
    for step in range(2):
        train_step(m, opt, tel, step, rng)
    checkpoint = {n: p.copy() for n, p in m.params.items()}

    base = tiny()
    r = tiny().freeze().unfreeze("blocks.3.*")               # resumed: block 1 frozen now
    probe = rng.integers(0, 257, (2, 16))
    tel = probes.Telemetry(r, probe, every=1, pretrained=[n for n in r.params if n.startswith("blocks.1.")])
    for n, p in checkpoint.items():                           # load_checkpoint
        r.params[n][...] = p
    opt = engine.AdamW(r, lr=1e-2)
    rec = train_step(r, opt, tel, 2, rng)
    names = [n for n in r.params if n.startswith("blocks.1.")]
    w = np.concatenate([r.params[n].ravel().astype(np.float64) for n in names])
    w0 = np.concatenate([base.params[n].ravel().astype(np.float64) for n in names])
    assert np.linalg.norm(w - w0) > 0
    assert rec["blocks.1"]["drift"] == pytest.approx(np.linalg.norm(w - w0) / np.linalg.norm(w0), rel=1e-6)
    cosine = w @ w0 / np.linalg.norm(w) / np.linalg.norm(w0)
    assert rec["blocks.1"]["cosine_to_pretrained"] == pytest.approx(cosine, rel=1e-9)
    assert "grad_norm" not in rec["blocks.1"]                 # frozen: no gradient this step
    ref, now = probes.block_outputs(base, probe), probes.block_outputs(r, probe)
    assert rec["blocks.0"]["cka_to_pretrained"] == 1.0
    for i in (1, 2, 3):
        assert rec[f"blocks.{i}"]["cka_to_pretrained"] == pytest.approx(cka64(ref[i], now[i]), abs=1e-7)
    assert rec["blocks.2"]["cka_to_pretrained"] < 1 - 1e-6   # frozen, but its input changed


def test_due_after_every_n_updates_and_at_the_last():
    m = tiny().train_last(1)
    probe = np.zeros((1, 8), np.int64)
    assert [s for s in range(10) if probes.Telemetry(m, probe, every=3).due(s)] == [2, 5, 8]
    tel = probes.Telemetry(m, probe, every=3, total_steps=10)
    assert [s for s in range(10) if tel.due(s)] == [2, 5, 8, 9]
    assert [s for s in range(4) if probes.Telemetry(m, probe, every=1, total_steps=4).due(s)] == [0, 1, 2, 3]


def test_probe_is_capped_and_cka_matches_float64():
    """The probe keeps its first rows up to PROBE_TOKENS tokens; CKA (float32 products) agrees
    with a float64 computation on those rows, also where 1 - CKA is small."""
    m = tiny().freeze().unfreeze("blocks.0.*")
    T = 16
    n_rows = probes.PROBE_TOKENS // T
    rng = np.random.default_rng(7)
    probe = rng.integers(0, 257, (n_rows + 3, T))
    w0 = {n: p.copy() for n, p in m.params.items()}
    tel = probes.Telemetry(m, probe, every=1)
    assert tel.probe.shape == (n_rows, T)
    for n in m.grads:                                         # a small change to block 0
        m.params[n] += 1e-4 * rng.standard_normal(m.params[n].shape).astype(np.float32)
    rec = tel.record(0, engine.AdamW(m))
    pre = engine.Model(m.config)
    pre.params.update(w0)
    ref, now = probes.block_outputs(pre, probe[:n_rows]), probes.block_outputs(m, probe[:n_rows])
    for i in range(4):
        want = cka64(ref[i], now[i])
        assert 1e-8 < 1 - want < 1e-3
        assert rec[f"blocks.{i}"]["cka_to_pretrained"] == pytest.approx(want, abs=1e-8)
        assert probes.linear_cka(ref[i][0], now[i][0]) == pytest.approx(cka64(ref[i][0], now[i][0]), abs=1e-8)


def test_plot_of_one_record_shows_every_layer(tmp_path, monkeypatch):
    """One record: every panel has data (points with markers), a layer has one colour in every
    panel, one figure legend names every layer, Adam's first moment has its panel."""
    import matplotlib
    import matplotlib.image
    from matplotlib.figure import Figure
    figs = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figs.append(fig), save(fig, *a, **k)))
    monkeypatch.setattr(matplotlib, "use", lambda *a, **k: pytest.fail("the host's backend was switched"))
    full = {"grad_norm": 0.5, "update_ratio": 1e-3, "drift": 1e-2, "cosine_to_pretrained": 0.99,
            "adam_m_norm": 0.1, "adam_v_norm": 1e-4, "cka_to_pretrained": 0.9}
    tel = {"blocks.0": {"cka_to_pretrained": 0.95},           # frozen, below a changed block
           "blocks.1": {"cka_to_pretrained": 1.0},            # unchanged: nothing drawn, no legend
           "blocks.3": dict(full), "ln_f": {k: v for k, v in full.items() if k != "cka_to_pretrained"}}
    png = str(tmp_path / "t.png")
    probes.plot_telemetry([{"step": 7, "telemetry": tel}], png)
    fig, = figs
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(panels) == set(full)
    colours = {}
    for key, ax in panels.items():
        assert ax.lines, key
        for line in ax.lines:
            assert line.get_marker() not in (None, "", " ", "None") and list(line.get_xdata()) == [7]
            assert colours.setdefault(line.get_label(), line.get_color()) == line.get_color()
    assert len(set(map(str, colours.values()))) == 3
    legend, = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["blocks.0", "blocks.3", "ln_f"]
    # and the image shows them: coloured pixels inside each panel (grid and frame are grey)
    img = matplotlib.image.imread(png)[..., :3]
    scale = img.shape[0] / fig.bbox.height
    for key, ax in panels.items():
        x0, y0, x1, y1 = (v * scale for v in ax.get_window_extent().extents)
        box = img[int(img.shape[0] - y1):int(img.shape[0] - y0), int(x0):int(x1)]
        assert ((box.max(-1) - box.min(-1)) > 0.3).sum() > 10, key


def test_telemetry_in_a_run_and_off_by_default(tmp_path):
    tiny().save(str(tmp_path / "m"))
    engine.ByteTokenizer().save(str(tmp_path / "m"))
    import inspect
    import json as j
    (tmp_path / "d.txt").write_text(inspect.getsource(j.decoder)[:12000])
    base = ["finetune", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.txt"),
            "--train-last", "2", "--steps", "5", "--batch-size", "2", "--seq-len", "16",
            "--sample-tokens", "0"]
    assert cli(base + ["--out", str(tmp_path / "on"), "--telemetry-every", "2"]) == 0
    recs = [json.loads(line) for line in open(tmp_path / "on" / "metrics.jsonl")]
    tel = [r for r in recs if "telemetry" in r]
    assert [r["step"] for r in tel] == [2, 4, 5]       # after every 2 updates, and the last
    assert set(tel[-1]["telemetry"]["blocks.3"]) >= {"grad_norm", "update_ratio", "drift",
                                                     "cosine_to_pretrained", "adam_m_norm",
                                                     "adam_v_norm", "cka_to_pretrained"}
    assert os.path.exists(tmp_path / "on" / "telemetry.png")
    assert cli(base + ["--out", str(tmp_path / "off")]) == 0
    assert not any("telemetry" in json.loads(line) for line in open(tmp_path / "off" / "metrics.jsonl"))


def test_cost_table_and_measured_profile():
    m = tiny().train_last(2).freeze("blocks.2.attn.*")
    rows = probes.block_costs(m, 2, 16)
    assert [r["layer"] for r in rows] == ["embeddings", "blocks.0", "blocks.1", "blocks.2", "blocks.3",
                                          "ln_f + head"]
    rows = rows[1:]                                            # the blocks and the head
    assert rows[0]["dx_flops"] == rows[0]["dw_flops"] == rows[0]["kept_bytes"] == 0
    assert rows[3]["dw_flops"] > rows[2]["dw_flops"] > 0       # attention frozen in block 2
    # bytes: every block moves bytes forward, only blocks in range backward; AdamW 28 bytes
    # (7 float32 reads and writes) per trainable parameter
    assert all(r["fwd_bytes"] > 0 for r in rows)
    assert rows[0]["bwd_bytes"] == rows[1]["bwd_bytes"] == 0 < rows[2]["bwd_bytes"]
    assert rows[2]["bwd_bytes"] < rows[3]["bwd_bytes"]         # frozen attention: no dW to add in
    for r in rows[:4]:
        trainable = sum(g.size for n, g in m.grads.items() if n.startswith(r["layer"] + "."))
        assert r["opt_bytes"] == 28 * trainable
    pred = probes.predicted_ms(rows, 1e9, (1e9, 1e9), 1e9, 1e9)
    base = probes.predicted_ms(rows, 1e9, (1e9, 1e9))
    for r, p, b in zip(rows, pred, base):                      # 1 GB/s: bytes / 1e6 ms
        assert p["fwd"] - b["fwd"] == pytest.approx(r["fwd_bytes"] / 1e6)
        assert p["opt"] == pytest.approx(r["opt_bytes"] / 1e6) and b["opt"] == 0
    full = probes.block_costs(m, 2, 16, everything=True)
    assert sum(r["dw_flops"] for r in full) > sum(r["dw_flops"] for r in rows)
    text = probes.cost_table(m, 2, 16)
    assert "full fine-tuning would be" in text
    before = {n: p.copy() for n, p in m.params.items()}
    got = probes.measure(m, 2, 16, steps=1)
    assert {("blocks.0", "forward"), ("blocks.3", "backward"), ("blocks.3", "weight-grad"),
            ("blocks.3", "optimizer"), ("head", "forward+input-grad"), ("head", "backward")} <= set(got["ms"])
    assert ("blocks.0", "backward") not in got["ms"]           # truncated backward
    assert all(np.array_equal(p, before[n]) for n, p in m.params.items())  # measuring changes nothing


def test_head_row_charges_what_its_backward_does():
    """The head row's backward bytes: the final norm's backward when something below needs
    its input gradient, and a trainable head's gradient added in (12 bytes per element)."""
    m = tiny().train_last(1)
    c, N = m.config, 2 * 16
    frozen_head = probes.block_costs(m, 2, 16)[-1]
    assert frozen_head["dw_flops"] == 0 and frozen_head["bwd_bytes"] == 4 * N * 5 * c.d_model
    m.unfreeze("lm_head.weight")
    head = probes.block_costs(m, 2, 16)[-1]
    VC = c.vocab_size * c.d_model
    assert head["dw_flops"] == 2 * N * VC
    assert head["bwd_bytes"] - frozen_head["bwd_bytes"] == 12 * VC
    assert head["fwd_bytes"] - frozen_head["fwd_bytes"] == (4 + 12) * VC   # one chunk here
    got = probes.measured_costs(m, 2, 16, steps=1)["rows"][-1]
    assert got["bwd_pred"] > 0 and got["bwd_meas"] > 0


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2", "qwen3", "smollm3"])
@pytest.mark.parametrize("trainable", ["all", "last2", "embeddings"])
def test_every_parameter_in_exactly_one_row(kind, trainable):
    """Parameters and optimizer bytes over the rows add up to the model's: each parameter,
    tied or not, is charged once. Embedding backward is charged only when one is trainable."""
    m = tiny_of(kind, gpt2_layers=3)
    if trainable == "last2":
        m.train_last(2)
    elif trainable == "embeddings":
        m.freeze().unfreeze("wte.weight")
    rows = probes.block_costs(m, 2, 16)
    assert sum(r["params"] for r in rows) == m.num_params()
    assert sum(r["opt_bytes"] for r in rows) == 28 * m.num_params(trainable_only=True)
    emb = rows[0]
    assert emb["layer"] == "embeddings"
    assert (emb["bwd_bytes"] > 0) == (trainable != "last2")
    got = probes.measure(m, 2, 16, steps=1)["ms"]
    assert ("embeddings", "forward") in got
    assert (("embeddings", "backward") in got) == (trainable != "last2")


def test_inspect_command(tmp_path, capsys):
    tiny().save(str(tmp_path / "m"))
    assert cli(["inspect", "--model", str(tmp_path / "m"), "--train-last", "1", "--seq-len", "16",
                "--measure"]) == 0
    out = capsys.readouterr().out
    assert "blocks.3" in out and "measured" in out and "full fine-tuning" in out


@pytest.mark.parametrize("frozen", [(), ("blocks.2.attn.*",), ("blocks.2.attn.*", "blocks.2.ln1.*"),
                                    ("blocks.2.*", "blocks.3.attn.*", "blocks.3.ln*")])
def test_predicted_input_grad_flops_match_what_backward_runs(monkeypatch, frozen):
    """The FLOP model's input-gradient work against the GEMMs and attention backwards a real
    backward makes, counted by wrapping the kernels the blocks call."""
    from engine import layers
    m = tiny().train_last(2)
    if frozen:                  # freeze() without patterns would freeze everything
        m.freeze(*frozen)
    B, T = 2, 16
    rows = probes.block_costs(m, B, T)
    attn_calls = [0]
    real_attn = layers.attention_backward

    def attn(*args, **kw):
        attn_calls[0] += 1
        real_attn(*args, **kw)

    gemm_flops = count_gemm_flops(monkeypatch, (layers,), names=("gemm_nn",))
    monkeypatch.setattr(layers, "attention_backward", attn)
    tokens = np.random.default_rng(0).integers(0, 257, (B, T))
    m.forward(tokens, tokens)
    m.backward()
    blocks = rows[1:-1]
    assert gemm_flops[0] == sum(r["dx_flops"] - r["attn_bwd_flops"] for r in blocks)
    assert attn_calls[0] == sum(r["attn_bwd_flops"] > 0 for r in blocks)


@pytest.mark.parametrize("n_targets", [0, 5, 32])
def test_predicted_head_flops_follow_the_target_rows(monkeypatch, n_targets):
    """The head runs on the rows that have a target only: the FLOP model given target_rows
    against the head GEMMs a real forward makes."""
    import engine.model as model_mod
    m = tiny().train_last(1).unfreeze("lm_head.weight")
    B, T = 2, 16
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 257, (B, T))
    targets = sparse_targets(rng, B, T, n_targets)
    head = probes.block_costs(m, B, T, target_rows=n_targets)[-1]
    flops = count_gemm_flops(monkeypatch, (model_mod,))
    m.forward(tokens, targets)
    assert flops[0] == head["fwd_flops"] + head["dx_flops"] + head["dw_flops"]
    assert head["dw_flops"] == (2 * n_targets * 24 * 257)


def test_inspect_target_fraction(tmp_path, capsys):
    """--target-fraction: the head row's forward GFLOP scale with the share of positions that
    carry a loss; a share outside (0, 1] is refused by name."""
    m = engine.Model(engine.Config.llama(vocab_size=4096, n_layer=2, n_head=2, n_kv_head=1,
                                         d_model=64, d_ff=96, max_seq_len=64), seed=1)
    m.save(str(tmp_path / "m"))

    def head_forward(*extra):
        assert cli(["inspect", "--model", str(tmp_path / "m"), "--seq-len", "64", *extra]) == 0
        line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("ln_f + head")][0]
        return float(line.split()[5])          # "ln_f + head", params, train, then forward
    full, quarter = head_forward(), head_forward("--target-fraction", "0.25")
    assert full == pytest.approx(2 * 4 * 64 * 64 * 4096 / 1e9, abs=0.006)
    assert quarter == pytest.approx(full / 4, abs=0.006)
    for bad in ("0", "1.5", "nan"):
        assert cli(["inspect", "--model", str(tmp_path / "m"), "--target-fraction", bad]) != 0
        assert "--target-fraction" in capsys.readouterr().err


@pytest.mark.parametrize("trainable", ["last2", "head-only", "everything", "lowest-mlp-only",
                                       "top-o-only", "frozen-down-in-range"])
@pytest.mark.parametrize("n_targets", [5, 32])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2", "qwen3", "smollm3"])
def test_predicted_step_flops_and_memory_with_masked_targets(monkeypatch, kind, n_targets, trainable):
    """Every GEMM of a training step (blocks and head, forward and backward), counted by wrapping
    the kernels, against the cost model given target_rows: with 5 of 32 positions carrying a
    loss the top block runs its output projection and MLP on those 5 rows alone. And the
    activation bytes the forward keeps against the rows' kept_bytes."""
    import engine.model as model_mod
    from engine import layers
    m = tiny_of(kind, gpt2_layers=4)
    if trainable == "last2":
        m.train_last(2)
    elif trainable == "head-only":
        m.freeze().unfreeze(m.head)
    elif trainable == "lowest-mlp-only":
        m.train_last(2).freeze("blocks.2.attn.*", "blocks.2.ln1.*")
    elif trainable == "top-o-only":
        m.freeze().unfreeze("blocks.3.attn.o.*")
    elif trainable == "frozen-down-in-range":
        m.train_last(2).freeze("blocks.*.mlp.down.*")
    B, T = 2, 16
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 257, (B, T))
    targets = sparse_targets(rng, B, T, n_targets)
    rows = probes.block_costs(m, B, T, target_rows=n_targets)
    flops = count_gemm_flops(monkeypatch, (layers, model_mod))
    m.forward(tokens, targets)
    kept = m.saved_bytes()
    m.backward()
    want = sum(r["fwd_flops"] + r["dx_flops"] + r["dw_flops"] - r["attn_fwd_flops"] - r["attn_bwd_flops"]
               for r in rows)
    assert flops[0] == want
    # the tape also holds the tokens (int64, for the embedding backward) and the rope tables
    c = m.config
    rope = 2 * 4 * T * (c.head_dim // 2) if c.positions == "rope" else 0
    assert kept == sum(r["kept_bytes"] for r in rows) + 8 * B * T + rope


@pytest.mark.parametrize("labels", [["a", "b", "c"], None])
def test_measured_profile_of_an_encoder(labels):
    """An encoder's step is measured as it trains: a classifier on class targets (its head row
    timed), a head-less one from a gradient of its hidden states; backward stops at the lowest
    trainable block, and measuring changes nothing."""
    cfg = engine.Config.bert(vocab_size=60, n_layer=4, n_head=2, d_model=16, d_ff=24,
                             max_seq_len=32, labels=labels)
    m = engine.Model(cfg, seed=1).train_last(2)
    before = {n: p.copy() for n, p in m.params.items()}
    got = probes.measured_costs(m, 2, 16, steps=1)
    rows = {r["layer"]: r for r in got["rows"]}
    assert list(rows) == ["embeddings", "blocks.0", "blocks.1", "blocks.2", "blocks.3",
                          *(["classifier"] if labels else [])]
    assert rows["blocks.1"]["bwd_meas"] == 0 < rows["blocks.2"]["bwd_meas"]   # truncated backward
    assert rows["blocks.3"]["dw_meas"] > 0 and rows["blocks.3"]["opt_meas"] > 0
    if labels:
        head = rows["classifier"]
        assert head["fwd_meas"] > 0 and head["bwd_meas"] > 0 and head["opt_meas"] > 0
    assert all(np.array_equal(p, before[n]) for n, p in m.params.items())
