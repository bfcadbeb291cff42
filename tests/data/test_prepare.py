"""End-to-end preparation: contents vs an independent recomputation, determinism, resume, errors."""

import hashlib
import json
import os

import numpy as np
import pytest

from rpt_jax.data import prepare as prepare_lib
from rpt_jax.data import records, synthetic
from rpt_jax.data.prepare import PrepareConfig, prepare
from rpt_jax.data.sources import SourceConfig
from tests.data.conftest import tiny_proxy
from tests.data.test_filtering import reference_scores


def small_config(**kw) -> PrepareConfig:
  base = dict(
      source=SourceConfig(kind="synthetic",
                          synthetic=synthetic.SyntheticConfig(num_documents=20, seed=1)),
      filter="entropy", entropy_threshold=2.0, min_context_tokens=8, max_prompt_tokens=24,
      completion_tokens=4, max_positions_per_document=6, score_seq_len=32, score_overlap=8,
      score_batch_size=4, logits_chunk=None, eval_fraction=0.25, docs_per_shard=6, seed=0)
  base.update(kw)
  return PrepareConfig(**base)


def tree_hashes(root) -> dict[str, str]:
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer, proxy):
  out = str(tmp_path_factory.mktemp("prep") / "a")
  manifest = prepare(small_config(), tokenizer, proxy, out, show_progress=False)
  return out, manifest


def test_records_match_an_independent_recomputation(prepared, tokenizer, reference_forward):
  out, manifest = prepared
  cfg = small_config()
  docs = list(synthetic.synthetic_documents(cfg.source.synthetic))
  seen = {s: [] for s in records.SPLITS}
  for split in records.SPLITS:
    for name in manifest["files"][split]:
      seen[split] += records.read_shard(os.path.join(out, name))
  assert {s: len(v) for s, v in seen.items()} == {
      s: manifest["counts"][s]["records"] for s in records.SPLITS}
  assert seen["train"] and seen["eval"]
  eval_docs = {r.doc_id for r in seen["eval"]}
  assert not eval_docs & {r.doc_id for r in seen["train"]}  # split by document
  per_doc = {}
  for r in seen["train"] + seen["eval"]:
    per_doc.setdefault(r.doc_id, []).append(r)
  for doc_id, recs in per_doc.items():
    assert len(recs) <= 6
    ids, spans = tokenizer.encode_with_byte_spans(docs[doc_id])
    data = docs[doc_id].encode()
    # The proxy's scores recomputed by hand for a few documents (each shape compiles: slow).
    ref_ent, ref_arg = (reference_scores(reference_forward, np.asarray(ids), 32, 8)
                        if doc_id in sorted(per_doc)[:3] else (None, None))
    for r in recs:
      t = r.position
      assert t >= 8 and r.entropy >= 2.0
      np.testing.assert_array_equal(r.context_ids, ids[max(0, t - 24):t])
      stop = min(t + 4, len(ids))
      assert r.completion == data[spans[t][0]:spans[stop - 1][1]]
      assert r.boundaries.tolist() == [spans[u][1] - spans[t][0] for u in range(t, stop)]
      assert r.bucket == sum(r.entropy > x for x in (0.5, 1.0, 1.5))
      if ref_ent is not None:
        assert r.entropy == pytest.approx(ref_ent[t], abs=1e-5)
        assert r.proxy_correct == (ref_arg[t] == ids[t])
  buckets = {s: np.bincount([r.bucket for r in seen[s]], minlength=4).tolist()
             for s in records.SPLITS}
  assert buckets == {s: [manifest["counts"][s]["buckets"][str(b)] for b in range(4)]
                     for s in records.SPLITS}
  assert manifest["identity"]["config"]["entropy_threshold"] == 2.0
  assert manifest["documents"]["read"] == 20


def test_preparation_is_byte_identical(prepared, tmp_path, tokenizer, proxy):
  out, manifest = prepared
  again = str(tmp_path / "b")
  assert prepare(small_config(), tokenizer, proxy, again,
                 show_progress=False) == manifest
  hashes = tree_hashes(out)
  assert hashes == tree_hashes(again)
  assert "manifest.json" in hashes and any(k.endswith(".arrayrecord") for k in hashes)
  # Re-running on a finished folder is a no-op returning its manifest.
  assert prepare(small_config(), tokenizer, proxy, again,
                 show_progress=False) == manifest
  assert tree_hashes(again) == hashes


def test_resume_after_interruption(prepared, tmp_path, monkeypatch, tokenizer, proxy):
  out, _ = prepared
  target = str(tmp_path / "c")
  real_write = records.ShardWriter.write
  calls = []

  def crashing_write(self, record):
    real_write(self, record)
    if "-00002." in self.path:  # Die mid-write of shard 2, its temporary file half written.
      raise KeyboardInterrupt("simulated crash")

  monkeypatch.setattr(records.ShardWriter, "write", crashing_write)
  with pytest.raises(KeyboardInterrupt):
    prepare(small_config(), tokenizer, proxy, target, show_progress=False)
  assert not os.path.exists(os.path.join(target, "manifest.json"))
  assert sorted(os.listdir(os.path.join(target, "progress"))) == [
      "identity.json", "shard-00000.json", "shard-00001.json"]
  assert not [f for f in os.listdir(target) if f.endswith(".tmp")]  # the writer cleaned up
  with pytest.raises(FileNotFoundError, match="not a finished data preparation"):
    from rpt_jax.data.pipeline import read_manifest
    read_manifest(target)
  # A hard kill (no cleanup) leaves temporary files: the resumed run must ignore/remove them.
  for stale in ("train-00002.arrayrecord.tmp", "progress/shard-00002.json.tmp"):
    with open(os.path.join(target, stale), "wb") as f:
      f.write(b"half")

  monkeypatch.setattr(records.ShardWriter, "write", real_write)
  real_process = prepare_lib._process_shard
  monkeypatch.setattr(prepare_lib, "_process_shard",
                      lambda work, *a, **k: calls.append(work.shard) or real_process(work, *a, **k))
  prepare(small_config(), tokenizer, proxy, target, show_progress=False)
  assert calls == [2, 3]  # finished shards were not redone
  assert tree_hashes(target) == tree_hashes(out)


