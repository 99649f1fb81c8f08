"""`tailtune inspect`: the parameter list (--params), the predicted-bytes and predicted-dW
columns, --measure with --target-fraction, and what it refuses; `tailtune bench --help`."""
import os

import numpy as np
import pytest

import engine
from engine import probes
from engine.cli import main as cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("m"))
    engine.Model(engine.Config.llama(vocab_size=257, n_layer=3, n_head=2, n_kv_head=1, d_model=24,
                                     d_ff=32, max_seq_len=32), seed=4).save(d)
    return d


def inspect(capsys, model_dir, *extra):
    assert cli(["inspect", "--model", model_dir, "--seq-len", "16", *extra]) == 0
    return capsys.readouterr().out.splitlines()


def test_params_lists_every_parameter_with_its_trainable_state(capsys, model_dir):
    out = inspect(capsys, model_dir, "--train-last", "1", "--params")
    m = engine.load(model_dir).train_last(1)
    for name, p in m.params.items():
        line = [x for x in out if x.split()[:1] == [name]]
        assert len(line) == 1, name
        words = line[0].split()
        assert words[-1] == ("trainable" if name in m.trainable else "frozen")
        assert words[-2] == f"{p.size:,}" and " x ".join(map(str, p.shape)) in line[0]
    assert max(len(x) for x in out) < 120
    assert not any(x.startswith("blocks.0.") for x in inspect(capsys, model_dir))   # default: no list


def test_cost_table_has_a_predicted_bytes_column(capsys, model_dir):
    """Each layer's MiB moved: the elementwise kernels' and AdamW's bytes of the cost model."""
    out = inspect(capsys, model_dir, "--train-last", "2")
    m = engine.load(model_dir).train_last(2)
    assert next(x for x in out if x.startswith("layer ")).endswith("MiB moved")
    for r in probes.block_costs(m, 4, 16):
        line = next(x for x in out if x.startswith(r["layer"] + " "))
        assert line.split()[-1] == f"{(r['fwd_bytes'] + r['bwd_bytes'] + r['opt_bytes']) / 2**20:.1f}"


def test_measured_table_shows_predicted_dw_beside_measured(model_dir):
    m = engine.load(model_dir).train_last(1)
    c = probes.measured_costs(m, 4, 16, steps=1)
    out = probes.measured_table(None, 4, 16, costs=c).splitlines()
    header = next(x for x in out if x.startswith("layer "))
    assert "dW pred  dW meas" in header
    at = header.index("dW pred")
    for r in probes.block_costs(m, 4, 16):
        line = next(x for x in out if x.startswith(r["layer"] + " "))
        want = r["dw_flops"] / c["gemm_rate"] * 1e3 if r["layer"].startswith("blocks.") else 0.0
        assert float(line[at:at + len("dW pred")]) == pytest.approx(want, abs=0.051)


def test_measure_uses_the_target_fraction(capsys, model_dir, monkeypatch):
    """--measure with --target-fraction 0.25 times steps where 16 of the 64 positions carry a
    loss, and predicts for those 16."""
    seen = []
    real = engine.Model.forward

    def spy(self, tokens, targets=None, *a, **k):
        seen.append(int((np.asarray(targets) != -100).sum()))
        return real(self, tokens, targets, *a, **k)

    monkeypatch.setattr(engine.Model, "forward", spy)
    out = inspect(capsys, model_dir, "--train-last", "1", "--measure", "--target-fraction", "0.25")
    assert seen and set(seen) == {16}
    assert "on the 16 positions with a target" in " ".join(out)


@pytest.mark.parametrize("extra, message", [
    (["--seq-len", "33"], "--seq-len 33 exceeds the model's context of 32"),
    (["--seq-len", "16", "--train-last", "4"], "--train-last 4: the model has 3 blocks"),   # as finetune says
])
def test_refused_up_front(capsys, model_dir, extra, message):
    assert cli(["inspect", "--model", model_dir, *extra]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("tailtune inspect: error: ") and message in err
    assert "Traceback" not in err and "per training step" not in out


def test_bench_help_lists_every_workload(capsys):
    with pytest.raises(SystemExit):
        cli(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    benches = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benches")
    names = [n[:-3].replace("_", "-") for n in os.listdir(benches) if n.endswith(".py") and n != "common.py"]
    assert "instruments" in names
    for n in names:
        assert n in text


def test_inspect_measure_on_an_encoder_classifier(tmp_path, capsys):
    """`tailtune inspect --measure` of a BERT classifier: a row for its head beside the blocks,
    and the truncated backward (no backward below the trainable block; its own, at these
    sizes, takes milliseconds). The head's own times are checked in test_probes (they print
    as 0.0 ms at one decimal here)."""
    import engine
    cfg = engine.Config.bert(vocab_size=60, n_layer=3, n_head=4, d_model=128, d_ff=256,
                             max_seq_len=128, labels=["no", "yes"])
    engine.Model(cfg, seed=0).save(str(tmp_path / "m"))
    assert cli(["inspect", "--model", str(tmp_path / "m"), "--train-last", "1", "--seq-len", "128",
                "--batch-size", "8", "--measure"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("layer (ms)"):].splitlines()
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in table[1:-1]}
    assert set(rows) == {"embeddings", "blocks.0", "blocks.1", "blocks.2", "classifier"}
    assert rows["blocks.1"][3] == 0 < rows["blocks.2"][3]          # bwd meas
