"""Token classification (named entities, part-of-speech tags) for encoders: `tailtune finetune`
on JSONL rows of {"tokens": [words], "tags": [one tag per word]} (the layout of Hugging Face's
CoNLL-style datasets; "ner_tags" is read as "tags"). The model gets a token classifier
(Config.per_token: transformers' *ForTokenClassification, which its pipeline loads).

Words are tokenized as transformers' is_split_into_words does (Tokenizer.encode_words); a
word's tag is the target of its first piece, its other pieces and the special tokens have none
(-100), as in transformers' token-classification example. Evaluation reads the prediction at
each word's first piece and scores entities by seqeval's default rules (its get_entities:
IOB1, IOB2, IOE and IOBES tags; a chunk counts when its type and both ends are right). A tag
without a B- / I- / E- / S- prefix is read as I- of its own name (seqeval would read its
first letter as the prefix: "PER" as a P- tag of type "ER"); "O" is outside. Tags are names
(strings): a dataset's integer class ids need their names first. Words cut by --seq-len are
left out of both sides and counted.
"""
from __future__ import annotations

import os

import numpy as np

from . import data as D
from .classify import (ClassifierTask, PrefixCaches, _capped, _forward, _pad, _tokenizer_and_length,
                       batch, choose_labels, train_and_held)
from .errors import InputError
from .io import load

IGNORE = -100


def read_tagged(path: str) -> tuple[list, list]:
    """(word lists, tag lists) of a JSONL file of {"tokens": [...], "tags": [...]} rows."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such data file")
    if not path.lower().endswith((".jsonl", ".json")):
        raise InputError(f'{path}: a token classifier trains on JSONL rows of {{"tokens": [...], '
                         '"tags": [...]}')
    words, tags = [], []
    for n, row in D.read_rows(path, check=False):
        where = f"{path}:{n}"
        if not isinstance(row, dict):
            raise InputError(f'{where}: a row needs "tokens" and "tags" lists')
        w, t = row.get("tokens"), row.get("tags", row.get("ner_tags"))
        if not isinstance(w, list) or not all(isinstance(x, str) for x in w):
            raise InputError(f'{where}: "tokens" must be a list of strings (the words)')
        if isinstance(t, list) and any(isinstance(x, int) and not isinstance(x, bool) for x in t):
            raise InputError(f'{where}: "tags" holds integers; tags are names such as "B-PER" '
                             "and \"O\" (a dataset's integer ner_tags need its features' names: "
                             "map them to their names first)")
        if not isinstance(t, list) or not all(isinstance(x, str) and x for x in t):
            raise InputError(f'{where}: "tags" must be a list of non-empty strings, one per word')
        if len(t) != len(w):
            raise InputError(f'{where}: {len(w)} words and {len(t)} tags (one tag per word)')
        if not w:
            raise InputError(f"{where}: a row without words")
        words.append(w)
        tags.append(list(t))
    if not words:
        raise InputError(f"{path}: no rows")
    return words, tags


def align(tok, word_lists, tag_lists, seq_len: int, index: dict) -> tuple[list, list, int]:
    """(sequences (ids, None), targets (ids' length, -100 but at each kept word's first
    piece), words cut by seq_len (or with no piece at all))."""
    seqs, targets, lost = [], [], 0
    for (ids, word_ids), tags in zip(tok.encode_words(word_lists, max_length=seq_len), tag_lists):
        t = np.full(len(ids), IGNORE, np.int64)
        seen = set()
        for p, w in enumerate(word_ids):
            if w is not None and w not in seen:
                seen.add(w)
                t[p] = index[tags[w]]
        lost += len(tags) - len(seen)
        seqs.append((np.asarray(ids, np.int64), None))
        targets.append(t)
    return seqs, targets, lost


def _split(tag: str) -> tuple[str, str]:
    """(prefix letter, type) of a tag: "B-PER" -> ("B", "PER"); "O" -> ("O", ""); a tag without
    a B- / I- / E- / S- prefix -> ("I", itself)."""
    if tag == "O":
        return "O", ""
    if tag[:2] in ("B-", "I-", "E-", "S-"):
        return tag[0], tag[2:]
    return "I", tag


def _ends(prev, tag, prev_type, kind) -> bool:
    """seqeval's end_of_chunk: the chunk open at the previous tag ends before this one."""
    return (prev in ("E", "S") or prev in ("B", "I") and tag in ("B", "S", "O")
            or prev != "O" and prev_type != kind)


