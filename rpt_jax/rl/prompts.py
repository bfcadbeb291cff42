"""Prompt templates for next-token reasoning, and extraction of the policy's answer.

This module owns the text contract between a document position and the policy:
- the user message that asks for the next token (`format_prompt`, templates registered by name),
- the prompt token ids after the policy's chat template (`build_prompt_ids`),
- the response format the reward reads (`extract_prediction`: the last `\\boxed{...}` after the
  last `</think>`), and its inverse for supervised warm-up data (`format_reasoning_example`).

Templates are plain strings with exactly one `{context}` placeholder. They are filled with
`str.replace`, never `str.format`, because the paper's text itself contains `\\boxed{}` braces.
The context is inserted verbatim (no stripping): a trailing space in the context decides whether
the next token starts with a space.
"""

from __future__ import annotations

import types
from typing import Mapping, Protocol, Sequence

import numpy as np

PLACEHOLDER = "{context}"
THINK_END = "</think>"
BOXED_OPEN = "\\boxed{"

# The paper's v0 template (Dong et al. 2025, Section 3.3). Wording is the paper's; the line
# layout is ours (the paper's line breaks are not specified), as written in PAPER.md.
_V0 = (
    "Complete the given text under '### Context' by predicting the next token, and wrap it in "
    "\\boxed{}. Please reason step by step to find the most probable next token as the final "
    "answer, and enclose it in \\boxed{} (note: the token may begin with a space, e.g., "
    "\\boxed{ para} or \\boxed{ =}; do not use \\text{}).\n"
    "### Context\n"
    "{context}"
)

# NOT from the paper: a shorter project variant for tiny models and short prompt budgets
# (the paper's six other variants are not published verbatim, so none is reproduced here).
_V0_SHORT = (
    "Predict the next token of the text under '### Context'. Think step by step, then give "
    "the token in \\boxed{} (it may begin with a space, e.g. \\boxed{ para}).\n"
    "### Context\n"
    "{context}"
)

_TEMPLATES: dict[str, str] = {}
# Read-only live view: add templates through `register_template`, which validates them.
TEMPLATES: Mapping[str, str] = types.MappingProxyType(_TEMPLATES)


class ChatTokenizer(Protocol):
  """The two tokenizer methods this module needs (see rpt_jax/tokenizer.py)."""

  def apply_chat_template(self, user_message: str) -> str:
    ...

  def encode(self, text: str) -> list[int]:
    ...


