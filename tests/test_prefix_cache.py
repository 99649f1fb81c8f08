"""The frozen-prefix activation cache: same weights as without it, each prefix computed once,
invalidated and rebuilt when a lower block is unfrozen, reused from disk by a later run."""
import json
import os
import sys

import numpy as np
import pytest

import engine
from engine import data as D
from engine.cli import main as cli
from engine.prefix_cache import PrefixCache


def tiny(vocab=257, L=5):
    # Llama: no attention k bias (GPT-2's has an exactly-zero gradient, which Adam turns into
    # lr-sized steps driven by rounding noise, different in every computation order)
    cfg = engine.Config.llama(vocab_size=vocab, n_layer=L, n_head=2, n_kv_head=1, d_model=32,
                              d_ff=48, max_seq_len=64)
    return engine.Model(cfg, seed=2)


def update_error(base, a, b) -> float:
    """Largest relative difference, over tensors, between two runs' total updates."""
    worst = 0.0
    for n in base:
        ua, ub = a[n] - base[n], b[n] - base[n]
        if np.any(ub):
            worst = max(worst, float(np.linalg.norm(ua - ub) / np.linalg.norm(ub)))
    return worst


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("pc")
    tiny().save(str(d / "m"))
    engine.ByteTokenizer().save(str(d / "m"))
    rows = [{"prompt": f"claim {i}: " + "x" * (i % 17), "completion": f" route {i % 3}"} for i in range(40)]
    (d / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(d / "m"), str(d / "rows.jsonl"), d


def finetune(setup, out, *extra):
    model, data, d = setup
    args = ["finetune", "--model", model, "--data", data, "--out", str(d / out), "--train-last", "2",
            "--epochs", "3", "--batch-size", "4", "--seq-len", "48", "--lr", "3e-3",
            "--sample-tokens", "0", "--eval-fraction", "0.2", *extra]
    assert cli(args) == 0
    return engine.load(str(d / out / "model")).params, json.load(open(d / out / "summary.json"))


def test_three_epochs_same_weights_each_prefix_computed_once(setup):
    plain, _ = finetune(setup, "plain")
    cached, s = finetune(setup, "cached", "--prefix-cache", "memory")
    # float32 rounding: batches of cached rows are assembled differently, and Adam magnifies
    # last-bit differences where a gradient is near zero, so compare the total updates
    assert update_error(engine.load(setup[0]).params, cached, plain) < 1e-3
    r = s["prefix_cache"]
    assert r["start_block"] == 3
    assert r["examples_computed"] == 40            # 32 training + 8 held-out, once each
    assert r["reads"] > 3 * 32                     # three epochs of reads, plus evaluations
    assert r["hits"] == r["reads"] - 40            # all but each example's first serving


@pytest.mark.parametrize("kind", ["disk", "memory"])
def test_resume_with_the_cache(setup, tmp_path, monkeypatch, kind):
    """Ctrl-C in epoch 2, then --resume: the disk cache is read back and the run ends with the
    uninterrupted run's weights exactly; the memory cache is recomputed in the resumed
    process, in other batches, which moves its rows in the last bits (README: ~1e-7)."""
    from conftest import signal_after_steps
    monkeypatch.setenv("TAILTUNE_CACHE", str(tmp_path / "cache"))
    straight, _ = finetune(setup, f"straight-{kind}", "--prefix-cache", kind)
    model, data, d = setup
    out = str(d / f"stopped-{kind}")
    args = ["finetune", "--model", model, "--data", data, "--out", out, "--train-last", "2",
            "--epochs", "3", "--batch-size", "4", "--seq-len", "48", "--lr", "3e-3",
            "--sample-tokens", "0", "--eval-fraction", "0.2", "--prefix-cache", kind]
    with signal_after_steps(12):       # 8 steps an epoch: stopped inside the second
        assert cli(args) == 130
    assert cli(args + ["--resume", out]) == 0
    resumed = engine.load(os.path.join(out, "model")).params
    worst = max(float(np.abs(resumed[n] - straight[n]).max()) for n in straight)
    if kind == "disk":
        assert worst == 0.0
    else:
        assert worst < 1e-6, worst


def test_float16_cache_within_documented_tolerance(setup):
    plain, _ = finetune(setup, "plain16")
    half, s = finetune(setup, "half", "--prefix-cache", "memory", "--prefix-dtype", "float16")
    assert s["prefix_cache"]["dtype"] == "float16"
    # hidden states rounded to 11 significant bits: the total update of each tensor agrees
    # with the float32 run's to within 5 % (the documented tolerance)
    base = engine.load(setup[0]).params
    assert update_error(base, half, plain) < 0.05


def test_disk_cache_is_reused_by_a_later_run(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("TAILTUNE_CACHE", str(tmp_path / "cache"))
    _, first = finetune(setup, "disk1", "--prefix-cache", "disk")
    _, second = finetune(setup, "disk2", "--prefix-cache", "disk")
    assert first["prefix_cache"]["examples_computed"] == 40
    assert second["prefix_cache"]["examples_computed"] == 0
    assert os.listdir(tmp_path / "cache" / "prefix")


def test_gradual_unfreezing_rebuilds_the_cache_and_matches(setup):
    extra = ["--schedule", "gradual", "--schedule-every", "8"]  # 2 -> 4 trainable blocks
    plain, _ = finetune(setup, "gplain", *extra)
    cached, s = finetune(setup, "gcached", "--prefix-cache", "memory", *extra)
    assert update_error(engine.load(setup[0]).params, cached, plain) < 1e-3
    assert s["prefix_cache"]["start_block"] == 1   # rebuilt lower as blocks were unfrozen


def test_cache_refuses_a_trainable_prefix_and_keys_on_weights(setup):
    model, data, _ = setup
    m = engine.load(model).train_last(2)
    tok = engine.load_tokenizer(model)
    ex = D.Examples(D.tokenize_file(data, tok), 48)
    c = PrefixCache(m, ex, 3)
    assert c.valid_for(m)
    m.unfreeze("blocks.1.*")
    assert not c.valid_for(m)
    with pytest.raises(engine.InputError, match="block 1"):
        PrefixCache(m, ex, 3)
    m.freeze("blocks.1.*")
    m.params["blocks.0.mlp.up.weight"][0, 0] += 1.0     # another prefix: another key
    assert PrefixCache(m, ex, 3).key != c.key


def test_hidden_matches_full_forward(setup):
    model, data, _ = setup
    m = engine.load(model).train_last(2)
    tok = engine.load_tokenizer(model)
    ex = D.Examples(D.tokenize_file(data, tok), 48)
    c = PrefixCache(m, ex, 3)
    x, y, idx = next(D.eval_batches(ex, np.arange(6), 6, 0))
    full = m.forward(x, y, grad=False)
    assert m.forward(x, y, grad=False, hidden=c.hidden(idx, x), start=3) == pytest.approx(full, rel=1e-6)
    x2, y2, idx2 = next(D.eval_batches(ex, np.arange(3, 9), 6, 0))   # partly cached, other padding
    got = m.forward(x2, y2, grad=False, hidden=c.hidden(idx2, x2), start=3)
    assert got == pytest.approx(m.forward(x2, y2, grad=False), rel=1e-6)
    assert c.computed == 9


def test_float16_cache_refuses_values_beyond_its_range(setup):
    """A residual stream above 65504 (large models have such channels) would be cached as inf
    and show up as a NaN loss blamed on the learning rate: the cache refuses it, naming
    float32."""
    model, data, _ = setup
    m = engine.load(model).train_last(2)
    m.params["wte.weight"][:, 0] = 1e5          # one channel of every token, in the residual stream
    ex = D.Examples(D.tokenize_file(data, engine.load_tokenizer(model)), 48)
    x, _, idx = next(D.eval_batches(ex, np.arange(4), 4, 0))
    with pytest.raises(engine.InputError, match="beyond float16's range .*--prefix-dtype float32"):
        PrefixCache(m, ex, 3, dtype="float16").hidden(idx, x)
    assert np.isfinite(PrefixCache(m, ex, 3).hidden(idx, x)).all()


def test_a_run_refused_in_its_first_step_leaves_no_directory(setup, tmp_path):
    """The float16 refusal comes in step 1, after the run directory was made: the run leaves
    nothing behind, so the corrected command (float32) runs in the same --out."""
    model, data, d = setup
    m = engine.load(model)
    m.params["wte.weight"][:, 0] = 1e5
    m.save(str(tmp_path / "big"))
    engine.ByteTokenizer().save(str(tmp_path / "big"))
    out = tmp_path / "run"
    args = ["finetune", "--model", str(tmp_path / "big"), "--data", data, "--out", str(out),
            "--train-last", "2", "--steps", "2", "--batch-size", "4", "--seq-len", "48",
            "--sample-tokens", "0", "--eval-fraction", "0", "--prefix-cache", "memory"]
    assert cli(args + ["--prefix-dtype", "float16"]) == 2
    assert not out.exists()
    assert cli(args + ["--prefix-dtype", "float32"]) == 0


def test_freezeout_moves_the_cache_up_from_the_old_rows_and_matches(setup):
    """FreezeOut freezes block 2, then 3: the cache follows the lowest trainable block up,
    filling each new cache from the previous one's rows, and training is unchanged."""
    extra = ["--train-last", "3", "--schedule", "freezeout", "--freezeout-t0", "0.3"]
    plain, _ = finetune(setup, "fplain", *extra)
    cached, s = finetune(setup, "fcached", "--prefix-cache", "memory", *extra)
    assert update_error(engine.load(setup[0]).params, cached, plain) < 1e-3
    r = s["prefix_cache"]
    assert [c["start_block"] for c in r["caches"]] == [2, 3, 4]
    assert r["start_block"] == 4
    # 40 prefixes at block 2, then each moved up once per block: from the old rows, not
    # from the embeddings
    assert r["examples_computed"] == sum(c["examples_computed"] for c in r["caches"]) == 3 * 40
    assert r["reads"] == 3 * 32 + 2 * 8    # training's epochs, the evaluations before and after


def test_disk_files_of_trained_prefixes_are_deleted(setup, tmp_path, monkeypatch):
    """A prefix holding blocks the run trained can never be reused: its file goes at the end
    of the run. The first cache, over pretrained blocks only, stays for later runs."""
    monkeypatch.setenv("TAILTUNE_CACHE", str(tmp_path / "cache"))
    _, s = finetune(setup, "fdisk", "--prefix-cache", "disk", "--train-last", "3",
                    "--schedule", "freezeout", "--freezeout-t0", "0.3")
    first = s["prefix_cache"]["caches"][0]
    assert first["start_block"] == 2
    files = sorted(os.listdir(tmp_path / "cache" / "prefix"))
    assert len(files) == 2          # .npy + .filled.npy (the held-out split shares the cache)
    m = engine.load(setup[0])
    from engine.prefix_cache import prefix_hash
    assert all(f.startswith(prefix_hash(m, 2)) for f in files)


def test_default_key_tells_datasets_of_equal_lengths_apart(setup, tmp_path):
    """Two datasets with the same example lengths and different tokens never share rows, even
    through the API without a data key."""
    model, _, _ = setup
    m = engine.load(model).train_last(2)
    tok = engine.load_tokenizer(model)
    sets = []
    for name, ch in (("a", "a"), ("b", "b")):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"prompt": ch * 9, "completion": " " + ch * 3}) + "\n"
                             for _ in range(4)))
        data = D.tokenize_file(str(p), tok)
        data.key = ""                                  # as an API caller's own TokenData
        sets.append(D.Examples(data, 48))
    d = str(tmp_path / "pc")
    for ex in sets:
        c = PrefixCache(m, ex, 3, directory=d)
        x, y, idx = next(D.eval_batches(ex, np.arange(4), 4, 0))
        h = c.hidden(idx, x)
        assert c.computed == 4                         # nothing read from the other set's file
        np.testing.assert_allclose(h, m.prefix(x, 3), rtol=1e-6, atol=1e-6)


