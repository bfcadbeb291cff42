"""The built-in synthetic corpus: small maths documents for offline CPU runs.

Every document mixes a few line kinds, each with one fixed format so that a tiny model (a few
layers, hidden 128-256, a SentencePiece vocabulary of 512-2048 pieces with digits split) learns
the surface form in minutes of CPU pre-training, while some next tokens can only be had by
computing:

    arithmetic   "4827 + 3596 = 8423"            (digits of a sum with carries: hard)
    sequence     "Sequence: 3, 7, 11, 15, 19"    (arithmetic, geometric, Fibonacci-like rules)
    algebra      "If x + 7 = 12 then x = 5."
    problem      "Problem: Ana has 14 apples. She buys 3 bags of 6 apples. How many apples
                  does she have now?"
                 "Solution: 3 * 6 = 18. 14 + 18 = 32. The answer is 32."

Templates, separators and operators are predictable (easy positions); results are not unless
computed (hard positions).

Determinism: the corpus is a pure function of `SyntheticConfig`. Only `random.Random.random()`
is used (the one stream Python guarantees across versions); integers are derived from it here.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Iterator

KINDS = ("arithmetic", "sequence", "algebra", "problem")

_NAMES = ("Ana", "Ben", "Carl", "Dana", "Eva", "Finn", "Gita", "Hugo", "Ines", "Jon")
_ITEMS = ("apples", "books", "coins", "eggs", "pens", "cards", "stones", "shells")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Size and mix of the synthetic corpus.

  Attributes:
    num_documents: documents generated (about 380 bytes each with the defaults, so the default
      corpus is about 0.8 MB).
    seed: the corpus is a pure function of the config; change the seed for another corpus.
    lines_per_document: (min, max) lines per document, inclusive.
    kinds: which line kinds to mix (a subset of `KINDS`), drawn uniformly per line.
    max_digits: largest operand size (in digits) of the arithmetic lines.
  """

  num_documents: int = 2000
  seed: int = 0
  lines_per_document: tuple[int, int] = (4, 10)
  kinds: tuple[str, ...] = KINDS
  max_digits: int = 3

  def __post_init__(self):
    if self.num_documents < 1:
      raise ValueError(f"synthetic num_documents={self.num_documents}: must be >= 1.")
    lo, hi = self.lines_per_document
    if not 1 <= lo <= hi:
      raise ValueError(
          f"synthetic lines_per_document={self.lines_per_document}: need 1 <= min <= max.")
    unknown = sorted(set(self.kinds) - set(KINDS))
    if unknown or not self.kinds:
      raise ValueError(f"synthetic kinds={self.kinds}: choose a non-empty subset of {KINDS}.")
    if not 1 <= self.max_digits <= 9:
      raise ValueError(f"synthetic max_digits={self.max_digits}: must be in 1..9.")


