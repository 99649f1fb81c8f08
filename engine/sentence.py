"""Sentence embeddings from an encoder, and training them: `tailtune finetune` of an encoder on
JSONL rows of {"anchor": ..., "positive": ...} (two texts that belong together: a question and
its answer, a title and its article).

The embedding is what all-MiniLM-L6-v2 is made for (sentence-transformers' Pooling + Normalize):
the mean of the last hidden states over the real tokens, scaled to length 1. The loss is the
in-batch one sentence-transformers calls MultipleNegativesRankingLoss: each anchor against
every positive of its batch, cross-entropy of scale x cosine similarity with its own positive as
the class. A positive repeated in the batch (the same text for several anchors) is not a
negative of those anchors: it is left out of their softmax, and counts as a hit in recall@1.
Each op is a forward and a backward in NumPy (B x C, cheap next to the blocks); the blocks'
backward starts from the hidden states' gradient (Model.backward(dhidden=)).
"""
from __future__ import annotations

import json
import os

import numpy as np

from .errors import InputError

SCALE = 20.0   # sentence-transformers' default for MultipleNegativesRankingLoss


def mean_pool_forward(h, lengths):
    """(B, C) mean of h (B, T, C) over each row's first lengths[b] positions."""
    mask = (np.arange(h.shape[1])[None] < lengths[:, None]).astype(np.float32)   # (B, T)
    return np.einsum("btc,bt->bc", h, mask) / lengths[:, None].astype(np.float32)


def mean_pool_backward(de, lengths, T: int):
    """dh (B, T, C) of the mean: de / length at the real positions, 0 at the padding."""
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    return (mask / lengths[:, None].astype(np.float32))[:, :, None] * de[:, None, :]


def normalize_forward(e):
    """(u, norms): the rows of e (B, C) scaled to length 1."""
    n = np.sqrt((e.astype(np.float64) ** 2).sum(1)).astype(np.float32)          # (B,)
    return e / np.maximum(n, 1e-12)[:, None], n


def normalize_backward(du, u, n):
    """de of u = e / |e|: (du - u (u . du)) / |e|."""
    return (du - u * (u * du).sum(1, keepdims=True)) / np.maximum(n, 1e-12)[:, None]


def ranking_loss(ua, up, scale: float = SCALE, same=None):
    """(loss, dua, dup): mean cross-entropy of scale * ua @ up.T (B, B) against the diagonal
    (each anchor's own positive), and its gradients. same (B, B) bool: positive j is the same
    text as anchor i's own (off the diagonal: left out of row i's softmax)."""
    B = ua.shape[0]
    s = (scale * (ua @ up.T)).astype(np.float64)                                  # (B, B)
    if same is not None:
        s[same & ~np.eye(B, dtype=bool)] = -np.inf
    s -= s.max(1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(1, keepdims=True)
    loss = float(-np.log(p[np.arange(B), np.arange(B)]).mean())
    ds = p
    ds[np.arange(B), np.arange(B)] -= 1.0
    ds = (ds * (scale / B)).astype(np.float32)
    return loss, ds @ up, ds.T @ ua


def embed(model, seqs, idx, pad_id: int, keep: bool = False, cache=None):
    """(normalized embeddings (B, C), what the backward needs) of the texts seqs[idx] (token id
    arrays, or (ids, types) as classify.encode gives them). cache: a classify.PrefixRows over
    seqs, which gives the frozen prefix's output."""
    from .classify import batch
    tokens, lengths, types = batch(seqs, idx, pad_id)
    if cache is None:
        h = model.forward(tokens, lengths=lengths, types=types, keep=keep)
    else:
        h = model.forward(tokens, lengths=lengths, types=types, keep=keep, start=cache.start,
                          hidden=cache.hidden(idx, tokens, lengths, types))
    u, n = normalize_forward(mean_pool_forward(h, lengths))
    return u, (lengths, h.shape[1], u, n)


def backward(model, du, saved, scale: float = 1.0):
    """Model gradients from du, the gradient of the embeddings embed(..., keep=True) gave."""
    lengths, T, u, n = saved
    model.backward(scale, dhidden=mean_pool_backward(normalize_backward(du, u, n), lengths, T))


def pair_step(model, texts, idx, pad_id: int, scale: float = 1.0, cache=None) -> float:
    """One forward and backward of the ranking loss over the pairs idx: texts holds the n
    anchors, then their n positives; the batch's anchors and positives go in one batch of 2B
    texts (one forward, one tape). cache: a classify.PrefixRows over texts."""
    n, B = len(texts) // 2, len(idx)
    both = np.concatenate([idx, np.asarray(idx) + n])
    u, saved = embed(model, texts, both, pad_id, keep=True, cache=cache)
    loss, dua, dup = ranking_loss(u[:B], u[B:], same=_same([texts[i] for i in both[B:]]))
    backward(model, np.concatenate([dua, dup]), saved, scale)
    return loss


def _same(positives):
    """(B, B) bool: positives i and j are the same token ids."""
    index: dict[bytes, int] = {}
    ids = np.array([index.setdefault((p[0] if isinstance(p, tuple) else p).tobytes(), len(index))
                    for p in positives])
    return ids[:, None] == ids[None, :]


def retrieval(model, texts, batch_size: int, pad_id: int, cache=None) -> dict:
    """Held-out pairs (texts: the n anchors, then their n positives): each anchor against every
    held-out positive: the share whose nearest positive is its own text (recall@1), and the mean
    ranking loss over all of them at once. cache: a classify.PrefixRows over texts."""
    n = len(texts) // 2

    def all_of(lo):
        return np.concatenate([embed(model, texts, np.arange(s, min(lo + n, s + batch_size)),
                                     pad_id, cache=cache)[0] for s in range(lo, lo + n, batch_size)])
    ua, up = all_of(0), all_of(n)
    same = _same(texts[n:])
    hits = same[np.arange(len(ua)), (ua @ up.T).argmax(1)]
    return {"loss": ranking_loss(ua, up, same=same)[0], "recall_at_1": float(hits.mean())}


def read_pairs(path: str):
    """(anchors, positives) of a JSONL file of {"anchor", "positive"} rows."""
    from . import data as D
    anchors, positives = [], []
    for n, row in D.read_rows(path, check=False):
        if not (isinstance(row, dict) and isinstance(row.get("anchor"), str)
                and isinstance(row.get("positive"), str)):
            raise InputError(f'{path}:{n}: a row needs "anchor" and "positive" strings')
        anchors.append(row["anchor"])
        positives.append(row["positive"])
    if len(anchors) < 2:
        raise InputError(f"{path}: {len(anchors)} pair(s); the in-batch loss needs two or more")
    return anchors, positives


def write_sentence_transformers_files(d: str, model, seq_len: int) -> None:
    """modules.json and the pooling config beside a saved encoder: sentence-transformers then
    loads it as this embedding (mean pooling, normalized)."""
    mods = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling",
             "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize",
             "type": "sentence_transformers.models.Normalize"}]
    pooling = {"word_embedding_dimension": model.config.d_model, "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False}
    os.makedirs(os.path.join(d, "1_Pooling"), exist_ok=True)   # (Normalize has no files)
    for path, obj in ((os.path.join(d, "modules.json"), mods),
                      (os.path.join(d, "1_Pooling", "config.json"), pooling),
                      (os.path.join(d, "sentence_bert_config.json"),
                       {"max_seq_length": seq_len, "do_lower_case": False})):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)