def test_cache_with_every_block_trainable_says_so(setup, capsys):
    _, s = finetune(setup, "allk", "--prefix-cache", "memory", "--train-last", "5")
    assert s["prefix_cache"] is None
    assert "no frozen prefix" in capsys.readouterr().out


def test_cache_takes_room_for_the_rows_it_serves_and_checks_there_is_room(setup, tmp_path, monkeypatch,
                                                                          capsys):
    from engine import prefix_cache as PC
    model, data, d = setup
    m = engine.load(model).train_last(2)
    ex = D.Examples(D.tokenize_file(data, engine.load_tokenizer(model)), 48)
    rows = np.array([2, 5, 11])
    c = PrefixCache(m, ex, 3, rows=rows)
    C = m.config.d_model
    assert c.nbytes == sum(len(ex.get(i)[0]) - 1 for i in rows) * C * 4
    assert c.key != PrefixCache(m, ex, 3).key    # a disk file of a subset is not the whole set's
    x, y, idx = next(D.eval_batches(ex, rows, 3, 0))
    assert m.forward(x, y, grad=False, hidden=c.hidden(idx, x), start=3) == pytest.approx(
        m.forward(x, y, grad=False), rel=1e-6)
    with pytest.raises(engine.InputError, match="not made to serve"):
        c.hidden(np.array([0]), x[:1])
    # too big for memory or disk: refused before anything is allocated, as the CLI's error
    need = PrefixCache(m, ex, 3).nbytes
    monkeypatch.setattr(PC, "_available_memory", lambda: need)
    with pytest.raises(engine.InputError, match=r"--prefix-cache memory needs .* MiB of memory is available"):
        PrefixCache(m, ex, 3)
    monkeypatch.setattr(PC, "_available_memory", lambda: 10 * need)
    PrefixCache(m, ex, 3)
    import shutil
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=need // 2))
    with pytest.raises(engine.InputError, match="--prefix-cache disk needs .* is free"):
        PrefixCache(m, ex, 3, directory=str(tmp_path / "pc"))
    assert not [f for f in os.listdir(tmp_path / "pc") if f.endswith(".npy")]
    monkeypatch.setenv("TAILTUNE_CACHE", str(tmp_path / "c"))
    args = ["finetune", "--model", model, "--data", data, "--out", str(tmp_path / "run"), "--steps", "2",
            "--batch-size", "4", "--seq-len", "48", "--sample-tokens", "0", "--prefix-cache", "disk"]
    assert cli(args) == 2
    assert "--prefix-cache disk needs" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")   # nothing half-made


