"""The answer-position log-prob against a teacher-forced HF `transformers` forward (fp32), and
the host-side tails (thought cut at the last `</think>`) against hand-built ids."""

import jax
import numpy as np
import pytest
import torch

from rpt_jax import errors
from rpt_jax import mesh as mesh_lib
from rpt_jax.model import hf_io
from rpt_jax.rl import answer_logprob, teacher, train_state
from tests.model.conftest import build_hf_model

B, G, LP = 2, 4, 7


@pytest.fixture(scope="module")
def hf_policy(tmp_path_factory):
  model = build_hf_model("qwen2")
  path = tmp_path_factory.mktemp("policy")
  model.save_pretrained(path)
  return model, str(path)


def _tails(rng, vocab):
  """R = B*G tails of different thought lengths; truths of 1-3 tokens at varying offsets."""
  r, w, k = B * G, 12, 3
  tokens = np.zeros((r, w), np.int32)
  start = np.zeros(r, np.int32)
  mask = np.zeros((r, k), bool)
  for i in range(r):
    s, n_truth = int(rng.integers(0, 8)), int(rng.integers(1, k + 1))
    tokens[i, :s + n_truth] = rng.integers(3, vocab, s + n_truth)
    start[i], mask[i, :n_truth] = s, True
  return answer_logprob.AnswerTails(tokens, start, mask, start.copy())


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_answer_logprob_matches_hf(hf_policy, shared_prefix):
  hf, path = hf_policy
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=1, fsdp=4, tensor=2), jax.devices())
  model, _ = hf_io.load_hf(path, mesh=mesh, compute_dtype="float32")
  graphdef, params = train_state.split_params(model)
  rng = np.random.default_rng(0)
  lengths = np.array([7, 3], np.int32)
  prompts = rng.integers(3, 320, (B, LP)).astype(np.int32)
  prompts[np.arange(LP)[None] >= lengths[:, None]] = 0
  tails = _tails(rng, 320)
  scorer = answer_logprob.AnswerScorer(graphdef, mesh=mesh, shared_prefix=shared_prefix)
  got = np.asarray(scorer(params, prompts, lengths, tails, num_generations=G))
  want = []
  for i in range(B * G):
    b = i // G
    n_truth = int(tails.truth_mask[i].sum())
    end = int(tails.truth_start[i]) + n_truth
    seq = np.concatenate([prompts[b, :lengths[b]], tails.tokens[i, :end]])
    with torch.no_grad():
      logits = hf(torch.tensor(seq[None], dtype=torch.long)).logits[0].double()
    logsm = torch.log_softmax(logits, -1).numpy()
    first = lengths[b] + int(tails.truth_start[i])  # index of the first truth token in seq
    want.append(sum(logsm[p - 1, seq[p]] for p in range(first, first + n_truth)))
  np.testing.assert_allclose(got, np.array(want), atol=1e-4, rtol=1e-4)


class _ByteTokenizer:
  """One token per byte (id = byte + 3): token_bytes and encode are exact inverses."""

  def encode(self, text):
    return [b + 3 for b in text.encode()]

  def token_bytes(self, token_id):
    if token_id == 1:  # like SentencePiece's <unk> without byte fallback
      raise errors.InputError("no bytes")
    return bytes([token_id - 3])


def test_build_tails_cuts_the_thought_at_the_last_marker():
  tok = _ByteTokenizer()
  texts = ["ab</think>x</think>\n\n\\boxed{c}", "no marker", ""]
  n = max(len(t) for t in texts) + 2
  tokens = np.zeros((3, n), np.int32)
  lengths = np.zeros(3, np.int32)
  for i, t in enumerate(texts):
    ids = tok.encode(t)[:1] + [1] * (i == 0) + tok.encode(t)[1:] + [2]  # an <unk>; a stop
    tokens[i, :len(ids)], lengths[i] = ids, len(ids)
  done = np.ones(3, bool)
  tails = answer_logprob.build_tails(tok, tokens, lengths, done, [b" the", b"q", b"z"],
                                     num_truth_tokens=2)
  closed = tok.encode(answer_logprob.OPENING_AFTER_MARKER)
  unclosed = tok.encode(answer_logprob.OPENING_UNCLOSED)
  want = [tok.encode("a") + [1] + tok.encode("b</think>x") + closed + tok.encode(" t"),
          tok.encode("no marker") + unclosed + tok.encode("q"),
          unclosed + tok.encode("z")]
  np.testing.assert_array_equal(tails.thought_lengths, [12, 9, 0])
  for i, ids in enumerate(want):
    assert tails.tokens[i, :len(ids)].tolist() == ids
    assert not tails.tokens[i, len(ids):].any()
  np.testing.assert_array_equal(tails.truth_start, [len(w) - m for w, m in zip(want, [2, 1, 1])])
  np.testing.assert_array_equal(tails.truth_mask, [[1, 1], [1, 0], [1, 0]])
  empty = answer_logprob.build_tails(tok, tokens, lengths, done, [b"q"] * 3, thoughts=False)
  assert empty.tokens[0, :len(unclosed) + 1].tolist() == unclosed + tok.encode("q")


def test_reference_from_an_hf_folder(hf_policy, tmp_path):
  _, path = hf_policy
  policy, config = hf_io.load_hf(path)
  assert teacher.reference_source(path, 0.0, config) is None  # no KL term, no copy
  assert teacher.reference_source("", 0.1, config) is True  # the starting policy
  ref = teacher.reference_source(path, 0.1, config)
  jax.tree.map(np.testing.assert_array_equal, ref, train_state.split_params(policy)[1])
  other = build_hf_model("qwen2", hidden_size=32)
  other.save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="hidden_size=32 differs from the policy's 64"):
    teacher.reference_source(str(tmp_path), 0.1, config)
