"""Tests for rpt_jax/rl/prompts.py: templates, prompt ids, answer extraction (incl. adversarial)."""

import random
import time

import pytest

from rpt_jax.rl import prompts
from rpt_jax.rl.prompts import (build_prompt_ids, extract_prediction, format_prompt,
                                format_reasoning_example, get_template, register_template)

# Typed from PAPER.md's v0 block (lines joined with spaces, newlines kept before the headers).
PAPER_V0 = (r"Complete the given text under '### Context' by predicting the next token, and wrap "
            r"it in \boxed{}. Please reason step by step to find the most probable next token as "
            r"the final answer, and enclose it in \boxed{} (note: the token may begin with a "
            r"space, e.g., \boxed{ para} or \boxed{ =}; do not use \text{})." "\n"
            "### Context\n"
            "{context}")


class FakeTokenizer:
  """Chat template in the R1-Distill style; one id per character."""

  def apply_chat_template(self, user_message):
    return "<BOS><|User|>" + user_message + "<|Assistant|><think>\n"

  def encode(self, text):
    return [ord(c) for c in text]


def test_v0_is_the_papers_text():
  assert get_template("v0") == PAPER_V0
  assert "v0" in prompts.TEMPLATES and "v0_short" in prompts.TEMPLATES


def test_format_prompt_inserts_context_verbatim():
  context = "Let $x^{2}$ be {context} and  "  # braces, a literal placeholder, trailing spaces
  out = format_prompt(context)
  assert out == PAPER_V0[:-len("{context}")] + context
  assert out.endswith("### Context\nLet $x^{2}$ be {context} and  ")
  assert format_prompt("", "v0_short").endswith("### Context\n")


def test_unknown_template_lists_registered_names():
  with pytest.raises(ValueError, match=r"unknown prompt template 'v9'.*'v0'.*'v0_short'"):
    format_prompt("x", "v9")


def test_register_template_validates_and_is_usable():
  with pytest.raises(ValueError, match="exactly once"):
    register_template("bad", "no placeholder")
  with pytest.raises(ValueError, match="exactly once"):
    register_template("bad", "{context} twice {context}")
  with pytest.raises(ValueError, match="already registered"):
    register_template("v0", "other {context}")
  with pytest.raises(TypeError):
    prompts.TEMPLATES["x"] = "{context}"  # read-only view
  try:
    register_template("test_only", "Next token after: {context}!")
    assert format_prompt("abc", "test_only") == "Next token after: abc!"
    register_template("test_only", "Again {context}", overwrite=True)
    assert format_prompt("abc", "test_only") == "Again abc"
  finally:
    prompts._TEMPLATES.pop("test_only", None)
  assert "test_only" not in prompts.TEMPLATES


def test_build_prompt_ids_wraps_in_chat_template():
  ids = build_prompt_ids("The cat", FakeTokenizer())
  expected_text = "<BOS><|User|>" + PAPER_V0.replace("{context}", "The cat") + (
      "<|Assistant|><think>\n")
  assert ids == [ord(c) for c in expected_text]