def test_a_cache_whose_prefix_trained_since_is_never_read():
    """A block of the cached prefix unfrozen, trained and frozen again: the cache's rows are
    not its output any more, so the cache says it is no longer valid and refuses to serve
    (instead of the stale rows: a loss 1% off here), and a new cache serves the right rows."""
    m = tiny(L=4).train_last(1)
    opt = engine.AdamW(m, lr=1e-2)
    rng = np.random.default_rng(0)
    lens = rng.integers(6, 20, 8)
    off = np.concatenate([[0], np.cumsum(lens)])
    toks = rng.integers(0, 257, int(off[-1])).astype(np.int32)
    ex = D.Examples(D.TokenData(toks, np.ones_like(toks, np.uint8), off, "examples", "mem"), 32)
    x, y, idx = next(D.eval_batches(ex, np.arange(8), 8, 0))
    cache = PrefixCache(m, ex, 3)
    cache.hidden(idx, x)
    assert cache.valid_for(m)
    m.unfreeze("blocks.2.*")
    for _ in range(3):
        m.zero_grad()
        m.forward(x, y)
        m.backward()
        opt.step()
    m.freeze("blocks.2.*")
    assert not cache.valid_for(m)
    with pytest.raises(engine.InputError, match="trained since the cache was made"):
        cache.hidden(idx, x)
    fresh = PrefixCache(m, ex, 3)
    real = np.arange(x.shape[1]) < (lens[idx] - 1)[:, None]     # rows past an example are zeros
    np.testing.assert_allclose(fresh.hidden(idx, x)[real], m.prefix(x, 3)[real], rtol=0, atol=1e-6)
    m.params["wte.weight"] = m.params["wte.weight"].copy()   # an array replaced by hand
    assert not fresh.valid_for(m)