class PairsTask:
    """A sentence-embedding run (encoder_train.run_encoder): pairs of texts, the encoder without a
    head, the in-batch ranking loss; held-out recall@1."""
    kind, metric = "sentence-embedding", "recall_at_1"
    min_batch = 2   # an anchor needs another pair's positive to rank against

    def __init__(self, args, log):
        from .classify import PrefixCaches, _capped, _pad, _tokenizer_and_length, encode, train_and_held
        from .io import load
        (anchors, positives), (held_a, held_p) = train_and_held(args, read_pairs)
        log(f"loading {args.model} as a sentence encoder (mean pooling, normalized; in-batch "
            "ranking loss over pairs)")
        self.model = model = load(args.model)
        if not model.config.encoder:
            raise InputError(f"{args.model} is a causal language model; sentence embeddings "
                             "({\"anchor\", \"positive\"} rows) train an encoder (BERT, "
                             "RoBERTa, DistilBERT)")
        if model.config.labels is not None:
            raise InputError(f"{args.model} is a classifier; sentence embeddings train an "
                             "encoder without a head (its last hidden states)")
        self.tok, seq_len = _tokenizer_and_length(args, model)
        self.seq_len = seq_len
        if args.batch_size < 2 or len(anchors) < 2:
            raise InputError(f"the in-batch ranking loss needs two or more pairs a batch: "
                             f"--batch-size {args.batch_size}, {len(anchors)} training pair(s)")
        held_a, held_p = _capped(args, held_a, held_p, log)
        # the anchors, then their positives: one list each, so that a batch is one forward
        self.texts, self.held = (encode(self.tok, a + p, seq_len) for a, p in
                                 ((anchors, positives), (held_a, held_p)))
        self.n_train, self.n_held = len(anchors), len(held_a)
        self.pad, self.batch_size = _pad(self.tok), args.batch_size
        self.prefix = PrefixCaches(args, (self.texts, self.held), log)

    def start(self, model, trained=()):
        """When the trainable set is fixed, and whenever a schedule changes it: checked, and
        the prefix caches follow the lowest trainable block (trained: what the run has trained
        so far)."""
        if model.lowest_trainable_block() >= model.config.n_layer:
            raise InputError("sentence embeddings train what the hidden states depend on: give "
                             "--train-last K >= 1, or --unfreeze blocks or embeddings (the "
                             "pooler is on no path from them)")
        self.prefix.follow(model, trained)

    def probe(self):
        """Telemetry's probe batch: the first held-out anchors (training ones without)."""
        from .classify import batch
        seqs, n = (self.held, self.n_held) if self.n_held else (self.texts, self.n_train)
        return batch(seqs, np.arange(min(4, n)), self.pad)

    def weight(self, idx) -> int:
        """What the loss of a micro-batch averages over: its pairs."""
        return len(idx)

    def step(self, idx, scale: float) -> float:
        return pair_step(self.model, self.texts, idx, self.pad, scale, self.prefix.caches[0])

    def evaluate(self):
        if self.n_held < 2:
            return None
        return retrieval(self.model, self.held, self.batch_size, self.pad, self.prefix.caches[1])

    def summary(self, log) -> dict:
        return {"loss": "in-batch ranking (MultipleNegativesRankingLoss), scale 20",
                **self.prefix.summary("training texts (anchors and positives)")}

    def save_extra(self, d: str) -> None:
        write_sentence_transformers_files(d, self.model, self.seq_len)
