"""The benchmark workloads start: each script parses its options and imports what it needs
(`--help` exits before any timing), and `tailtune bench` finds them by name. Running them is
minutes each and their figures are not test material (no timing assertions in tests)."""
import os
import subprocess
import sys

import pytest

from engine.cli import main as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = ["gpt2-small", "smollm2", "freeze-sweep", "kernels", "generate", "instruments"]


@pytest.mark.parametrize("name", WORKLOADS)
def test_bench_script_parses_its_options(name):
    script = os.path.join(ROOT, "benches", name.replace("-", "_") + ".py")
    r = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and "--json" in r.stdout


def test_tailtune_bench_runs_a_workload_by_name(capsys):
    with pytest.raises(SystemExit) as e:     # argparse's --help exits 0 after printing
        cli(["bench", "freeze-sweep", "--help"])
    assert e.value.code == 0
    assert "freeze_sweep.py" in capsys.readouterr().out
    assert not any(p.endswith("benches") for p in sys.path)   # the caller's path is restored


def test_tailtune_bench_unknown_workload(capsys):
    assert cli(["bench", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "unknown workload 'nonsense'" in err and "gpt2-small" in err and "common" not in err
