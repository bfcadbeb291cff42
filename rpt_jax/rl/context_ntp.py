"""RMT's next-token loss on the context tokens (arXiv 2509.24375: selective RL + full NTP).

The positions a batch reasons about are the ones its records selected; every token of a
record's context came before it and was not selected there. `rl.ntp_coef > 0` adds
ntp_coef * (mean next-token NLL over those context tokens) to the loss, computed from the
hidden states the train step's shared-prefix pass already has for each prompt (no extra
forward). Which prompt tokens are context: those that differ from the same template filled with
an empty context, counted from both ends (`context_mask`), so the instruction and chat markers
are not trained.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rpt_jax.rl import loss as loss_lib
from rpt_jax.rl import prompts


def context_mask(prompt_tokens_BL: np.ndarray, prompt_lengths_B: np.ndarray,
                 empty_prompt_ids: list[int]) -> np.ndarray:
  """int32 [B, L]: 1 on the context tokens of each prompt. `empty_prompt_ids`: the prompt of an
  empty context (`prompts.build_prompt_ids('', tokenizer, template)`); the context is what lies
  between the longest common prefix and the longest common suffix with it."""
  empty = np.asarray(empty_prompt_ids)
  out = np.zeros(np.shape(prompt_tokens_BL), np.int32)
  for b, (row, n) in enumerate(zip(prompt_tokens_BL, prompt_lengths_B)):
    row = np.asarray(row[:int(n)])
    m = min(len(row), len(empty))
    head = int(np.argmin(np.append(row[:m] == empty[:m], False)))
    tail_room = min(len(row) - head, len(empty) - head)
    same_end = np.append(row[::-1][:tail_room] == empty[::-1][:tail_room], False)
    tail = int(np.argmin(same_end))
    out[b, head:len(row) - tail] = 1
  return out


def empty_prompt_ids(tokenizer, template: str) -> list[int]:
  return prompts.build_prompt_ids("", tokenizer, template)


def ntp_sums(model, prompt_hidden_BLD: jax.Array, prompt_tokens_BL: jax.Array,
             context_mask_BL: jax.Array, *, mesh=None, rules: Any = None,
             chunk_size: int = 256) -> tuple[jax.Array, jax.Array]:
  """(sum of -log p(context token | prompt before it), number of such tokens), fp32; token i is
  predicted by hidden state i - 1 (temperature 1). The first prompt token is never a target."""
  logp_BL1, _ = loss_lib.token_logprobs_and_entropy(
      prompt_hidden_BLD[:, :-1], model.unembedding().astype(prompt_hidden_BLD.dtype),
      prompt_tokens_BL[:, 1:].astype(jnp.int32), temperature=1.0, chunk_size=chunk_size,
      mesh=mesh, rules=rules)
  mask_BL1 = context_mask_BL[:, 1:].astype(bool)
  return -jnp.where(mask_BL1, logp_BL1, 0.0).sum(), mask_BL1.sum().astype(jnp.float32)