def _starts(prev, tag, prev_type, kind) -> bool:
    """seqeval's start_of_chunk: a chunk starts at this tag."""
    return (tag in ("B", "S") or prev in ("E", "S", "O") and tag in ("E", "I")
            or tag != "O" and prev_type != kind)


def chunks(tags) -> set:
    """The entities of a tag sequence: (type, first word, last word + 1)."""
    out, start = set(), 0
    prev, prev_type = "O", ""
    for i, t in enumerate(list(tags) + ["O"]):
        tag, kind = _split(t)
        if _ends(prev, tag, prev_type, kind):
            out.add((prev_type, start, i))
        if _starts(prev, tag, prev_type, kind):
            start = i
        prev, prev_type = tag, kind
    return out


def entity_scores(gold_lists, pred_lists) -> dict:
    """Micro precision, recall and F1 over the entities of all sequences, and F1 per type."""
    tp, n_gold, n_pred, per = 0, 0, 0, {}
    for gold, pred in zip(gold_lists, pred_lists):
        g, p = chunks(gold), chunks(pred)
        tp += len(g & p)
        n_gold += len(g)
        n_pred += len(p)
        for kind in {c[0] for c in g | p}:
            a = per.setdefault(kind, [0, 0, 0])
            gk, pk = {c for c in g if c[0] == kind}, {c for c in p if c[0] == kind}
            a[0] += len(gk & pk)
            a[1] += len(gk)
            a[2] += len(pk)
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_gold if n_gold else 0.0
    return {"precision": prec, "recall": rec, "f1": _f1(tp, n_gold, n_pred),
            "per_type": {k: _f1(*a) for k, a in sorted(per.items())}}


def _f1(tp, n_gold, n_pred) -> float:
    return 2 * tp / (n_gold + n_pred) if n_gold + n_pred else 0.0


def _padded(targets, idx, T: int) -> np.ndarray:
    out = np.full((len(idx), T), IGNORE, np.int64)
    for r, i in enumerate(idx):
        out[r, :len(targets[i])] = targets[i]
    return out


def evaluate(model, seqs, targets, batch_size: int, pad_id: int, cache=None) -> dict:
    """Mean loss per labeled word, word accuracy, and entity precision, recall, F1 (per type
    too) of the predictions at each word's first piece."""
    labels = model.config.labels
    loss_sum, n, right = 0.0, 0, 0
    gold, pred = [], []
    for s in range(0, len(seqs), batch_size):
        idx = np.arange(s, min(len(seqs), s + batch_size))
        tokens = batch(seqs, idx, pad_id)[0]
        logits = _forward(model, seqs, idx, pad_id, cache)       # (B, T, K)
        y = _padded(targets, idx, tokens.shape[1])
        at = y != IGNORE
        if at.any():           # (a batch of rows whose words all make no token has none)
            z = logits[at] - logits[at].max(1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(1, keepdims=True))
            loss_sum -= float(logp[np.arange(len(logp)), y[at]].sum(dtype=np.float64))
        n += int(at.sum())
        p = logits.argmax(-1)
        right += int((p[at] == y[at]).sum())
        for r in range(len(idx)):
            gold.append([labels[k] for k in y[r][at[r]]])
            pred.append([labels[k] for k in p[r][at[r]]])
    return {"loss": loss_sum / max(n, 1), "accuracy": right / max(n, 1),
            **entity_scores(gold, pred)}


def choose_tags(model_path: str, data_tags) -> list[str]:
    """The model's own tags when it is a token classifier and the data's are among them (its
    head is kept), else the data's, sorted (a new head)."""
    return choose_labels(model_path, data_tags, per_token=True)


