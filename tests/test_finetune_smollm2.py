"""Fine-tuning the real SmolLM2 (last 2 of 30 blocks) on real text: held-out loss falls, frozen
tensors stay bit-identical, and transformers, loading the saved model, gets the held-out loss
that `tailtune eval` prints."""
import inspect
import json
import os
import re

import numpy as np
import pytest
import torch

import engine
from engine.cli import main as cli

pytestmark = pytest.mark.slow


def test_finetune_smollm2_last_two_blocks(require_smollm2, tmp_path, capsys):
    import argparse  # real English prose with code: the standard library's own docs
    text = inspect.getdoc(argparse) + "\n\n" + inspect.getsource(argparse.ArgumentParser)[:6000]
    data = tmp_path / "docs.txt"
    data.write_text(text)
    out = str(tmp_path / "run")
    assert cli(["finetune", "--model", "smollm2", "--data", str(data), "--out", out,
                "--train-last", "2", "--steps", "6", "--batch-size", "4", "--seq-len", "64",
                "--lr", "5e-4", "--eval-fraction", "0.25", "--sample-tokens", "0"]) == 0
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["eval_loss_after"] < s["eval_loss_before"] - 0.05
    model_dir = os.path.join(out, "model")
    base, tuned = engine.load("smollm2").params, engine.load(model_dir).params
    for n in base:
        trainable = n.startswith(("blocks.28.", "blocks.29.", "ln_f."))
        assert np.array_equal(base[n], tuned[n]) != trainable, n

    capsys.readouterr()
    assert cli(["eval", "--model", model_dir, "--data", str(data), "--seq-len", "64"]) == 0
    printed = float(re.search(r"loss (\S+)", capsys.readouterr().out).group(1))

    from transformers import AutoModelForCausalLM
    from engine import data as D
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = engine.load_tokenizer(model_dir)
    ex = D.Examples(D.tokenize_file(str(data), tok), 64)
    total = count = 0.0
    for x, y, _ in D.eval_batches(ex, np.arange(len(ex)), 8, tok.eos_id):
        with torch.no_grad():
            logits = hf(torch.tensor(x)).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 torch.tensor(y).reshape(-1), ignore_index=-100,
                                                 reduction="sum")
        total += loss.item()
        count += int((y >= 0).sum())
    assert printed == pytest.approx(total / count, abs=2e-4)
