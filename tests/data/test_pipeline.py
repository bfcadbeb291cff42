"""Grain prompt loader: process sharding, resumable state, bucket padding, truncation."""

import os

import numpy as np
import pytest

from rpt_jax.data import records, synthetic
from rpt_jax.data.pipeline import PromptLoader
from rpt_jax.data.prepare import prepare
from rpt_jax.data.sources import SourceConfig
from rpt_jax.rl import prompts
from tests.data.test_prepare import small_config

BUCKETS = (384, 448, 512)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tokenizer, proxy):
  # filter 'all' + a cap: every document gives exactly 5 records, so 24 docs -> 120 records.
  out = str(tmp_path_factory.mktemp("pipe") / "d")
  cfg = small_config(source=SourceConfig(synthetic=synthetic.SyntheticConfig(num_documents=24)),
                     filter="all", max_positions_per_document=5, eval_fraction=0.0)
  manifest = prepare(cfg, tokenizer, proxy, out, show_progress=False)
  assert manifest["counts"]["train"]["records"] == 120
  return out


@pytest.fixture(scope="module")
def all_records(data_dir):
  recs = []
  for name in sorted(os.listdir(data_dir)):
    if name.startswith("train-"):
      recs += records.read_shard(os.path.join(data_dir, name))
  return {(r.doc_id, r.position): r for r in recs}


def loader(data_dir, tok, **kw):
  kw = {"batch_size": 4, "prompt_buckets": BUCKETS, "seed": 5, "shard_index": 0,
        "shard_count": 1, **kw}
  return PromptLoader(data_dir, "train", tok, **kw)


def keys(batch):
  return list(zip(batch.doc_id.tolist(), batch.position.tolist()))


def test_two_processes_get_disjoint_batches_covering_everything(data_dir, all_records,
                                                                tokenizer):
  seen = []
  for index in (0, 1):
    got = [k for b in loader(data_dir, tokenizer, num_epochs=1, shard_index=index,
                             shard_count=2) for k in keys(b)]
    assert len(got) == 60 and len(set(got)) == 60
    seen.append(set(got))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(all_records)


def test_batches_are_built_from_the_records(data_dir, all_records, tokenizer):
  batches = list(loader(data_dir, tokenizer, num_epochs=1))
  assert len(batches) == 30
  for batch in batches[:5]:
    width = batch.prompt_tokens.shape[1]
    assert width == min(b for b in BUCKETS if b >= batch.prompt_lengths.max())
    for row, key in enumerate(keys(batch)):
      rec = all_records[key]
      want = prompts.build_prompt_ids(tokenizer.decode(rec.context_ids), tokenizer)
      n = batch.prompt_lengths[row]
      assert batch.prompt_tokens[row, :n].tolist() == want
      assert (batch.prompt_tokens[row, n:] == tokenizer.pad_id).all()
      assert batch.completions()[row] == rec.completion
      assert batch.boundary_lists()[row] == rec.boundaries.tolist()
      assert batch.bucket[row] == rec.bucket and batch.entropy[row] == np.float32(rec.entropy)
      assert not batch.truncated[row]
  # Shuffled: not in file order; seeded: the same order again.
  assert [keys(b) for b in batches] == [keys(b) for b in loader(data_dir, tokenizer,
                                                                 num_epochs=1)]
  assert sum((keys(b) for b in batches), []) != sorted(all_records)


def test_state_restore_resumes_with_the_identical_next_batch(data_dir, tokenizer):
  it = iter(loader(data_dir, tokenizer))  # num_epochs=None: repeats forever
  for _ in range(33):  # past one epoch (30 batches)
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  fresh = iter(loader(data_dir, tokenizer))
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for field in ("prompt_tokens", "prompt_lengths", "completion_bytes", "boundaries",
                  "doc_id", "position", "entropy"):
      np.testing.assert_array_equal(getattr(got, field), getattr(want, field))


def test_long_prompts_are_left_truncated_keeping_the_instruction(data_dir, all_records,
                                                                 tokenizer):
  head, tail = tokenizer.apply_chat_template(prompts.format_prompt("\0", "v0")).split("\0")
  limit = len(prompts.build_prompt_ids("", tokenizer)) + 12  # ~12 of the 24 context tokens
  it = iter(loader(data_dir, tokenizer, prompt_buckets=(limit,), num_epochs=1))
  batches = list(it)
  assert it.truncated_prompts == sum(int(b.truncated.sum()) for b in batches) > 60
  for batch in batches:
    assert batch.prompt_tokens.shape == (4, limit)
    for row, key in enumerate(keys(batch)):
      text = tokenizer.decode(batch.prompt_tokens[row, :batch.prompt_lengths[row]])
      assert text.startswith(head) and text.endswith(tail)  # instruction and markers kept
      context = text[len(head):len(text) - len(tail)]
      full = tokenizer.decode(all_records[key].context_ids)
      assert full.endswith(context)  # the context's end survives
      assert batch.truncated[row] == (len(context) < len(full))


def test_loader_errors(tmp_path, data_dir, tokenizer):
  with pytest.raises(FileNotFoundError, match="not a finished data preparation"):
    PromptLoader(str(tmp_path), "train", tokenizer, batch_size=2)
  with pytest.raises(ValueError, match="has no 'eval' records"):
    PromptLoader(data_dir, "eval", tokenizer, batch_size=2)
  with pytest.raises(ValueError, match="unknown prompt template 'v9'"):
    loader(data_dir, tokenizer, template="v9")
  with pytest.raises(ValueError, match="alone takes"):
    next(iter(loader(data_dir, tokenizer, prompt_buckets=(64,))))