def eval_tagged(model_path: str, data: str, batch_size: int, seq_len: int) -> dict:
    """`tailtune eval` of a token classifier on {"tokens", "tags"} rows."""
    from .io.resolve import resolve_model_path
    from .tokenizer import load_tokenizer
    words, tags = read_tagged(data)
    model = load(model_path)
    if not model.config.per_token:
        raise InputError(f"{model_path} is not a token classifier: fine-tune one on "
                         '{"tokens", "tags"} rows first (tailtune finetune)')
    unknown = sorted({t for ts in tags for t in ts} - set(model.config.labels))
    if unknown:
        raise InputError(f"{data}: tags {unknown[:5]} are not among the model's "
                         f"{model.config.labels}")
    tok = load_tokenizer(resolve_model_path(model_path), model_vocab_size=model.config.vocab_size)
    index = {c: i for i, c in enumerate(model.config.labels)}
    seqs, targets, lost = align(tok, words, tags, min(seq_len, model.config.context_length), index)
    return {**evaluate(model, seqs, targets, batch_size, _pad(tok)), "words_cut": lost}


class TokenTask(ClassifierTask):
    """A token classifier's run: tagged words, the model with a token classifier over their
    tags, an optional prefix cache; step() and evaluate() for encoder_train.run_encoder (the
    rest as a sequence classifier's)."""
    kind, metric = "token classification", "f1"

    def __init__(self, args, log):
        (words, tags), (held_words, held_tags) = train_and_held(args, read_tagged)
        classes = choose_tags(args.model, [t for ts in tags for t in ts])
        unknown = sorted({t for ts in held_tags for t in ts} - set(classes))
        if unknown:
            raise InputError(f"held-out tags {unknown[:5]} never occur in the training data")
        log(f"loading {args.model} as a token classifier over {len(classes)} tags: {classes}")
        self.model = model = load(args.model, labels=classes, per_token=True)
        self.tok, seq_len = _tokenizer_and_length(args, model)
        if not hasattr(self.tok, "encode_words"):
            raise InputError(f"{type(self.tok).__name__} cannot encode pre-split words; a token "
                             "classifier needs a Hugging Face tokenizer (tokenizer.json)")
        index = {c: i for i, c in enumerate(classes)}
        self.seqs, self.targets, lost = align(self.tok, words, tags, seq_len, index)
        if lost:
            log(f"note: {lost} training words are past --seq-len {seq_len} (or make no token) "
                "and are not trained on")
        tagged = [i for i, t in enumerate(self.targets) if (t != IGNORE).any()]
        if len(tagged) < len(self.seqs):   # nothing to learn from: left out, and said
            log(f"note: {len(self.seqs) - len(tagged)} training rows have no word that makes a "
                "token and are left out")
            if not tagged:
                raise InputError(f"{args.data}: no training row has a word that makes a token")
            self.seqs = [self.seqs[i] for i in tagged]
            self.targets = [self.targets[i] for i in tagged]
        held_words, held_tags = _capped(args, held_words, held_tags, log)
        self.held, self.held_targets, lost = align(self.tok, held_words, held_tags, seq_len, index)
        if lost:
            log(f"note: {lost} held-out words are past --seq-len {seq_len} (or make no token) "
                "and are not scored")
        self.n_train, self.n_held, self.labels = len(self.seqs), len(self.held), classes
        self.pad, self.batch_size = _pad(self.tok), args.batch_size
        self.prefix = PrefixCaches(args, (self.seqs, self.held), log)

    def weight(self, idx) -> int:
        """What the loss of a micro-batch averages over: its labeled words."""
        return sum(int((self.targets[i] != IGNORE).sum()) for i in idx)

    def step(self, idx, scale: float) -> float:
        T = max(len(self.seqs[i][0]) for i in idx)
        loss = _forward(self.model, self.seqs, idx, self.pad, self.prefix.caches[0],
                        _padded(self.targets, idx, T))
        self.model.backward(scale)
        return loss

    def evaluate(self):
        return (evaluate(self.model, self.held, self.held_targets, self.batch_size, self.pad,
                         self.prefix.caches[1]) if self.n_held else None)
