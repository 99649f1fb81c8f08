"""Sampling with a KV cache: greedy, temperature, top-k, top-p, stop tokens, seeded."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np

from .errors import InputError, is_int, is_number


def generate(model, ids, max_new_tokens: int = 30, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, stop: Iterable[int] = (),
             seed: int | None = None, use_cache: bool = True,
             on_token: Callable[[int], None] | None = None,
             vocab_size: int | None = None) -> list[int]:
    """Continue the token ids `ids` (a list of ints) and return the new ids.

    temperature 0 is greedy (argmax); otherwise logits / temperature are sampled, restricted to
    the top_k most likely and to the smallest set whose probability reaches top_p. Generation
    ends after max_new_tokens, at the context limit, or after emitting a token in `stop` (which
    is included). With use_cache the prompt runs once and each new token costs one position;
    use_cache=False re-runs the whole sequence per token (for checking the cache).
    vocab_size (e.g. `tok.vocab_size`) keeps every new id below it: a model whose vocabulary is
    padded past its tokenizer's would otherwise be able to emit ids the tokenizer cannot decode."""
    # every argument checked here, before any work: int() would accept "12" and truncate 2.5,
    # and a NaN temperature would only surface inside numpy's sampler
    ids = _id_list("prompt ids", ids)
    if not ids:
        raise InputError("generate needs at least one prompt token")
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not is_number(temperature) or not 0 <= temperature < math.inf:
        raise InputError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise InputError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (not is_number(top_p) or not 0 < top_p <= 1):
        raise InputError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if seed is not None and (not is_int(seed) or seed < 0):
        raise InputError(f"seed must be None or an integer >= 0, got {seed!r}")
    if on_token is not None and not callable(on_token):
        raise InputError(f"on_token must be None or a function of one token id, got {on_token!r}")
    V = model.config.vocab_size
    if vocab_size is not None and (not is_int(vocab_size) or not 1 <= vocab_size <= V):
        raise InputError(f"vocab_size must be None or an integer in 1..{V} (the model's "
                         f"vocabulary), got {vocab_size!r}")
    stop = set(_id_list("stop", stop))
    limit = model.config.context_length
    if len(ids) > limit:
        raise InputError(f"prompt of {len(ids)} tokens exceeds the model's context of "
                         f"{model.config.context_text()}")
    rng = np.random.default_rng(seed)
    total = min(limit, len(ids) + max_new_tokens)
    out: list[int] = []
    if use_cache:
        cache = model.new_cache(1, total)
        logits = model.forward_cached(np.array([ids]), cache, 0)[0]
    else:
        logits = model.forward(np.array([ids]))[0, -1]
    while len(ids) + len(out) < total:
        tok = pick(logits[:vocab_size], temperature, top_k, top_p, rng)
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        if tok in stop or len(ids) + len(out) >= total:
            break
        if use_cache:
            logits = model.forward_cached(np.array([[tok]]), cache, len(ids) + len(out) - 1)[0]
        else:
            logits = model.forward(np.array([ids + out]))[0, -1]
    return out


def _id_list(what: str, ids) -> list[int]:
    """A flat iterable of integer token ids as a list of ints (a str is not one: its characters
    are not ids; encode it with the tokenizer first)."""
    if isinstance(ids, (str, bytes)):
        raise InputError(f"{what} must be integer token ids, got {type(ids).__name__} (encode "
                         "text with the tokenizer first)")
    if isinstance(ids, np.ndarray) and ids.ndim != 1:
        raise InputError(f"{what} must be a flat sequence of token ids, got shape {ids.shape}")
    try:
        ids = list(ids)
    except TypeError:
        raise InputError(f"{what} must be a list of integer token ids, got "
                         f"{type(ids).__name__}") from None
    for i in ids:
        if not is_int(i):
            raise InputError(f"{what} must hold integer token ids, got {i!r}")
    return [int(i) for i in ids]


def pick(logits, temperature, top_k=None, top_p=None, rng=None) -> int:
    """One token id from a (V,) logits vector."""
    if temperature == 0:
        return int(np.argmax(logits))
    # the max subtracted before dividing: logits / a tiny temperature (1e-320) overflow to inf
    # and inf - inf is NaN; this way the best logit stays 0 and the others go to -inf, so any
    # positive temperature works and a tiny one samples among the tied best only (greedy)
    logits = logits.astype(np.float64)
    with np.errstate(over="ignore"):
        z = (logits - logits.max()) / temperature
    if top_k is not None and 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z)
    p /= p.sum()
    if top_p is not None and top_p < 1:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[:int(np.searchsorted(cum, top_p) + 1)]  # smallest prefix reaching top_p
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return int((rng or np.random.default_rng()).choice(p.size, p=p))


def stop_ids(model, tok) -> tuple[int, ...]:
    """The ids that end a generation: the tokenizer's end tokens and those the model's
    config.json lists (transformers takes its generation config from config.json when a
    directory ships no generation_config.json)."""
    e = model.config.eos_token_id
    extra = e if isinstance(e, list) else ([] if e is None else [e])
    return tuple(dict.fromkeys([*tok.eos_ids, *extra]))
