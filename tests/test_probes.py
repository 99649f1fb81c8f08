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
    """tiny() for "llama"; a GPT-2 model of the same width (layernorm, GELU, biases) otherwise."""
    if kind == "llama":
        return tiny()
    return engine.Model(engine.Config.gpt2(vocab_size=257, n_layer=gpt2_layers, n_head=2,
                                           d_model=24, max_seq_len=32), seed=4)


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
        x, y = (a.reshape(-1, a.shape[-1]) for a in (full_ref[i], full_now[i]))
        assert rec[f"blocks.{i}"]["cka_to_pretrained"] == pytest.approx(probes.linear_cka(x, y), abs=1e-9)
    assert "grad_norm" not in rec["blocks.0"]


def test_telemetry_in_a_run_and_off_by_default(tmp_path):
    tiny().save(str(tmp_path / "m"))
    engine.ByteTokenizer().save(str(tmp_path / "m"))
    import inspect
    import json as j
    (tmp_path / "d.txt").write_text(inspect.getsource(j.decoder)[:12000])
    base = ["finetune", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.txt"),
            "--train-last", "2", "--steps", "6", "--batch-size", "2", "--seq-len", "16",
            "--sample-tokens", "0"]
    assert cli(base + ["--out", str(tmp_path / "on"), "--telemetry-every", "2"]) == 0
    recs = [json.loads(line) for line in open(tmp_path / "on" / "metrics.jsonl")]
    tel = [r for r in recs if "telemetry" in r]
    assert [r["step"] for r in tel] == [1, 3, 5]
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


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
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

    def attn(*args):
        attn_calls[0] += 1
        real_attn(*args)

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


@pytest.mark.parametrize("trainable", ["last2", "head-only", "everything"])
@pytest.mark.parametrize("n_targets", [5, 32])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
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