def _examples(n=6, vocab=257, seed=0):
    rng = np.random.default_rng(seed)
    lens = rng.integers(6, 20, n)
    off = np.concatenate([[0], np.cumsum(lens)])
    toks = rng.integers(0, vocab, int(off[-1])).astype(np.int32)
    return D.Examples(D.TokenData(toks, np.ones_like(toks, np.uint8), off, "examples", "mem"), 32)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fallocate(2) is Linux's")
def test_a_disk_cache_without_room_is_refused_before_training_not_a_sigbus(tmp_path, monkeypatch):
    """The cache file is memory-mapped and sparse: a store into it on a full disk kills the
    process (SIGBUS) mid-epoch. Its blocks are reserved when it is made, so a full disk is an
    error naming the file then, and no half-made file is left."""
    import ctypes
    import errno
    from engine import prefix_cache as P
    m = tiny(L=4).train_last(1)

    def full(fd, mode, offset, length):
        ctypes.set_errno(errno.ENOSPC)
        return -1
    monkeypatch.setattr(P, "_FALLOCATE", full)
    with pytest.raises(engine.InputError, match=r"--prefix-cache disk: no room for .*\.npy "
                                                r"\(No space left on device\)"):
        PrefixCache(m, _examples(), 3, directory=str(tmp_path / "c"))
    assert os.listdir(tmp_path / "c") == []
    monkeypatch.undo()
    c = PrefixCache(m, _examples(), 3, directory=str(tmp_path / "c"))
    st = os.stat(c.files[0])
    assert st.st_blocks * 512 >= st.st_size       # allocated whole, not sparse