def test_other_identity_is_refused(prepared, tokenizer, proxy):
  out, _ = prepared
  with pytest.raises(ValueError, match="prepared with another config"):
    prepare(small_config(entropy_threshold=1.0), tokenizer, proxy, out,
            show_progress=False)


def test_bad_corpora_raise_and_leave_nothing(tmp_path, tokenizer, proxy):
  out = str(tmp_path / "out")

  def run(source, **kw):
    return prepare(small_config(source=source, **kw), tokenizer, proxy, out,
                   show_progress=False)

  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="holds no .txt files"):
    run(SourceConfig(kind="text", path=str(tmp_path / "empty")))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    run(SourceConfig(kind="jsonl", path=str(tmp_path / "missing.jsonl")))
  with pytest.raises(FileNotFoundError, match="TFDS dataset 'no_such_corpus' is not prepared"):
    run(SourceConfig(kind="tfds", name="no_such_corpus", data_dir=str(tmp_path / "tfds")))
  with pytest.raises(ValueError, match="embedding has only 300 rows"):
    prepare(small_config(), tokenizer, tiny_proxy(300), out, show_progress=False)
  with pytest.raises(ValueError, match="exceeds max_position_embeddings=256"):
    prepare(small_config(score_seq_len=512), tokenizer, proxy, out, show_progress=False)
  assert not os.path.exists(out)

  # All documents shorter than the minimum context: an error, and the folder is removed.
  (tmp_path / "short").mkdir()
  for i in range(3):
    (tmp_path / "short" / f"{i}.txt").write_text("tiny")
  with pytest.warns(UserWarning, match="3 of 3 documents have at most min_context_tokens=8"):
    with pytest.raises(ValueError, match="no position was selected"):
      run(SourceConfig(kind="text", path=str(tmp_path / "short")))
  assert not os.path.exists(out)

  # A JSONL line without the field, after some shards: no manifest, so never "complete".
  lines = [json.dumps({"text": d}) for d in synthetic.synthetic_documents(
      synthetic.SyntheticConfig(num_documents=14))] + [json.dumps({"body": "x"})]
  (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"c.jsonl:15: no field 'text'"):
    run(SourceConfig(kind="jsonl", path=str(tmp_path / "c.jsonl")))
  assert not os.path.exists(os.path.join(out, "manifest.json"))
  assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_non_utf8_and_short_documents_are_counted(tmp_path, tokenizer, proxy):
  corpus = tmp_path / "txt"
  corpus.mkdir()
  docs = list(synthetic.synthetic_documents(synthetic.SyntheticConfig(num_documents=4)))
  for i, d in enumerate(docs):
    (corpus / f"{i}.txt").write_bytes(d.encode() + (b"\xff tail" if i == 1 else b""))
  (corpus / "9.txt").write_text("tiny")
  with pytest.warns(UserWarning) as caught:
    manifest = prepare(small_config(source=SourceConfig(kind="text", path=str(corpus))),
                       tokenizer, proxy, str(tmp_path / "o"), show_progress=False)
  messages = " ".join(str(w.message) for w in caught)
  assert "1.txt: 1 file(s) contained bytes that are not valid UTF-8" in messages
  assert "1 of 5 documents have at most min_context_tokens=8" in messages
  assert manifest["documents"]["invalid_utf8"] == 1 and manifest["documents"]["short"] == 1


def test_config_validation():
  with pytest.raises(ValueError, match="unknown position filter 'hard'"):
    small_config(filter="hard")
  with pytest.raises(ValueError, match="score_overlap=32 must be in"):
    small_config(score_overlap=32)
  with pytest.raises(ValueError, match="strictly increasing"):
    small_config(bucket_thresholds=(1.0, 0.5))
  cfg = small_config()
  assert PrepareConfig(**{**cfg.to_dict()}) == cfg  # round trip through plain dicts


def test_round_plan_by_hand():
  from rpt_jax.data.prepare import RoundPlan
  # 10 documents, 3 per shard -> shards 0..3; 3 feed groups -> 2 rounds, the last one short.
  plan = RoundPlan.for_documents(10, 3, 3)
  assert plan.num_shards == 4
  assert plan.rounds == [(0, 1, 2), (3, None, None)]
  assert RoundPlan.for_documents(6, 3, 1).rounds == [(0,), (1,)]
  assert RoundPlan.for_documents(2, 3, 4).rounds == [(0, None, None, None)]
