"""Fixtures for the data-stage tests: a small tokenizer and a tiny proxy model."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pytest
from flax import nnx
import jax.numpy as jnp


class FakeTokenizer:
  """Greedy longest-match over a few multi-byte pieces, else single bytes (Tokenizer API)."""

  PIECES = (" = ", " + ", "Sequence: ", ", ", "then x", "The answer is ", "é")

  def __init__(self):
    self.pad_id, self.eos_id, self.bos_id = 0, 1, 2
    self.stop_ids = (1,)
    self._pieces = [p.encode() for p in self.PIECES]
    self.vocab_size = 3 + 256 + len(self._pieces)

  def _piece_bytes(self, i: int) -> bytes:
    if i < 3:
      return b""
    return bytes([i - 3]) if i < 259 else self._pieces[i - 259]

  def encode_with_byte_spans(self, text: str):
    data, ids, spans, pos = text.encode("utf-8"), [], [], 0
    while pos < len(data):
      for k, piece in enumerate(self._pieces):
        if data.startswith(piece, pos):
          ids.append(259 + k)
          spans.append((pos, pos + len(piece)))
          pos += len(piece)
          break
      else:
        ids.append(3 + data[pos])
        spans.append((pos, pos + 1))
        pos += 1
    return ids, spans

  def encode(self, text: str) -> list[int]:
    return self.encode_with_byte_spans(text)[0]

  def decode(self, ids: Sequence[int]) -> str:
    return b"".join(self._piece_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

  def apply_chat_template(self, user_message: str) -> str:
    return f"<u>{user_message}<a><think>\n"


class FakeProxy(nnx.Module):
  """Logits = E[token] @ W + cumulative-mean context term: depends on every earlier token."""

  def __init__(self, vocab: int, dim: int = 16, *, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.embed = nnx.Param(jnp.asarray(rng.normal(size=(vocab, dim)), jnp.float32))
    self.out = nnx.Param(jnp.asarray(rng.normal(size=(dim, vocab)) * 0.7, jnp.float32))

  def __call__(self, tokens_BL, positions_BL=None, attention_mask_BL=None):
    x_BLD = self.embed[...][tokens_BL]
    csum_BLD = jnp.cumsum(x_BLD, axis=1)
    mean_BLD = csum_BLD / jnp.arange(1, x_BLD.shape[1] + 1)[None, :, None]
    return (x_BLD + mean_BLD) @ self.out[...]


@pytest.fixture(scope="session")
def fake_tokenizer():
  return FakeTokenizer()


@pytest.fixture(scope="session")
def fake_proxy(fake_tokenizer):
  return FakeProxy(fake_tokenizer.vocab_size)