def test_the_room_check_counts_what_a_reused_file_holds_on_disk_not_its_size(tmp_path, monkeypatch):
    """A cache file filled in part is sparse: reusing it needs the room its holes will take.
    Crediting its apparent size let a run start that a full disk then killed."""
    from engine import prefix_cache as P
    d = tmp_path / "c"
    d.mkdir()
    with open(d / "k.npy", "wb") as f:
        f.truncate(100 << 20)                     # 100 MiB apparent, nothing allocated
    monkeypatch.setattr(P.shutil, "disk_usage", lambda p: type("U", (), {"free": 10 << 20})())
    with pytest.raises(engine.InputError, match=r"needs 50.0 MiB in .* and 10.0 MiB is free"):
        P._check_room(50 << 20, 4, str(d), "k")
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(engine.InputError, match="cannot create .*TAILTUNE_CACHE"):
        P._check_room(1, 1, str(blocked / "prefix"), "k")


def test_measuring_a_step_leaves_a_cache_valid_and_loading_a_checkpoint_does_not(tmp_path):
    """probes.measure trains a few steps and puts the weights back: a cache made before stays
    valid (nothing changed). Weights copied in from a checkpoint are new: a cache made before
    is refused."""
    from engine import probes
    from engine.train import load_checkpoint, save_checkpoint
    m = tiny(L=4)
    m.train_last(4)
    ex = _examples()
    probes.measure(m, 2, 8, steps=1)
    m.train_last(1)
    cache = PrefixCache(m, ex, 3)
    m.train_last(4)
    probes.measure(m, 2, 8, steps=1)
    m.train_last(1)
    assert cache.valid_for(m)
    other = engine.Model(m.config, seed=9).train_last(1)
    save_checkpoint(str(tmp_path / "ck"), other, engine.ByteTokenizer(), engine.AdamW(other),
                    {"step": 1, "data": {"epoch": 0, "cursor": 0}, "args": {},
                     "base_fingerprint": "x"})
    load_checkpoint(str(tmp_path / "ck"), m, engine.AdamW(m))
    assert np.array_equal(m.params["blocks.0.mlp.up.weight"], other.params["blocks.0.mlp.up.weight"])
    assert not cache.valid_for(m)


