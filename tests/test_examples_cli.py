"""The examples' command lines: what they write, and where."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import freeze_curve  # noqa: E402
import train_from_scratch  # noqa: E402
from engine.cli import main as cli  # noqa: E402


def test_train_from_scratch_save_is_a_model_the_cli_loads(tmp_path, monkeypatch, capsys):
    d = str(tmp_path / "m")
    monkeypatch.setattr(sys, "argv", ["train_from_scratch.py", "--steps", "2", "--batch-size", "2",
                                      "--seq-len", "32", "--save", d])
    train_from_scratch.main()
    assert os.path.isfile(os.path.join(d, "tokenizer.json"))   # without it the CLI refuses the model
    capsys.readouterr()
    assert cli(["generate", "--model", d, "--prompt", "def ", "--max-new-tokens", "4"]) in (0, None)
    assert capsys.readouterr().out.startswith("def ")
    text = tmp_path / "held.txt"
    text.write_text("import os\n\ndef f(x):\n    return x + 1\n" * 20)
    assert cli(["eval", "--model", d, "--data", str(text), "--seq-len", "32"]) in (0, None)
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize("argv, reported", [
    (["--eval-base"], True),
    (["--eval-base", "--report-only", "--force", "--keep-models"], True),   # not settings
    (["--eval-base", "--steps", "120", "--ks", "30,15,8,4,2,0"], True),      # the same sweep
    ([], False),                                                             # no base-model row
    (["--eval-base", "--ks", "0,1", "--steps", "2", "--eval-rows", "1", "--seq-len", "128"], False),
    (["--eval-base", "--lrs", "1e-4,3e-4"], False),
])
def test_freeze_curve_publishes_only_the_reported_experiment(argv, reported):
    ap = freeze_curve._parser()
    got, out, work = freeze_curve._where(ap, ap.parse_args(argv))
    assert got is reported
    if reported:
        assert (out, work) == (freeze_curve.PUBLISHED, freeze_curve.PUBLISHED_WORK)
    else:
        assert out == work == freeze_curve.QUICK
    ap = freeze_curve._parser()   # an explicit directory wins
    assert freeze_curve._where(ap, ap.parse_args([*argv, "--out", "x", "--work", "y"]))[1:] == ("x", "y")


def _bert_run(k, lr, seed, acc, loss, later=0.01):
    return {"k": k, "lr": lr, "seed": seed, "accuracy": acc, "loss": loss, "trainable_params": 10 * k,
            "accuracy_before": 0.4, "loss_before": 1.1, "step_s_first_epoch": 0.2,
            "step_s_first_epoch_min": 0.1, "step_s_later": later, "step_s_later_min": later / 2,
            "peak_rss_bytes": (300 + k) * 2**20, "git": {"commit": "abc1234", "dirty": []}}


def test_freeze_curve_bert_keeps_each_ks_best_rate_and_writes_its_tables(tmp_path):
    """Per k the rate of the lowest mean held-out loss over seeds; accuracy as mean and sample
    sd of its seeds; relative to k = 6 and to the majority class; tables and plot written."""
    import freeze_curve_bert as fcb
    runs = [_bert_run(0, 1e-4, 0, 0.50, 1.0), _bert_run(0, 1e-4, 1, 0.60, 1.0),   # mean loss 1.0
            _bert_run(0, 3e-4, 0, 0.90, 0.5), _bert_run(0, 3e-4, 1, 0.30, 1.6),   # 1.05: not kept
            _bert_run(6, 1e-4, 0, 0.80, 0.4), _bert_run(6, 1e-4, 1, 0.80, 0.4)]
    summary = fcb.summarize(runs, majority=0.4)
    r0, r6 = summary["rows"]
    assert (r0["k"], r0["lr"], r6["lr"]) == (0, 1e-4, 1e-4)
    assert r0["accuracy"] == pytest.approx(0.55) and r0["accuracy_sd"] == pytest.approx(0.0707107, rel=1e-5)
    assert r0["rel_accuracy"] == pytest.approx(0.55 / 0.80)
    assert r0["rel_gain_over_majority"] == pytest.approx((0.55 - 0.4) / (0.80 - 0.4))
    assert r6["rel_accuracy"] == r6["rel_gain_over_majority"] == 1.0
    fcb.write_outputs(summary, str(tmp_path), "a title")
    assert {"results.json", "results.csv", "results.md", "freeze_curve.png"} <= set(os.listdir(tmp_path))
    assert "| 0 | 0.00M | 0.0001 | 0.550 ± 0.071 |" in (tmp_path / "results.md").read_text()


def test_freeze_curve_plot_draws_from_a_summary(tmp_path):
    rows = [{"k": k, "rel_loss_gain": k / 30, "step_s_first_epoch": 1.0, "step_s_first_epoch_min": 0.9,
             "step_s_later": 0.1 * k, "step_s_later_min": 0.09 * k, "peak_rss_mib": 1000 + k}
            for k in (0, 2, 30)]
    freeze_curve.plot({"rows": rows}, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 10_000
