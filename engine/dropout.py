"""Dropout in training: off unless asked for (Model.set_dropout, `--dropout`).

Where: in every block that backward runs through (the lowest trainable block and all above
it), at the sites of transformers' GPT-2 and BERT: the attention probabilities, the attention's
output projection and the MLP's output (before each residual add; DistilBERT has none after the
projection); the embeddings' output when an embedding trains; an encoder classifier's input
(the pooled first position, and for RoBERTa's head the first position before its dense layer
too; a token classifier's, every position). Not in the
frozen prefix below the lowest trainable block: it stays a fixed function of its input, which
the prefix cache and the truncated backward rely on (torch's train mode would drop there too,
with nothing to learn from it). Not in evaluation, generation or probes: only a forward that
keeps what backward needs draws masks.

Masks are not stored: each is a hash of a 32-bit key (kernels/dropout.py), and the keys of a
forward come from (seed, position, forwards drawn at that position). The trainers move the
position to each micro-batch's number (seek), so that a resumed run draws the masks the
uninterrupted one would have."""
from dataclasses import dataclass

import numpy as np

from .errors import InputError, is_int, is_number

# the keys of one forward: three per block, then the embeddings', the classifier's and the
# pooler's (RoBERTa's classifier head drops out its input too)
ATTENTION, ATTENTION_OUT, MLP_OUT = 0, 1, 2


@dataclass
class Dropout:
    p: float            # hidden states: attention and MLP outputs, embeddings, classifier input
    attention: float    # attention probabilities
    seed: int = 0       # with the position, decides every mask
    position: int = 0   # the micro-batch's number (seek); 0 for a user's own loop
    drawn: int = 0      # training forwards drawn at this position

    @staticmethod
    def make(p, attention=None, seed=0):
        """A Dropout, or None when both rates are 0; rates checked to lie in [0, 1)."""
        attention = p if attention is None else attention
        for name, v in (("p", p), ("attention", attention)):
            if not is_number(v) or not 0 <= v < 1:
                raise InputError(f"dropout {name} must be a number in [0, 1), got {v!r}")
        if not is_int(seed) or seed < 0:
            raise InputError(f"dropout seed must be an integer >= 0, got {seed!r}")
        if p == 0 and attention == 0:
            return None
        return Dropout(float(p), float(attention), int(seed))

    def draw(self, n_layer: int) -> "Keys":
        """The keys of the next training forward."""
        keys = np.random.SeedSequence([self.seed, self.position, self.drawn]).generate_state(
            3 * n_layer + 3)
        self.drawn += 1
        return Keys(self.p, self.attention, [int(k) for k in keys], n_layer)

    def __str__(self):
        return (f"dropout {self.p:g}" + ("" if self.attention == self.p else
                                         f" (attention {self.attention:g})"))

    def seek(self, step: int, micro: int, grad_accum: int):
        """Masks of micro-batch `micro` of optimizer step `step` (both from 0) from here on,
        whatever ran before."""
        self.position, self.drawn = step * grad_accum + micro, 0


@dataclass
class Keys:
    """One forward's masks: rates and a key per site."""
    p: float
    attention: float
    keys: list
    n_layer: int

    def block(self, b: int) -> tuple:
        """(p, attention rate, keys of the attention probabilities, attention output, MLP output)
        of block b."""
        return (self.p, self.attention, *self.keys[3 * b:3 * b + 3])

    @property
    def embeddings(self) -> int:
        return self.keys[3 * self.n_layer]

    @property
    def classifier(self) -> int:
        return self.keys[3 * self.n_layer + 1]

    @property
    def pooler(self) -> int:
        return self.keys[3 * self.n_layer + 2]
