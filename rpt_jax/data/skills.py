"""Worked-reasoning skill examples: the computations behind the synthetic corpus's computable
tokens, each worked step by step in the policy's own format.

The paper's base policy (R1-Distill-Qwen) can already reason before RPT, just not at next-token
prediction. The offline policy gets the same start: pretraining shows it, besides the corpus,
problems solved in a worked format (`rpt_jax.pretrain` wraps each as a chat turn: the problem as
the user message, then `thought`, `</think>`, `\\boxed{answer}`, EOS). These are NOT
next-token-reasoning prompts (no template, no "### Context"): RPT has to learn to use the skill
on a document's position.

    kind      problem (a corpus line up to a computed token)  thought                        answer
    add       "482 + 359 = "                 "2+9+0=11:1 8+5+1=14:41 4+3+1=8:841"        "841"
    subtract  "504 - 128 = "                 "14-8-0=6:6 10-2-1=7:76 5-1-1=3:376"        "376"
    multiply  "47 * 6 = "                    "7*6+0=42:2 4*6+4=28:282"                   "282"
    sequence  "Sequence: 3, 7, 11, 15, "     "7-3=4 11-7=4 15-11=4 add 4: 15+4=19"       "19"
    equation  "If x + 7 = 12 then x = "      "12-7=5"                                    "5"
    add       "482 + 359 = 84"               (as above)                                  "1"

Digit steps run from the units up: `a+b+c=s` adds digit a, digit b and the carry c in (the
written digit is s's last, the carry out its first); `1a-b-c=d` borrows ten (the next step's c
is 1); `a*m+c=s` multiplies one digit. After each step's `:` comes the result so far (its
written digit before the previous result so far; the last step's whole value), so every token
of a step reads only the step before it and the problem's digit it works on, and the answer
is copied from the last step. A third of the problems show the answer's first digits already
(a document's position inside a number): the answer is then the rest. So thoughts grow with
the work: one step per digit, three to five checks per sequence, one line per equation. Tokens
no reasoning can predict (a random name, an operand) get no skill example.

Every example is a pure function of (seed, index); problems are drawn fresh (never taken from
the corpus, so no held-out document can leak in), with the corpus's number ranges. A problem may
follow one or two other corpus-style lines (the skill works on the LAST line of a text), and a
third of the arithmetic ones sit in a problem's `Solution:` line.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

from rpt_jax.data import synthetic

SKILLS = ("add", "subtract", "multiply", "sequence", "equation")


@dataclasses.dataclass(frozen=True)
class SkillExample:
  """One worked problem: `problem` (user text), `thought` (the work), `answer` (the result)."""

  kind: str
  problem: str
  thought: str
  answer: str


def _digits(n: int) -> list[int]:
  """Decimal digits of n >= 0, units first."""
  return [int(c) for c in reversed(str(n))]


def _chain(steps: list[tuple[str, int]], written: list[int]) -> tuple[str, str]:
  """(thought, answer) of digit steps: step i is `work_i` then `:` and the result so far (the
  digits written up to step i, units last; the last step writes its whole value), so every
  digit of the answer is copied from the step right before it. Leading zeros are dropped from
  the answer."""
  out = []
  for i, (work, value) in enumerate(steps):
    last = i == len(steps) - 1
    so_far = (str(value) if last else str(value % 10)) + "".join(
        str(d) for d in reversed(written[:i]))
    out.append(f"{work}={value}:{so_far}")
  return " ".join(out), str(int(so_far))


def add_work(a: int, b: int) -> tuple[str, str]:
  """(thought, answer) of a + b (a, b >= 0): one `x+y+c=s:r` step per digit from the units up
  (c the carry in, r the result so far)."""
  da, db = _digits(a), _digits(b)
  steps, written, carry = [], [], 0
  for i in range(max(len(da), len(db))):
    x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
    s = x + y + carry
    steps.append((f"{x}+{y}+{carry}", s))
    written.append(s % 10)
    carry = s // 10
  return _chain(steps, written)


def subtract_work(a: int, b: int) -> tuple[str, str]:
  """(thought, answer) of a - b (a >= b >= 0): `x-y-c=d:r`, or `1x-y-c=d:r` borrowing ten."""
  if not 0 <= b <= a:
    raise ValueError(f"subtract_work needs 0 <= b <= a; got a={a}, b={b}.")
  da, db = _digits(a), _digits(b)
  steps, written, borrow = [], [], 0
  for i, x in enumerate(da):
    y = db[i] if i < len(db) else 0
    top = x + 10 if x - borrow < y else x
    d = top - y - borrow
    steps.append((f"{top}-{y}-{borrow}", d))
    written.append(d)
    borrow = int(top > x)
  return _chain(steps, written)


def multiply_work(a: int, m: int) -> tuple[str, str]:
  """(thought, answer) of a * m for one digit m (0..9): `x*m+c=s:r` per digit of a."""
  if not 0 <= m <= 9:
    raise ValueError(f"multiply_work needs a one-digit multiplier; got m={m}.")
  steps, written, carry = [], [], 0
  for x in _digits(a):
    s = x * m + carry
    steps.append((f"{x}*{m}+{carry}", s))
    written.append(s % 10)
    carry = s // 10
  return _chain(steps, written)


def sequence_rule(terms: list[int]) -> tuple[str, int] | None:
  """The rule of the last three terms: ('add', d), ('times', r), ('sum', 0), or None."""
  u, v, w = terms[-3:]
  if v - u == w - v:
    return "add", w - v
  if 0 < u and v % u == 0 and 0 < v and w % v == 0 and v // u == w // v:
    return "times", v // u
  if u + v == w:
    return "sum", 0
  return None


def sequence_work(terms: list[int]) -> tuple[str, str] | None:
  """(thought, next term) for >= 3 terms: the differences, the rule, its application; None
  when the last three terms fit no rule."""
  if len(terms) < 3:
    raise ValueError(f"sequence_work needs >= 3 terms; got {terms}.")
  rule = sequence_rule(terms)
  if rule is None:
    return None
  u, v, w = terms[-3:]
  checks = f"{v}-{u}={v - u} {w}-{v}={w - v}"
  name, k = rule
  if name == "add":
    return f"{checks} add {k}: {w}+{k}={w + k}", str(w + k)
  if name == "times":
    return f"{checks} {v}/{u}={k} {w}/{v}={k} times {k}: {w}*{k}={w * k}", str(w * k)
  return f"{checks} {u}+{v}={w} sum: {v}+{w}={v + w}", str(v + w)


def equation_work(op: str, b: int, rhs: int) -> tuple[str, str]:
  """(thought, x) solving `x + b = rhs`, `x - b = rhs` or `b * x = rhs` by the inverse step."""
  if op == "+":
    return f"{rhs}-{b}={rhs - b}", str(rhs - b)
  if op == "-":
    return f"{rhs}+{b}={rhs + b}", str(rhs + b)
  if op == "*" and b and rhs % b == 0:
    return f"{rhs}/{b}={rhs // b}", str(rhs // b)
  raise ValueError(f"equation_work: cannot solve x {op} {b} = {rhs} in whole numbers.")


def _arithmetic(rng: synthetic.Rng, kind: str, max_digits: int) -> SkillExample:
  if kind == "multiply":
    # The corpus multiplies 2..99 by 2..9 (lines) and 2..9 bags by 2..12 items (problems).
    if rng.int(0, 1):
      a, m = max(2, min(99, synthetic.number(rng, max_digits))), rng.int(2, 9)
      problem = f"{a} * {m} = "
    else:
      m, a = rng.int(2, 9), rng.int(2, 12)
      problem = f"{m} * {a} = "
    return SkillExample(kind, problem, *multiply_work(a, m))
  a, b = synthetic.number(rng, max_digits), synthetic.number(rng, max_digits)
  if kind == "add":
    return SkillExample(kind, f"{a} + {b} = ", *add_work(a, b))
  a, b = max(a, b), min(a, b)
  return SkillExample(kind, f"{a} - {b} = ", *subtract_work(a, b))


def _sequence(rng: synthetic.Rng) -> SkillExample | None:
  rule = rng.choice(("arithmetic", "geometric", "fibonacci"))
  if rule == "arithmetic":
    start, step = rng.int(0, 50), rng.int(1, 12)
    terms = [start + i * step for i in range(8)]
  elif rule == "geometric":
    start, ratio = rng.int(1, 5), rng.int(2, 3)
    terms = [start * ratio ** i for i in range(6)]
  else:
    terms = [rng.int(1, 9), rng.int(1, 9)]
    for _ in range(5):
      terms.append(terms[-1] + terms[-2])
  shown = rng.int(3, len(terms) - 1)
  worked = sequence_work(terms[:shown])
  if worked is None or worked[1] != str(terms[shown]):
    return None  # Three terms that fit another rule too (1, 2, 3, 5): no unique answer.
  problem = "Sequence: " + "".join(f"{t}, " for t in terms[:shown])
  return SkillExample("sequence", problem, *worked)


def _equation(rng: synthetic.Rng) -> SkillExample:
  x, op = rng.int(1, 30), rng.choice(("+", "-", "*"))
  if op == "+":
    b = rng.int(1, 30)
    problem, rhs = f"If x + {b} = {x + b} then x = ", x + b
  elif op == "-":
    b = rng.int(1, x) if x > 1 else 1
    problem, rhs = f"If x - {b} = {x - b} then x = ", x - b
  else:
    b = rng.int(2, 9)
    problem, rhs = f"If {b} * x = {b * x} then x = ", b * x
  return SkillExample("equation", problem, *equation_work(op, b, rhs))


def skill_example(seed: int, index: int, *, kinds: tuple[str, ...] = SKILLS,
                  max_lines_before: int = 2,
                  max_digits: int = synthetic.SyntheticConfig.max_digits) -> SkillExample:
  """Example `index` of the stream seeded by `seed`: a uniformly drawn skill (sums and
  differences of up to `max_digits`-digit operands, as the corpus's), its problem after
  0..`max_lines_before` other corpus-style lines. A third of the arithmetic problems sit in a
  problem's `Solution:` line; a third of all problems (answers of 2+ digits) show the answer's
  first digits already, and the answer is then the rest (a document's position inside a
  number)."""
  rng = synthetic.Rng(f"rpt-skills/{seed}/{index}")
  while True:  # Ambiguous sequences are redrawn (from the same stream: still deterministic).
    kind = rng.choice(kinds)
    if kind == "sequence":
      example = _sequence(rng)
    elif kind == "equation":
      example = _equation(rng)
    else:
      example = _arithmetic(rng, kind, max_digits)
    if example is not None:
      break
  problem, answer = example.problem, example.answer
  if kind in ("add", "subtract", "multiply") and rng.int(0, 2) == 0:
    p, q = rng.int(2, 9), rng.int(2, 12)
    problem = ("Solution: " if kind == "multiply" else f"Solution: {p} * {q} = {p * q}. ") + problem
  if len(answer) > 1 and rng.int(0, 2) == 0:
    shown = rng.int(1, len(answer) - 1)
    problem, answer = problem + answer[:shown], answer[shown:]
  before = "".join(synthetic.corpus_line(rng) + "\n"
                   for _ in range(rng.int(0, max_lines_before)))
  return dataclasses.replace(example, problem=before + problem, answer=answer)


def skill_examples(seed: int, count: int, **kwargs) -> Iterator[SkillExample]:
  """`skill_example(seed, i)` for i in range(count)."""
  for i in range(count):
    yield skill_example(seed, i, **kwargs)
