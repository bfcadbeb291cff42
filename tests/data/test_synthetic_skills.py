"""The worked skill examples: every step and answer checked against Python arithmetic."""
import re

import pytest

from rpt_jax.data import skills, synthetic

_STEP_ADD = re.compile(r"^(\d)\+(\d)\+(\d)=(\d+):(\d+)$")
_STEP_SUB = re.compile(r"^(\d+)-(\d)-(\d)=(\d):(\d+)$")
_STEP_MUL = re.compile(r"^(\d)\*(\d)\+(\d+)=(\d+):(\d+)$")


def _units_first(n: int, width: int) -> list[int]:
  return [(n // 10**i) % 10 for i in range(width)]


def _check_digit_chain(a: int, b: int, op: str, thought: str) -> None:
  """Re-derives each step from a, b by hand: the digits it reads, its carry/borrow, its value,
  and the result so far after its `:` (the true result's last i+1 digits; all of it at the last
  step, leading zeros kept)."""
  steps = thought.split(" ")
  want = {"+": a + b, "-": a - b, "*": a * b}[op]
  for i, step in enumerate(steps):
    so_far = step.rsplit(":", 1)[1]
    if i < len(steps) - 1:
      assert so_far == str(want % 10 ** (i + 1)).zfill(i + 1), (a, op, b, step)
    else:
      assert int(so_far) == want and len(so_far) >= i + 1, (a, op, b, step)
  if op == "+":
    width = max(len(str(a)), len(str(b)))
    assert len(steps) == width
    carry = 0
    for x, y, step in zip(_units_first(a, width), _units_first(b, width), steps):
      m = _STEP_ADD.match(step)
      assert m, step
      assert [int(g) for g in m.groups()[:4]] == [x, y, carry, x + y + carry]
      carry = (x + y + carry) // 10
  elif op == "-":
    width = len(str(a))
    assert len(steps) == width
    borrow = 0
    for x, y, step in zip(_units_first(a, width), _units_first(b, width), steps):
      m = _STEP_SUB.match(step)
      assert m, step
      top, yy, c, d = (int(g) for g in m.groups()[:4])
      assert (yy, c) == (y, borrow)
      assert top == (x + 10 if x - borrow < y else x) and d == top - y - borrow and 0 <= d <= 9
      borrow = int(top > x)
    assert borrow == 0  # a >= b: nothing left to borrow from
  else:
    carry = 0
    digits = _units_first(a, len(str(a)))
    assert len(steps) == len(digits)
    for x, step in zip(digits, steps):
      m = _STEP_MUL.match(step)
      assert m, step
      assert [int(g) for g in m.groups()[:4]] == [x, b, carry, x * b + carry]
      carry = (x * b + carry) // 10


@pytest.mark.parametrize("op", ["+", "-", "*"])
def test_digit_skills_match_python_arithmetic_exhaustively_small_and_sampled_large(op):
  rng = synthetic.Rng("test-skills")
  pairs = [(a, b) for a in range(0, 120) for b in range(0, 120)]
  pairs += [(rng.int(0, 99999), rng.int(0, 99999)) for _ in range(3000)]
  for a, b in pairs:
    if op == "+":
      thought, answer = skills.add_work(a, b)
      want = a + b
    elif op == "-":
      a, b = max(a, b), min(a, b)
      thought, answer = skills.subtract_work(a, b)
      want = a - b
    else:
      b = b % 10
      thought, answer = skills.multiply_work(a, b)
      want = a * b
    assert answer == str(want), (a, op, b, thought)
    _check_digit_chain(a, b, op, thought)


def _true_statements(thought: str) -> int:
  """Checks every `p op q = r` in a thought with Python; returns how many there were."""
  found = re.findall(r"(-?\d+)([-+*/])(\d+)=(-?\d+)", thought)
  for p, op, q, r in found:
    p, q, r = int(p), int(q), int(r)
    want = {"+": p + q, "-": p - q, "*": p * q, "/": p // q if q and p % q == 0 else None}[op]
    assert want == r, f"{p}{op}{q}={r} in {thought!r}"
  return len(found)


def test_sequence_skill_finds_the_generating_rule():
  checked = 0
  for start in range(0, 20):
    for step in range(1, 13):
      terms = [start + i * step for i in range(8)]
      for shown in range(3, 8):
        thought, answer = skills.sequence_work(terms[:shown])
        assert answer == str(terms[shown]) and f"add {step}:" in thought
        checked += _true_statements(thought)
  for start in range(1, 6):
    for ratio in (2, 3):
      terms = [start * ratio**i for i in range(6)]
      for shown in range(3, 6):
        thought, answer = skills.sequence_work(terms[:shown])
        assert answer == str(terms[shown]) and f"times {ratio}:" in thought
        checked += _true_statements(thought)
  assert checked > 1000
  thought, answer = skills.sequence_work([3, 4, 7, 11])
  assert answer == "18" and "sum:" in thought
  assert skills.sequence_work([1, 5, 2]) is None


def test_equation_skill_solves_the_equation():
  for x in range(1, 31):
    for b in range(1, 31):
      for op, rhs in (("+", x + b), ("-", x - b), ("*", b * x)):
        if (op == "*" and b > 9) or (op == "-" and b > x):  # the corpus's equations
          continue
        thought, answer = skills.equation_work(op, b, rhs)
        assert answer == str(x)
        assert _true_statements(thought) == 1


def test_generated_examples_are_right_and_thoughts_grow_with_the_work():
  lengths, shown = {}, 0
  for ex in skills.skill_examples(seed=0, count=4000):
    line = ex.problem.rsplit("\n", 1)[-1]
    # The problem may show the answer's first digits: the true result is them + the answer.
    m = re.search(r"(\d*)$", line)
    written, line = m.group(1), line[:m.start()]
    result = written + ex.answer
    assert ex.answer and result == str(int(result))
    shown += bool(written)
    if ex.kind == "sequence":
      assert _true_statements(ex.thought) >= 3
      terms = [int(t) for t in line[len("Sequence: "):].split(", ") if t]
      rule = skills.sequence_rule(terms)
      assert rule is not None
      assert int(result) == {"add": terms[-1] + rule[1], "times": terms[-1] * rule[1],
                             "sum": terms[-1] + terms[-2]}[rule[0]]
    elif ex.kind == "equation":
      assert _true_statements(ex.thought) == 1
      m = re.match(r"If (?:x ([+-]) (\d+)|(\d+) \* x) = (\d+) then x = $", line)
      x, rhs = int(result), int(m.group(4))
      assert (x + int(m.group(2)) if m.group(1) == "+" else x - int(m.group(2))
              if m.group(1) == "-" else int(m.group(3)) * x) == rhs
    else:
      m = re.fullmatch(r"(?:Solution: (?:(\d+) \* (\d+) = (\d+)\. )?)?(\d+) ([-+*]) (\d+) = ",
                       line)
      assert m, line
      if m.group(1):  # the Solution line's first product, true too
        assert int(m.group(1)) * int(m.group(2)) == int(m.group(3))
      a, op, b = int(m.group(4)), m.group(5), int(m.group(6))
      assert int(result) == {"+": a + b, "-": a - b, "*": a * b}[op]
      if op == "*" and _STEP_MUL.match(ex.thought.split(" ")[0]).group(2) != str(b):
        a, b = b, a  # "bags * items": the work runs over the second factor's digits
      _check_digit_chain(a, b, op, ex.thought)
    assert "</think>" not in ex.thought and "{" not in ex.answer
    lengths.setdefault(ex.kind, set()).add(len(ex.thought.split(" ")))
  assert set(lengths) == set(skills.SKILLS)
  assert 500 < shown < 2000  # about a third of the multi-digit answers start inside the number
  assert len(lengths["add"]) >= 3 and len(lengths["multiply"]) >= 2  # 1..4 digit steps
  assert list(skills.skill_examples(0, 50)) == list(skills.skill_examples(0, 50))
  assert list(skills.skill_examples(0, 50)) != list(skills.skill_examples(1, 50))


@pytest.mark.parametrize("prefix,want", [
    ("", ("line start", False)), ("4827 + 3596", ("arithmetic", False)),
    ("4827 + 3596 = 84", ("arithmetic", True)), ("Sequence: 3, 7,", ("sequence", False)),
    ("Sequence: 3, 7, 11, ", ("sequence", True)), ("If x + 7 = 12", ("algebra", False)),
    ("If x + 7 = 12 then x = ", ("algebra", True)), ("Problem: Ana has", ("problem", False)),
    ("Solution: 3 * 6 = ", ("problem", True))])
def test_position_kind(prefix, want):
  assert synthetic.position_kind(prefix) == want
