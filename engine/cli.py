"""`tailtune finetune | generate | eval | bench | inspect | export`."""
from __future__ import annotations

import argparse
import math
import sys

MODEL_HELP = ("model: a Hugging Face directory (config.json + *.safetensors), a .gguf file, a "
              "directory written by tailtune, or 'smollm2' (the packaged SmolLM2-135M-Instruct)")


_UNSET = object()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="tailtune", description="Fine-tune the last layers of a "
                                 "pretrained transformer on a CPU.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    f = sub.add_parser("finetune", help="fine-tune a model on a data file",
                       description="Fine-tune the last layers (or chosen parameters) of a model.")
    f.add_argument("--model", required=True, help=MODEL_HELP)
    f.add_argument("--data", required=True, help="training data: .txt, or .jsonl with "
                   "{'prompt','completion'} or {'messages'} rows (loss on completions / assistant "
                   "turns); .jsonl with {'text','label'} rows (or {'text','text_pair','label'}): "
                   "a classifier of those labels (an encoder's head, or a causal LM's on the "
                   "last token in place of its LM head); for an encoder (BERT, RoBERTa, "
                   "DistilBERT), {'anchor','positive'} rows: sentence embeddings")
    f.add_argument("--out", required=True, help="run directory (checkpoints, metrics, final model)")
    f.add_argument("--train-last", type=int, metavar="K", help="train the last K blocks and the final "
                   "norm (default 2, unless --unfreeze alone is given)")
    f.add_argument("--unfreeze", nargs="+", metavar="GLOB", default=[], help="train the parameters matching these "
                   "glob patterns, e.g. 'blocks.29.mlp.*' (`tailtune inspect --params` lists the names); "
                   "with --train-last, beside its blocks and under any --schedule, throughout, at the "
                   "top block's rate (LISA as its paper runs it: --schedule lisa --unfreeze 'wte.*' "
                   "'lm_head.*', or 'wte.*' alone where the head is tied to it)")
    f.add_argument("--steps", type=int, help="optimizer steps, >= 1 (default: --epochs over the data)")
    f.add_argument("--epochs", type=float, default=1.0, help="passes over the training data (default 1)")
    f.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch (default 8)")
    f.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    f.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    f.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    f.add_argument("--warmup", type=int, help="linear warmup steps W: step s < W (from 0) runs at "
                   "lr (s + 1) / W, then the rate decays by a cosine from lr to --min-lr "
                   "(default 5%% of steps, at least 1; cut to the step count; under "
                   "--schedule freezeout the rate stays at lr after warmup: each block anneals "
                   "its own)")
    f.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine "
                   "decay (default 0)")
    f.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay, matrices "
                   "only (default 0)")
    f.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip; 0 disables (default 1)")
    f.add_argument("--dropout", type=float, default=0.0, help="dropout rate in training, in [0, 1), "
                   "where GPT-2 and BERT have it (attention and MLP outputs, the attention "
                   "probabilities, the embeddings when they train, a classifier's input), in the "
                   "blocks backward runs through; never in the frozen prefix below them, which "
                   "stays a fixed function (default 0: off, whatever the model's config says)")
    f.add_argument("--attention-dropout", type=float, help="dropout rate of the attention "
                   "probabilities (default: --dropout)")
    f.add_argument("--eval-data", help="held-out data file (default: --eval-fraction of --data)")
    f.add_argument("--eval-fraction", type=float, default=0.1, help="share of --data held out, in [0, 1) "
                   "(default 0.1; 0: no held-out loss)")
    f.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: before and after only)")
    f.add_argument("--eval-batches", type=int, default=50, help="at most this many held-out batches per "
                   "evaluation (default 50, i.e. 50 x --batch-size examples; 0: all)")
    f.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default 0: "
                   "only on Ctrl-C, SIGTERM or a failure; a killed run keeps nothing)")
    f.add_argument("--seed", type=int, default=0, help="seed of the split, the batch order and "
                   "schedules (default 0)")
    f.add_argument("--resume", metavar="DIR", help="continue the run whose checkpoint is in DIR")
    f.add_argument("--sample-prompt", help="generate from this prompt before and after "
                   "training, wrapped in the chat template when the model has one (default: a held-out prompt)")
    f.add_argument("--sample-tokens", type=int, default=48, help="tokens to generate for the sample (default "
                   "48; 0: no sample)")
    from .schedules import NAMES
    f.add_argument("--schedule", default="static", choices=NAMES, help="freezing schedule, with K = "
                   "--train-last (default static): static (the last K blocks); gradual (ULMFiT: "
                   "starts with the last K, one more block below every --schedule-every steps); "
                   "lr-decay (the last K, rate x --lr-decay per block down); freezeout (the last K, each "
                   "annealing its rate by its own cosine, in place of the global decay, and "
                   "leaving backward, lowest first from --freezeout-t0); autofreeze (the "
                   "last K; the lowest freeze when their gradient norm changes less than "
                   "--autofreeze-threshold); lisa (K blocks drawn from all, redrawn every "
                   "--schedule-every steps)")
    f.add_argument("--schedule-every", type=int, default=50, help="steps between schedule changes (default 50)")
    f.add_argument("--lr-decay", type=float, default=0.8, help="lr-decay factor per block (default 0.8)")
    f.add_argument("--freezeout-t0", type=float, default=0.5, help="freezeout: fraction of training at "
                   "which the lowest block stops (default 0.5)")
    f.add_argument("--freezeout-spacing", default="linear", choices=("linear", "squared", "cubic"),
                   help="freezeout: how the blocks' stop times t_i run from --freezeout-t0 to 1: "
                   "evenly, or as the paper's squared / cubic strategies, which leave the upper "
                   "blocks more time; the lowest still stops at --freezeout-t0 (the paper gives "
                   "its t0 before the power) (default linear)")
    f.add_argument("--freezeout-scaled", action="store_true", help="freezeout: start each block at "
                   "lr / t_i, so that blocks that stop early travel as far (the paper's scaled "
                   "variant; default off: every block starts at lr)")
    f.add_argument("--autofreeze-threshold", type=float, default=0.05, help="autofreeze: relative "
                   "gradient-norm change below which a block freezes (default 0.05)")
    f.add_argument("--prefix-cache", default="off", choices=("off", "memory", "disk"), help="cache the "
                   "input of the lowest trainable block per example, so later epochs skip the frozen "
                   "prefix (default off; disk: a memory-mapped file in $TAILTUNE_CACHE/prefix, "
                   "TAILTUNE_CACHE defaulting to ~/.cache/tailtune, reused by later runs; what earlier "
                   "runs left is kept under $TAILTUNE_PREFIX_CACHE_GIB, default 20, least recently "
                   "used removed first)")
    f.add_argument("--prefix-dtype", default="float32", choices=("float32", "float16"),
                   help="precision of the prefix cache (default float32; float16: half the memory)")
    f.add_argument("--telemetry-every", type=int, default=0, help="record per-layer gradient norms, "
                   "update ratios, drift, Adam moments and CKA every N steps (0: off)")

    e = sub.add_parser("eval", help="held-out loss and perplexity of a model on a data file")
    e.add_argument("--model", required=True, help=MODEL_HELP)
    e.add_argument("--data", required=True, help="a .txt or .jsonl file (as for finetune: a .txt "
                   "counts one end-of-text target after its last token where the tokenizer has one, "
                   "and is read in windows of --seq-len; see --stride)")
    e.add_argument("--seq-len", type=int, default=256, help="tokens per sequence; longer examples "
                   "are cut, a text file is read in windows of this length (default 256)")
    e.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    e.add_argument("--stride", type=int, help="a .txt only: windows of --seq-len start every N "
                   "tokens and each scores only the tokens the one before did not, so every token "
                   "has at least --seq-len - N tokens of context (sliding-window perplexity; "
                   "default --seq-len: windows that do not overlap)")

    gen = sub.add_parser("generate", help="generate text with a KV cache")
    gen.add_argument("--model", required=True, help=MODEL_HELP)
    gen.add_argument("--prompt", help="prompt text (with --chat: the user message); omit with --chat "
                     "for an interactive chat")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template "
                     "(instruct models); without --prompt, chat interactively")
    gen.add_argument("--system", help="system message for --chat")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="at most this many new tokens; "
                     "generation also stops at the model's end-of-text token, and where the "
                     "prompt and reply fill the model's context (said on stderr) (default 128)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default; "
                     "--top-k, --top-p and --seed then do nothing)")
    gen.add_argument("--top-k", type=int, help="sample among the K most likely tokens only (default: all)")
    gen.add_argument("--top-p", type=float, help="sample among the most likely tokens whose "
                     "probabilities add up to P, in (0, 1] (default 1: all)")
    gen.add_argument("--seed", type=int, help="seed of the sampling (default: a new one each run)")

    b = sub.add_parser("bench", help="benchmarks side by side with PyTorch (see benches/README.md)")
    b.add_argument("workload", nargs="?", default="gpt2-small", help="one of: "
                   + (", ".join(_workloads()) or "(benches/ is not installed)") + " (default gpt2-small)")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the workload")

    i = sub.add_parser("inspect", help="parameters, layers, trainable set and cost per layer")
    i.add_argument("--model", required=True, help=MODEL_HELP)
    i.add_argument("--train-last", type=int, metavar="K", help="show the trainable set of train_last(K)")
    i.add_argument("--seq-len", type=int, help="sequence length for the cost estimate (default "
                   "256, or the model's context if shorter)")
    i.add_argument("--batch-size", type=int, default=4, help="batch size for the cost estimate")
    i.add_argument("--target-fraction", type=float, default=1.0, metavar="F",
                   help="share of positions that carry a loss (chat data with masked prompts and "
                        "padding: e.g. 0.2); the head runs on those only")
    i.add_argument("--measure", action="store_true", help="also run a few training steps and show "
                   "measured milliseconds per layer and phase beside the prediction")
    i.add_argument("--params", action="store_true", help="also list every parameter: name (what "
                   "finetune --unfreeze globs match), shape, size, trainable or frozen")

    x = sub.add_parser("export", help="write a model and its tokenizer as one GGUF file "
                       "(llama.cpp and the tools built on it run it)",
                       description="Write a Llama, Mistral, Phi-3, Qwen2, Qwen3, SmolLM3 or "
                       "GPT-2 model (a fine-tuned run's directory, a Hugging Face directory, a "
                       ".gguf file) and its tokenizer as one GGUF file.")
    x.add_argument("--model", required=True, help=MODEL_HELP)
    x.add_argument("--out", required=True, help="the GGUF file to write, e.g. model.gguf")
    x.add_argument("--dtype", default="F32", metavar="TYPE",
                   help="matrices as F32 (default: float32, as tailtune holds them), F16, BF16, "
                        "Q8_0, Q5_1, Q5_0, Q4_1 or Q4_0; norms stay F32, and under Q5/Q4 the output "
                        "projection is Q8_0. For K-quants, write F16 and run llama.cpp's "
                        "llama-quantize")

    args = ap.parse_args(argv)
    # a file or pipe on Windows gets the ANSI code page, which cannot encode every character of
    # a generated sample: write those as escapes rather than fail after the work is done
    if hasattr(sys.stdout, "reconfigure") and (sys.stdout.encoding or "").lower().replace("-", "") != "utf8":
        sys.stdout.reconfigure(errors="backslashreplace")
    if args.cmd == "finetune":   # which flags were given: a resumed run keeps the others
        f.set_defaults(**{k: _UNSET for k in vars(args)})
        args.given = {k for k, v in vars(ap.parse_args(argv)).items() if v is not _UNSET}
    from .errors import TailtuneError
    try:
        return {"finetune": _finetune, "eval": _eval, "generate": _generate, "bench": _bench,
                "inspect": _inspect, "export": _export}[args.cmd](args)
    except TailtuneError as err:
        print(f"tailtune {args.cmd}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C: nothing half-written
        print(f"\ntailtune {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # last line of defence: a file that could not be read or written
        where = f"{err.filename}: " if err.filename else ""
        print(f"tailtune {args.cmd}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except MemoryError as err:   # numpy names the array it could not allocate
        hint = ("; try a smaller --batch-size or --seq-len" if args.cmd in ("finetune", "eval")
                else "")
        print(f"tailtune {args.cmd}: error: out of memory ({err or 'an allocation failed'}){hint}",
              file=sys.stderr)
        return 2


def _finetune(a):
    from .train import TrainArgs, finetune
    args = TrainArgs(model=a.model, data=a.data, out=a.out, eval_data=a.eval_data,
                     eval_fraction=a.eval_fraction, train_last=a.train_last, unfreeze=a.unfreeze,
                     steps=a.steps, epochs=a.epochs, batch_size=a.batch_size, seq_len=a.seq_len,
                     grad_accum=a.grad_accum, lr=a.lr, warmup=a.warmup, min_lr=a.min_lr,
                     weight_decay=a.weight_decay, clip=a.clip, dropout=a.dropout,
                     attention_dropout=a.attention_dropout, eval_every=a.eval_every,
                     eval_batches=a.eval_batches, save_every=a.save_every, seed=a.seed,
                     sample_prompt=a.sample_prompt, sample_tokens=a.sample_tokens,
                     schedule=a.schedule, schedule_every=a.schedule_every, lr_decay=a.lr_decay,
                     freezeout_t0=a.freezeout_t0, freezeout_spacing=a.freezeout_spacing,
                     freezeout_scaled=a.freezeout_scaled, autofreeze_threshold=a.autofreeze_threshold,
                     prefix_cache=a.prefix_cache, prefix_dtype=a.prefix_dtype,
                     telemetry_every=a.telemetry_every)
    summary = finetune(args, resume=a.resume, log=lambda m: print(m, flush=True), given=a.given)
    return 128 + summary.get("signal", 2) if summary["status"] == "interrupted" else 0  # 130: SIGINT


def _check_flags(*rules):
    """(flag, value, test, what it must be): checked before anything is loaded, since a bad
    value otherwise fails late, confusingly, or not at all. None is an omitted option."""
    from .errors import check_flags
    check_flags(r for r in rules if r[1] is not None)


def _sizes(a):
    return (("--seq-len", a.seq_len, lambda v: v >= 1, ">= 1"),
            ("--batch-size", a.batch_size, lambda v: v >= 1, ">= 1"))


def _eval(a):
    import numpy as np

    from . import data as D
    from .io import load
    from .io.resolve import resolve_model_path
    from .tokenizer import load_tokenizer
    from .train import EvalProgress, check_seq_len
    from .trainer import evaluate
    _check_flags(*_sizes(a), ("--stride", a.stride, lambda v: 1 <= v <= a.seq_len,
                              f"in 1..--seq-len {a.seq_len}"))
    from .classify import eval_encoder, is_classifier, is_classifier_run
    if not is_classifier(a.model) and is_classifier_run(a.model, a.data):
        from .errors import InputError
        raise InputError(f"{a.model} is a language model, not a classifier: labeled rows "
                         "(tagged words, sentence pairs) evaluate a classifier (a token "
                         "classifier, a sentence encoder); `tailtune finetune` on them makes one")
    if is_classifier(a.model):
        r = eval_encoder(a.model, a.data, a.batch_size, a.seq_len)
        if "recall_at_1" in r:
            print(f"ranking loss {r['loss']:.4f}  recall@1 {r['recall_at_1']:.3f}")
            return 0
        if "f1" in r:
            per = "  ".join(f"{k} {v:.3f}" for k, v in r["per_type"].items())
            print(f"loss {r['loss']:.4f}  word accuracy {r['accuracy']:.3f}  entity F1 "
                  f"{r['f1']:.3f} (precision {r['precision']:.3f}, recall {r['recall']:.3f}; "
                  f"per type: {per})" + (f"  ({r['words_cut']} words past --seq-len, not "
                                         "scored)" if r["words_cut"] else ""))
            return 0
        per = "  ".join(f"{k} {v:.3f}" for k, v in r["per_label"].items())
        print(f"loss {r['loss']:.4f}  accuracy {r['accuracy']:.3f}  (per label: {per})")
        return 0
    model = load(a.model)
    tok = load_tokenizer(resolve_model_path(a.model), model_vocab_size=model.config.vocab_size)
    check_seq_len(a.seq_len, model.config)
    data = D.tokenize_file(a.data, tok, log=lambda m: print(m, file=sys.stderr, flush=True))
    if a.stride is not None and data.kind != "text":
        print("note: --stride applies to a .txt; the rows of a .jsonl are scored whole",
              file=sys.stderr)
    ex = D.Examples(data, a.seq_len, a.stride if data.kind == "text" else None)
    D.check_targets(ex, np.arange(len(ex)), a.data, lambda m: print(f"warning: {m}", file=sys.stderr))
    if ex.data.kind == "examples" and ex.truncated:   # the loss is then of the cut examples
        print(f"note: {ex.truncated} examples are longer than --seq-len {a.seq_len} and were "
              "truncated", file=sys.stderr)
    pad = tok.batch_pad_id
    loss = evaluate(model, ex, np.arange(len(ex)), a.batch_size, pad, progress=EvalProgress("eval"))
    print(f"loss {loss:.4f}  perplexity {math.exp(min(loss, 50)):.3f}  ({len(ex)} examples)")
    return 0


def _generate(a):
    from .generate import generate, stop_ids
    from .io import load
    from .io.resolve import resolve_model_path
    from .tokenizer import load_tokenizer
    _check_flags(("--max-new-tokens", a.max_new_tokens, lambda v: v >= 0, ">= 0"),
                 ("--temperature", a.temperature, lambda v: 0 <= v < math.inf, "a finite number >= 0"),
                 ("--top-k", a.top_k, lambda v: v >= 1, ">= 1"),
                 ("--top-p", a.top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
                 ("--seed", a.seed, lambda v: v >= 0, ">= 0"))
    model = load(a.model)
    tok = load_tokenizer(resolve_model_path(a.model), model_vocab_size=model.config.vocab_size)
    if a.temperature == 0 and (a.top_k, a.top_p, a.seed) != (None, None, None):
        print("note: --temperature 0 (the default) is greedy: --top-k, --top-p and --seed "
              "apply only when sampling (give --temperature, e.g. 0.7)", file=sys.stderr)
    stops = stop_ids(model, tok)
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
              top_p=a.top_p, seed=a.seed, stop=stops, vocab_size=tok.vocab_size)

    def stream(ids, head=""):
        out = []

        def show(t):
            if stream.head is not None:  # written once generate() has accepted its arguments
                sys.stdout.write(stream.head)
                stream.head = None
            out.append(t)
            if t not in stops:
                text = tok.decode_continuation(out, ids)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    sys.stdout.write(text[len(stream.shown):])
                    stream.shown = text
                    sys.stdout.flush()
        stream.shown, stream.head = "", head
        generate(model, ids, on_token=show, **kw)
        print(stream.head or "")  # the head too when no token came
        room = model.config.context_length - len(ids)
        if len(out) == room < a.max_new_tokens and not (out and out[-1] in stops):
            print(f"note: stopped after {room} new tokens: the prompt ({len(ids)} tokens) and "
                  f"the reply fill the model's context of {model.config.context_text()}",
                  file=sys.stderr)
        return [t for t in out if t not in stops]

    if a.chat and not tok.chat_template:
        from .errors import InputError
        raise InputError(f"--chat needs a chat template and {a.model} ships none (a base model, "
                         "not an instruct one): drop --chat to continue a plain-text prompt")
    if not a.chat:
        if a.prompt is None:
            from .errors import InputError
            raise InputError("--prompt is required (or use --chat for an interactive chat)")
        stream(tok.encode(a.prompt), head=a.prompt)
        return 0
    messages = [{"role": "system", "content": a.system}] if a.system else []
    turns = [a.prompt] if a.prompt is not None else None
    while True:
        if turns is not None:
            if not turns:
                return 0
            user = turns.pop(0)
        else:
            try:
                user = input("you> ")
            except EOFError:
                print()
                return 0
            if not user.strip():
                continue
        messages.append({"role": "user", "content": user})
        # interactive: a conversation outgrows the context, and the session goes on
        ids = (tok.chat_ids(messages) if turns is not None
               else _fit_chat(tok, messages, model.config.context_length, a.max_new_tokens))
        if ids is None:
            messages.pop()
            continue
        reply = stream(ids, head="model> " if turns is None else "")
        messages.append({"role": "assistant", "content": tok.decode(reply)})


_MIN_REPLY = 16   # tokens of room a chat turn needs at the least to be worth generating


def _fit_chat(tok, messages, limit: int, max_new_tokens: int):
    """The prompt ids of `messages` (ending with the new user message) once the oldest
    user + assistant turns after any system message are dropped from `messages` until the
    prompt and a reply fit the context; None (and a note) when even the new message alone
    leaves no room for a reply."""
    start = 1 if messages[0]["role"] == "system" else 0
    room = min(max_new_tokens, _MIN_REPLY)
    alone = len(tok.chat_ids(messages[:start] + messages[-1:]))
    if alone + room > limit:
        print(f"note: this message takes {alone} tokens with the chat template, too many for the "
              f"model's context of {limit} with room for a reply; not sent, try a shorter one",
              file=sys.stderr)
        return None
    # history is kept while a reply of max_new_tokens fits, but never for less than a quarter
    # of the context: generate() stops at the context anyway, and a --max-new-tokens as large
    # as the context would otherwise drop every earlier turn
    budget = min(max_new_tokens, max(room, limit // 4))
    ids, dropped = tok.chat_ids(messages), 0
    while len(ids) + budget > limit and len(messages) - start > 1:
        del messages[start:start + 2]
        dropped += 1
        ids = tok.chat_ids(messages)
    if dropped:
        print(f"note: dropped the {dropped} oldest turn{'s' * (dropped > 1)} of the conversation "
              f"to fit the model's context of {limit} tokens", file=sys.stderr)
    return ids


def _benches_dir() -> str:
    import os
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benches")


def _workloads() -> list[str]:
    """Workload names (benches/*.py with dashes), read from the folder so --help stays in step
    with it; none when benches/ is not installed."""
    import os
    here = _benches_dir()
    return sorted(n[:-3].replace("_", "-") for n in (os.listdir(here) if os.path.isdir(here) else ())
                  if n.endswith(".py") and n != "common.py")


def _bench(a):
    import os
    here = _benches_dir()
    if not os.path.isdir(here):
        print("tailtune bench: the benchmarks live in the source checkout's benches/, which a "
              "regular install does not include: in the checkout, install it editable "
              "(pip install -e '.[bench]') or run python benches/<workload>.py", file=sys.stderr)
        return 2
    script = os.path.join(here, a.workload.replace("-", "_") + ".py")
    if not os.path.isfile(script):
        print(f"tailtune bench: unknown workload {a.workload!r}; available: {', '.join(_workloads())}",
              file=sys.stderr)
        return 2
    import runpy
    argv, path = sys.argv, list(sys.path)
    sys.argv = [script] + list(a.rest)
    sys.path.insert(0, here)
    import common   # the module the script imports too
    common.PROG = f"tailtune bench {a.workload}"
    try:
        runpy.run_path(script, run_name="__main__")
    finally:     # a caller in the same process (a test, a notebook) keeps its own
        sys.argv, sys.path[:] = argv, path
        common.PROG = None
    return 0


def _inspect(a):
    from .io import load
    from .probes import cost_table
    from .train import check_seq_len, check_train_last
    _check_flags(*_sizes(a), ("--target-fraction", a.target_fraction, lambda v: 0.0 < v <= 1.0,
                              "in (0, 1]"))
    model = load(a.model)
    if a.seq_len is None:
        a.seq_len = min(256, model.config.context_length)
    check_seq_len(a.seq_len, model.config)
    if model.config.encoder:
        if model.config.labels is None:
            print("note: an encoder without a classifier head: costed as a sentence encoder "
                  "(every position through the top block; with labeled data, tailtune finetune "
                  "trains a classifier, whose top block runs the first position only after "
                  "attention)")
    if a.train_last is not None:
        model.train_last(check_train_last(a.train_last, model.config))
    print(model)
    if a.params:
        print(_param_table(model))
    n = a.batch_size * a.seq_len
    rows = None if a.target_fraction == 1.0 else max(1, round(a.target_fraction * n))
    print(cost_table(model, a.batch_size, a.seq_len, rows))
    if a.measure:   # the same share of target positions (the first ones masked, as prompts)
        from .probes import measured_table
        if not model.trainable:
            model.train_last(2)
        print()
        print(measured_table(model, a.batch_size, a.seq_len, target_rows=rows))
    return 0


def _export(a):
    import os

    from .errors import InputError
    from .io import load
    from .io.gguf_write import check_dtype, save_gguf
    from .io.resolve import resolve_model_path
    from .tokenizer import load_tokenizer
    dtype = check_dtype(a.dtype)   # before the load
    if not a.out.lower().endswith(".gguf"):
        raise InputError(f"--out {a.out}: name the file *.gguf (the tools that read GGUF "
                         "expect it, and Model.save picks the format by that ending)")
    model = load(a.model)
    tok = load_tokenizer(resolve_model_path(a.model), model_vocab_size=model.config.vocab_size)
    save_gguf(model, a.out, tok, dtype=dtype)
    print(f"wrote {a.out} ({os.path.getsize(a.out) / 2**20:.1f} MiB, {dtype}): "
          f"{model.config.n_layer} blocks, {model.num_params() / 1e6:.1f}M parameters, "
          f"{tok.vocab_size} tokens")
    return 0


def _param_table(model) -> str:
    """One line per parameter: its name (the glob patterns of --unfreeze match these), shape,
    size and whether it is trainable."""
    w, trainable = max(len(n) for n in model.params), set(model.trainable)
    lines = [f"{'parameter':<{w}}  {'shape':<14}{'size':>12}  train"]
    for n, p in model.params.items():
        lines.append(f"{n:<{w}}  {' x '.join(map(str, p.shape)):<14}{p.size:>12,}  "
                     f"{'trainable' if n in trainable else 'frozen'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