def test_a_held_out_cache_without_room_takes_the_training_cache_of_a_trained_prefix_with_it(
        tmp_path, monkeypatch):
    """A run's caches made at its start (a resume whose prefix holds a block it trained, so the
    files are disposable): the held-out data's cache finds no room after the training data's was
    made. The error stands, and the training cache's files, which no run can reuse, are
    deleted instead of left in the cache folder."""
    import ctypes
    import errno
    from engine import prefix_cache as P, trainer as TR
    monkeypatch.setenv("TAILTUNE_CACHE", str(tmp_path / "tc"))
    m = tiny(L=4).train_last(1)
    calls = {"n": 0}
    real = P._FALLOCATE

    def third_file_on_full(fd, mode, offset, length):
        calls["n"] += 1
        if calls["n"] >= 3:   # the held-out cache's two files
            ctypes.set_errno(errno.ENOSPC)
            return -1
        return real(fd, mode, offset, length)
    monkeypatch.setattr(P, "_FALLOCATE", third_file_on_full)
    trained = {"blocks.0.mlp.up.weight", *m.trainable}
    with pytest.raises(engine.InputError, match="no room"):
        TR._Caches(m, _examples(6), _examples(5, seed=1), np.arange(6), np.arange(5), trained,
                   "disk", batch_size=2)
    assert os.listdir(tmp_path / "tc" / "prefix") == []


def test_a_closed_cache_keeps_only_its_counters(tmp_path):
    """A run keeps every cache it made (for the report), and LISA moves the cache every few
    steps: a closed cache must hold nothing per example, or memory climbs all run long."""
    m = tiny(L=4).train_last(1)
    ex = _examples(40)
    x, y, idx = next(D.eval_batches(ex, np.arange(4), 4, 0))
    for directory in (None, str(tmp_path / "c")):
        c = PrefixCache(m, ex, 3, directory=directory)
        c.hidden(idx, x)
        c.close()
        kept = [k for k, v in vars(c).items() if isinstance(v, (np.ndarray, tuple)) and len(v)]
        assert kept in ([], ["files"]), kept
        r = c.report()
        assert r["examples_computed"] == 4 and r["reads"] == 4


def _old_cache(d, key, mib, mtime):
    for name, size in ((f"{key}.npy", mib << 20), (f"{key}.filled.npy", 4096)):
        # random bytes: allocated on disk even where the file system compresses
        (d / name).write_bytes(os.urandom(size))
        os.utime(d / name, (mtime, mtime))