# (response, expected prediction)
EXTRACTION_CASES = [
    ("reasoning\n</think>\n\n\\boxed{ para}", " para"),            # leading space kept
    ("</think>\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),              # nested braces
    ("</think>\\boxed{a{b{c}d}e}", "a{b{c}d}e"),
    ("no think marker \\boxed{x}", None),                           # no </think>
    ("\\boxed{x}</think> no box after", None),                      # box only before </think>
    ("\\boxed{x}</think>\\boxed{y}", "y"),
    ("</think>\\boxed{a} then \\boxed{b} finally \\boxed{c}", "c"),  # last wins
    ("</think>\\boxed{a}\\boxed{b", "a"),                           # unclosed last -> last closed
    ("</think>\\boxed{a}\\boxed{\\frac{1}{2}", "a"),
    ("</think>\\boxed{b", None),                                    # nothing closed
    ("</think>\\boxed{}", ""),                                      # empty box -> ""
    ("</think>\\boxed{x}, so the answer is x.", "x"),               # trailing text
    ("</think>\\boxed{x}}}", "x"),                                  # stray closers after
    ("</think>}}{\\boxed{x}", "x"),                                 # stray braces before
    ("a</think>\\boxed{1}b</think>\\boxed{2}c</think>", None),      # several </think>: last
    ("a</think>\\boxed{1}b</think>\\boxed{2}", "2"),
    ("</think>\\boxed{a\\boxed{b}}", "b"),                          # last by start position
    ("</think>\\boxed{x \\boxed{y}", "y"),
    ("</think>\\boxed {x}", None),                                  # only '\boxed{' counts
    ("</think>\\boxed{é世}", "é世"),                                # multi-byte content
    ("</think>世\\boxed{界{}}", "界{}"),
    ("</think>\\boxed{\\text{ para}}", "\\text{ para}"),            # verbatim, no unwrapping
    ("</think>\\boxed{\n}", "\n"),
    ("", None),
]


@pytest.mark.parametrize("response,expected", EXTRACTION_CASES)
def test_extract_prediction_table(response, expected):
  assert extract_prediction(response) == expected


def _reference_extract(response):
  """Slow, obvious reference: try boxes from the last start backwards, count braces forward."""
  k = response.rfind("</think>")
  if k < 0:
    return None
  tail = response[k + len("</think>"):]
  starts = [i for i in range(len(tail)) if tail.startswith("\\boxed{", i)]
  for s in reversed(starts):
    depth = 0
    for e in range(s + len("\\boxed{") - 1, len(tail)):
      depth += {"{": 1, "}": -1}.get(tail[e], 0)
      if depth == 0:
        return tail[s + len("\\boxed{"):e]
  return None


def test_extract_prediction_matches_reference_on_random_strings():
  rng = random.Random(0)
  pieces = ["\\boxed{", "{", "}", "</think>", "a", " ", "é", "世", "\\", "boxed", "x}"]
  for _ in range(3000):
    s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
    assert extract_prediction(s) == _reference_extract(s), s


def test_extract_prediction_keeps_lone_surrogates():
  assert extract_prediction("</think>\\boxed{\udce4x}") == "\udce4x"


M = 1 << 20
ADVERSARIAL = {
    "1MB of \\boxed{": "</think>" + "\\boxed{" * (M // 7),
    "1MB of \\boxed{ then }": "</think>" + "\\boxed{" * (M // 7) + "}",
    "1MB of {": "</think>\\boxed{" + "{" * M,
    "1MB of }": "</think>\\boxed{" + "}" * M,
    "1MB of </think>": "</think>" * (M // 8),
    "1MB of \\boxed{}": "</think>" + "\\boxed{}" * (M // 8),
    "1MB of boxes before </think>": "\\boxed{x}" * (M // 9) + "</think>",
    "nested 1e5 braces": "</think>\\boxed{" + "{" * 100_000 + "x" + "}" * 100_001,
    "nested 1e5 boxes": "</think>" + "\\boxed{" * 100_000 + "x" + "}" * 100_000,
    "1M CJK chars in a box": "</think>\\boxed{" + "世" * M + "}",
}
ADVERSARIAL_EXPECTED = {
    "1MB of \\boxed{": None,
    "1MB of \\boxed{ then }": "",
    "1MB of {": None,
    "1MB of }": "",
    "1MB of </think>": None,
    "1MB of \\boxed{}": "",
    "1MB of boxes before </think>": None,
    "nested 1e5 braces": "{" * 100_000 + "x" + "}" * 100_000,
    "nested 1e5 boxes": "x",
    "1M CJK chars in a box": "世" * M,
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_extract_prediction_is_fast_on_adversarial_input(name):
  response = ADVERSARIAL[name]
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    out = extract_prediction(response)
    times.append(time.perf_counter() - t0)
  assert out == ADVERSARIAL_EXPECTED[name]
  print(f"{name}: best {min(times) * 1e3:.1f} ms")  # measured ~0-15 ms on a 2-core CPU
  assert min(times) < 0.5, f"{name} took {min(times):.3f}s"


@pytest.mark.parametrize("answer", [" para", "\\frac{1}{2}", "世", " =", "x\ny", "a{}b", "{}"])
def test_reasoning_example_round_trips(answer):
  user, response = format_reasoning_example("The context", "I think... {", answer)
  assert user == format_prompt("The context")
  assert response == "I think... {\n</think>\n\n\\boxed{" + answer + "}"
  assert extract_prediction(response) == answer


@pytest.mark.parametrize("answer", ["}", "{", "}{", "a}", "\\boxed{x}", "</think>"])
def test_reasoning_example_rejects_unrepresentable_answers(answer):
  with pytest.raises(ValueError, match="round-trip"):
    format_reasoning_example("ctx", "thought", answer)


def test_reasoning_example_rejects_think_end_in_thought():
  with pytest.raises(ValueError, match="</think>"):
    format_reasoning_example("ctx", "a </think> b", "x")


class _ByteTokenizer:
  """ids are byte values + 10; ids 0..9 are specials (decoded to nothing)."""

  def decode(self, ids):
    return bytes(i - 10 for i in ids if i >= 10).decode("utf-8", "replace")


def test_response_texts_drop_only_the_stop_token_that_ended_a_row():
  tok = _ByteTokenizer()
  a, b = [ord(c) + 10 for c in "ab"]
  tokens = [[a, b, 1, 0], [a, b, 1, 0], [a, b, a, b]]
  # Row 0 stopped on id 1 (done); row 1 ran out of budget right after sampling id 1 as an
  # ordinary token under another stop list (not done): its text keeps everything it generated;
  # row 2 hit the budget.
  texts = prompts.response_texts(tok, tokens, [3, 3, 4], [True, False, False])
  assert texts == ["ab", "ab", "abab"]
  assert prompts.response_texts(tok, [[1, 0]], [1], [True]) == [""]


def test_fitted_prompt_ids_drop_context_from_the_start_until_it_fits():
  class Tok(_ByteTokenizer):
    def encode(self, text):
      return [ord(c) + 10 for c in text]

    def apply_chat_template(self, text):
      return text

  tok = Tok()
  context = [ord(c) + 10 for c in "0123456789"]
  full, cut = prompts.fitted_prompt_ids(context, tok, "v0_short", 10 ** 6)
  assert not cut and tok.decode(full).endswith("0123456789")
  limit = len(full) - 4
  ids, cut = prompts.fitted_prompt_ids(context, tok, "v0_short", limit)
  assert cut and len(ids) <= limit and tok.decode(ids).endswith("456789")
  with pytest.raises(ValueError, match="raise data.prompt_buckets"):
    prompts.fitted_prompt_ids(context, tok, "v0_short", 5)