class Rng:
  """Integers and choices from `random.Random.random()` only (version-stable)."""

  def __init__(self, seed: str):
    # String seeds are hashed with SHA-512 (stable since Python 3.2).
    self._r = random.Random(seed)

  def int(self, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return lo + min(int(self._r.random() * (hi - lo + 1)), hi - lo)

  def choice(self, seq):
    return seq[self.int(0, len(seq) - 1)]


def number(rng: Rng, max_digits: int) -> int:
  """A number of 1..max_digits digits (the digit count uniform)."""
  digits = rng.int(1, max_digits)
  return rng.int(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1)


def _arithmetic(rng: Rng, cfg: SyntheticConfig) -> str:
  op = rng.choice(("+", "+", "-", "*"))
  if op == "*":
    a, b = rng.int(2, 99), rng.int(2, 9)
    return f"{a} * {b} = {a * b}"
  a, b = number(rng, cfg.max_digits), number(rng, cfg.max_digits)
  if op == "-":
    a, b = max(a, b), min(a, b)
    return f"{a} - {b} = {a - b}"
  return f"{a} + {b} = {a + b}"


def _sequence(rng: Rng, cfg: SyntheticConfig) -> str:
  del cfg
  rule = rng.choice(("arithmetic", "geometric", "fibonacci"))
  if rule == "arithmetic":
    start, step, n = rng.int(0, 50), rng.int(1, 12), rng.int(5, 8)
    terms = [start + i * step for i in range(n)]
  elif rule == "geometric":
    start, ratio, n = rng.int(1, 5), rng.int(2, 3), rng.int(4, 6)
    terms = [start * ratio ** i for i in range(n)]
  else:
    terms = [rng.int(1, 9), rng.int(1, 9)]
    for _ in range(rng.int(3, 5)):
      terms.append(terms[-1] + terms[-2])
  return "Sequence: " + ", ".join(str(t) for t in terms)


def _algebra(rng: Rng, cfg: SyntheticConfig) -> str:
  del cfg
  x = rng.int(1, 30)
  op = rng.choice(("+", "-", "*"))
  if op == "+":
    b = rng.int(1, 30)
    return f"If x + {b} = {x + b} then x = {x}."
  if op == "-":
    b = rng.int(1, x) if x > 1 else 1
    return f"If x - {b} = {x - b} then x = {x}."
  b = rng.int(2, 9)
  return f"If {b} * x = {b * x} then x = {x}."


def _problem(rng: Rng, cfg: SyntheticConfig) -> str:
  del cfg
  name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
  have, bags, per = rng.int(2, 40), rng.int(2, 9), rng.int(2, 12)
  kind = rng.choice(("buys", "gives"))
  bought = bags * per
  if kind == "buys":
    return (f"Problem: {name} has {have} {item}. {name} buys {bags} bags of {per} {item}. "
            f"How many {item} does {name} have now?\n"
            f"Solution: {bags} * {per} = {bought}. {have} + {bought} = {have + bought}. "
            f"The answer is {have + bought}.")
  have += bought  # Ensure the result stays non-negative.
  return (f"Problem: {name} has {have} {item}. {name} gives away {bags} bags of {per} {item}. "
          f"How many {item} does {name} have now?\n"
          f"Solution: {bags} * {per} = {bought}. {have} - {bought} = {have - bought}. "
          f"The answer is {have - bought}.")


_MAKERS: dict[str, Callable[[Rng, SyntheticConfig], str]] = {
    "arithmetic": _arithmetic,
    "sequence": _sequence,
    "algebra": _algebra,
    "problem": _problem,
}


def corpus_line(rng: Rng, config: SyntheticConfig | None = None) -> str:
  """One line (a problem: two lines) of a uniformly drawn kind, as documents hold them."""
  config = config or SyntheticConfig()
  return _MAKERS[rng.choice(config.kinds)](rng, config)


# Where a line's tokens become computable from what precedes them (the rest is either fixed
# wording, predictable without work, or a free choice no reasoning can predict: an operand, a
# name, a sequence's first terms).
LINE_KINDS = ("arithmetic", "sequence", "algebra", "problem", "line start")


def position_kind(line_prefix: str) -> tuple[str, bool]:
  """(line kind, computable) of the next token after `line_prefix`, the text of its line
  before it (the context after its last newline).

  computable: an arithmetic line's result (after '='), a sequence's terms from the fourth on,
  an equation's solution (after 'then x ='), a problem's Solution line; False for operands,
  names, first terms and the problem statement. An empty prefix (the token starts a line) is
  ('line start', False).
  """
  if not line_prefix:
    return "line start", False
  if line_prefix.startswith("Sequence:"):
    return "sequence", line_prefix.count(",") >= 3
  if line_prefix.startswith("If "):
    return "algebra", "then x =" in line_prefix
  if line_prefix.startswith(("Problem:", "Solution:")):
    return "problem", line_prefix.startswith("Solution:")
  return "arithmetic", "=" in line_prefix


def synthetic_documents(config: SyntheticConfig | None = None) -> Iterator[str]:
  """Yields `config.num_documents` documents, each a few lines joined by newlines.

  Document i depends only on (seed, i), so any prefix of the corpus is the same for every
  `num_documents` (a larger corpus extends a smaller one).
  """
  config = config or SyntheticConfig()
  for i in range(config.num_documents):
    rng = Rng(f"rpt-synthetic/{config.seed}/{i}")
    lo, hi = config.lines_per_document
    lines = [_MAKERS[rng.choice(config.kinds)](rng, config) for _ in range(rng.int(lo, hi))]
    yield "\n".join(lines) + "\n"
