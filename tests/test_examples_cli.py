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