def test_disk_caches_of_earlier_runs_are_kept_under_a_cap_least_recently_used_first(
        tmp_path, monkeypatch, capsys):
    """Each dataset and base model leaves its pretrained-prefix file for later runs; without a
    cap they filled the disk. Over TAILTUNE_PREFIX_CACHE_GIB, or short of room on the disk
    for the new one, the least recently used go first; the cache being made is never removed,
    nor one a run has open."""
    from engine import prefix_cache as P
    d = tmp_path / "c"
    d.mkdir()
    for key, t in (("a", 1000), ("b", 2000), ("c", 3000)):
        _old_cache(d, key, 1, t)
    monkeypatch.setenv(P.MAX_ENV, str(2.5 / 1024))                 # 2.5 MiB
    P._check_room(5 << 20, 4, str(d), "new")        # the new one's size does not count
    assert sorted(os.listdir(d)) == ["b.filled.npy", "b.npy", "c.filled.npy", "c.npy"]
    err = capsys.readouterr().err
    assert "removed a (1.0 MiB, last used" in err and "removed b" not in err
    assert "to keep the caches of earlier runs under 2.5 MiB (TAILTUNE_PREFIX_CACHE_GIB)" in err

    _old_cache(d, "a", 1, 1000)
    monkeypatch.delenv(P.MAX_ENV)                                  # the 20 GiB default: no cap hit
    free = {"now": 3 << 19}                                        # 1.5 MiB, and what removals free
    monkeypatch.setattr(P.shutil, "disk_usage", lambda p: type("U", (), {"free": free["now"]})())
    real_remove = os.remove

    def remove(f):
        free["now"] += os.stat(f).st_blocks * 512
        real_remove(f)
    monkeypatch.setattr(P.os, "remove", remove)
    with pytest.raises(engine.InputError, match=r"needs 5.0 MiB .* and 1.5 MiB is free"):
        P._check_room(5 << 20, 4, str(d), "new")    # removing all three would not do: none goes
    assert len(os.listdir(d)) == 6
    P._check_room(3 << 20, 4, str(d), "new")        # 1.5 MiB free, 3 MiB needed: a and b go
    assert sorted(os.listdir(d)) == ["c.filled.npy", "c.npy"]
    assert "to make room for this run's (3.0 MiB)" in capsys.readouterr().err
    P._check_room(2 << 20, 4, str(d), "c")          # c's own file counts as room, never removed
    assert sorted(os.listdir(d)) == ["c.filled.npy", "c.npy"]
    monkeypatch.undo()
    monkeypatch.setenv(P.MAX_ENV, "0")                             # keep nothing of earlier runs...
    m = tiny(L=4).train_last(1)
    train = PrefixCache(m, _examples(), 3, directory=str(d))
    held = PrefixCache(m, _examples(seed=1), 3, directory=str(d))
    assert os.path.exists(train.files[0]) and not os.path.exists(d / "c.npy")  # ...but what is open
    train.close()
    PrefixCache(m, _examples(seed=2), 3, directory=str(d))
    assert not os.path.exists(train.files[0]) and os.path.exists(held.files[0])
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv(P.MAX_ENV, bad)
        with pytest.raises(engine.InputError, match=f"TAILTUNE_PREFIX_CACHE_GIB='{bad}': must be a number"):
            P._check_room(1, 1, str(d), "new")


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="flock on Linux")
def test_eviction_skips_a_cache_another_process_has_open(tmp_path, monkeypatch):
    """Removing a file another run has mapped frees no room (the mapping keeps it) and loses it
    for later runs; the open cache's shared lock keeps it."""
    import subprocess
    from engine import prefix_cache as P
    d = tmp_path / "c"
    d.mkdir()
    _old_cache(d, "busy", 1, 1000)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, fcntl, os; fd = os.open(sys.argv[1], os.O_RDONLY); "
        "fcntl.flock(fd, fcntl.LOCK_SH); print('held', flush=True); sys.stdin.read()"),
        str(d / "busy.npy")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv(P.MAX_ENV, "0")
        P._check_room(1, 1, str(d), "new")
        assert (d / "busy.npy").exists()
    finally:
        holder.communicate("")
    P._check_room(1, 1, str(d), "new")              # let go: an earlier run's, over the cap
    assert not (d / "busy.npy").exists()


def test_a_reused_disk_cache_counts_as_used_now(tmp_path):
    m = tiny(L=4).train_last(1)
    c = PrefixCache(m, _examples(), 3, directory=str(tmp_path / "c"))
    for f in c.files:
        os.utime(f, (1000, 1000))
    c.close()
    again = PrefixCache(m, _examples(), 3, directory=str(tmp_path / "c"))
    assert again.files == c.files and all(os.stat(f).st_mtime > 1e9 for f in again.files)