def register_template(name: str, text: str, *, overwrite: bool = False) -> None:
  """Registers prompt template `text` under `name`.

  Args:
    name: the config string that selects this template.
    text: the user-message text with exactly one `{context}` placeholder.
    overwrite: allow replacing an existing template of the same name.

  Raises:
    ValueError: empty name, a name already taken (without `overwrite`), or a text that does
      not hold exactly one `{context}`.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"template name must be a non-empty string, got {name!r}")
  count = text.count(PLACEHOLDER)
  if count != 1:
    raise ValueError(
        f"template {name!r} must contain the placeholder {PLACEHOLDER!r} exactly once, found "
        f"{count}; put it where the document prefix goes")
  if name in _TEMPLATES and not overwrite and _TEMPLATES[name] != text:
    raise ValueError(
        f"template {name!r} is already registered; pick another name or pass overwrite=True")
  _TEMPLATES[name] = text


def get_template(name: str) -> str:
  """Returns the template text registered as `name` (holds one `{context}`)."""
  try:
    return _TEMPLATES[name]
  except KeyError:
    raise ValueError(
        f"unknown prompt template {name!r}; registered templates: {sorted(_TEMPLATES)} "
        "(add one with rpt_jax.rl.prompts.register_template)") from None


register_template("v0", _V0)
register_template("v0_short", _V0_SHORT)


def format_prompt(context_text: str, template: str = "v0") -> str:
  """Returns the user message: template `template` with `context_text` inserted verbatim."""
  head, tail = get_template(template).split(PLACEHOLDER)
  # Concatenation, not replace/format: a context that itself contains '{context}' stays literal.
  return head + context_text + tail


def build_prompt_ids(context_text: str, tokenizer: ChatTokenizer,
                     template: str = "v0") -> list[int]:
  """Token ids of the full prompt: the chat-wrapped user message, assistant turn opened.

  Equal to `tokenizer.encode(tokenizer.apply_chat_template(format_prompt(context_text,
  template)))`; the chat template (not this module) adds BOS and the opening `<think>`.
  """
  return list(tokenizer.encode(tokenizer.apply_chat_template(
      format_prompt(context_text, template))))


def fitted_prompt_ids(context_ids: Sequence[int], tokenizer: ChatTokenizer, template: str,
                      max_tokens: int) -> tuple[list[int], bool]:
  """(prompt ids, truncated): the prompt of a context, context tokens dropped from its START
  until the whole prompt fits `max_tokens` (the longest prompt bucket)."""
  context = list(context_ids)
  ids = build_prompt_ids(tokenizer.decode(context), tokenizer, template)
  truncated = False
  while len(ids) > max_tokens:
    if not context:
      raise ValueError(f"prompt template {template!r} alone takes {len(ids)} tokens, more than "
                       f"the largest prompt bucket {max_tokens}; raise data.prompt_buckets.")
    # Drop at least the overflow (decode/encode may not be 1:1: loop until it fits).
    context = context[len(ids) - max_tokens:]
    ids = build_prompt_ids(tokenizer.decode(context), tokenizer, template)
    truncated = True
  return ids, truncated


def response_texts(tokenizer, tokens_RN, lengths_R, done_R) -> list[str]:
  """The text of each sampled response: its `length` tokens, less the stop token that ended it
  (`done`: the row stopped on a stop id, which is not part of the answer's text)."""
  return [tokenizer.decode([int(t) for t in row[:max(int(n) - int(bool(d)), 0)]])
          for row, n, d in zip(tokens_RN, lengths_R, done_R)]


def format_response(thought: str, answer: str) -> str:
  """The assistant text after the opened `<think>`: thought, `</think>`, boxed answer."""
  return f"{thought}\n{THINK_END}\n\n{BOXED_OPEN}{answer}}}"


def format_reasoning_example(context_text: str, thought: str, answer: str,
                             template: str = "v0") -> tuple[str, str]:
  """A (user message, response) pair in the answer format, for supervised warm-up.

  The response continues the assistant turn opened by the chat template (which ends with
  `<think>`), so it is `"{thought}\\n</think>\\n\\n\\boxed{answer}"`.

  Raises:
    ValueError: if `extract_prediction(response)` would not give `answer` back, i.e. the
      thought holds `</think>`, or the answer holds `</think>`, a `\\boxed{`, or braces that
      are not balanced (e.g. a lone `}` token cannot be stated in this format).
  """
  if THINK_END in thought:
    raise ValueError(f"thought must not contain {THINK_END!r}: the answer would be lost")
  response = format_response(thought, answer)
  if extract_prediction(response) != answer:
    raise ValueError(
        f"answer {answer!r} does not round-trip through \\boxed{{...}} extraction (it holds "
        f"{THINK_END!r}, '\\boxed{{', or unbalanced braces); skip this example")
  return format_prompt(context_text, template), response


_OPEN, _CLOSE = ord("{"), ord("}")
_BOXED_PATTERN = np.frombuffer(BOXED_OPEN.encode("ascii"), dtype=np.uint8)


def extract_prediction(response: str) -> str | None:
  """The full text inside the last closed `\\boxed{...}` after the last `</think>`.

  Rules (these define "the prediction" for every reward):
  - No `</think>` in the response: None (the policy never finished thinking).
  - Only text after the LAST `</think>` is searched; no `\\boxed{` there: None.
  - Braces nest: the content runs to the `}` that balances the box's `{`, so
    `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`. A `}` with no open `{` after the box start
    cannot occur inside its content (the first such `}` closes the box).
  - "Last" is by start position (as in the usual MATH-style `last_boxed_only_string`), so in
    `\\boxed{a\\boxed{b}}` the inner box wins and gives `b`.
  - A box whose braces never close (truncated response) is skipped: the last CLOSED box after
    `</think>` is used, else None.
  - An empty box `\\boxed{}` gives "" (a formatted but empty answer, distinct from None; it
    scores 0 under every reward, since 0 is never a token boundary).
  - The content is returned verbatim: no stripping (a leading space is part of the token), no
    `\\text{}` unwrapping.

  Runs in linear time with vectorised numpy (no regex, no recursion, no per-character Python
  loop), so adversarial responses of megabytes finish in milliseconds.
  """
  think_at = response.rfind(THINK_END)
  if think_at < 0:
    return None
  tail = response[think_at + len(THINK_END):]
  first_box = tail.find(BOXED_OPEN)
  if first_box < 0:
    return None
  # Scan bytes: '{', '}' and '\boxed{' are ASCII, and UTF-8 never puts an ASCII byte inside a
  # multi-byte character, so byte positions of these marks are exact. surrogatepass keeps lone
  # surrogates (possible in Python str) round-tripping instead of raising.
  data = tail[first_box:].encode("utf-8", "surrogatepass")
  bytes_N = np.frombuffer(data, dtype=np.uint8)
  # Work on the braces only (B of them): ordinary text costs two vectorised compares.
  brace_at_B = np.flatnonzero((bytes_N == _OPEN) | (bytes_N == _CLOSE))
  is_open_B = bytes_N[brace_at_B] == _OPEN
  depth_B = np.cumsum(np.where(is_open_B, 1, -1), dtype=np.int64)
  # min_after_B[i] = min(depth_B[i+1:]); a sentinel above any depth where nothing follows.
  min_after_B = np.empty_like(depth_B)
  min_after_B[-1] = np.iinfo(np.int64).max
  min_after_B[:-1] = np.minimum.accumulate(depth_B[::-1])[::-1][1:]
  # Open braces preceded by '\boxed' are box openers (data starts with one, so index >= 6).
  k = _BOXED_PATTERN.shape[0] - 1
  box_B = np.flatnonzero(is_open_B & (brace_at_B >= k))
  for j in range(k - 1, -1, -1):  # from 'd' backwards, shrinking the candidates each time
    box_B = box_B[bytes_N[brace_at_B[box_B] - k + j] == _BOXED_PATTERN[j]]
  # A box whose '{' leaves depth d is closed iff the depth later drops below d; its '}' is the
  # first such brace, whatever came before the box.
  closed = min_after_B[box_B] < depth_B[box_B]
  if not closed.any():
    return None
  i = int(box_B[np.flatnonzero(closed)[-1]])
  j = i + 1 + int(np.argmax(depth_B[i + 1:] < depth_B[i]))
  return data[int(brace_at_B[i]) + 1:int(brace_at_B[j])].decode("utf-8", "surrogatepass")
