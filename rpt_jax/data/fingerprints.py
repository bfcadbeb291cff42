"""Fingerprints of what made prepared data: the tokenizer (ids of a probe text) and the proxy's
exact weight bits (the same on any mesh, device or process count), for a records folder's
identity (`rpt_jax.data.prepare`)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_TOKENIZER_PROBE = ("The quick brown fox jumps over 13 lazy dogs: 4827 + 3596 = 8423. "
                    "é ü 数学 😀\n")


def tokenizer_identity(tokenizer) -> dict[str, Any]:
  """Class, special ids, vocab size and a fingerprint of how a fixed probe text encodes."""
  probe = [int(i) for i in tokenizer.encode(_TOKENIZER_PROBE)]
  return {
      "class": type(tokenizer).__name__,
      "vocab_size": int(tokenizer.vocab_size),
      "bos_id": getattr(tokenizer, "bos_id", None),
      "eos_id": getattr(tokenizer, "eos_id", None),
      "pad_id": getattr(tokenizer, "pad_id", None),
      "probe_sha256": hashlib.sha256(json.dumps(probe).encode()).hexdigest(),
  }


def _uint32_bits(x: jax.Array) -> jax.Array:
  """The bit pattern of every element as uint32 (1, 2 and 4-byte dtypes)."""
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(jnp.dtype(x.dtype).itemsize)
  if unsigned is None:
    raise ValueError(f"proxy parameter dtype {x.dtype} has no 1, 2 or 4-byte bit pattern.")
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _bit_checksums(x: jax.Array) -> jax.Array:
  """[2] uint32: the wrapping sums of x's bits and of its bits times an odd hash of the flat
  index. Integer sums are exact in any order, so every mesh and process count gives the same
  numbers; the index is built from per-axis iotas, so sharded parameters stay in place."""
  bits = _uint32_bits(x)
  index = jnp.zeros(x.shape, jnp.uint32)
  for axis in range(x.ndim):
    index = index * jnp.uint32(x.shape[axis]) + jax.lax.broadcasted_iota(
        jnp.uint32, x.shape, axis)
  weight = index * jnp.uint32(2654435761) + jnp.uint32(1)  # Knuth's multiplicative hash, odd
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weight, dtype=jnp.uint32)])


def proxy_identity(model: nnx.Module) -> dict[str, Any]:
  """Parameter count and a fingerprint of every parameter's path, shape, dtype and exact bits
  (`_bit_checksums`): the same for the same weights on any mesh, device or process count."""
  state = nnx.state(model, nnx.Param)
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  sums = jax.jit(lambda xs: [_bit_checksums(x) for x in xs])([leaf for _, leaf in leaves])
  # Replicated [2] results: every process reads its own copy.
  sums = [np.asarray(s.addressable_data(0)) for s in sums]
  digest = hashlib.sha256()
  for (path, leaf), pair in zip(leaves, sums):
    digest.update(f"{jax.tree_util.keystr(path)}|{leaf.shape}|{leaf.dtype}|"
                  f"{int(pair[0])}|{int(pair[1])}\n".encode())
  return {"class": type(model).__name__,
          "num_params": int(sum(int(np.prod(leaf.shape)) for _, leaf in leaves)),
          "params_sha256": digest.hexdigest()}
