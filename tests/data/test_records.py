"""Position records: byte round trip, boundaries from the document's own tokenisation, splits."""

import numpy as np
import pytest

from rpt_jax.data import records
from rpt_jax.data.records import PositionRecord


def assert_same(a: PositionRecord, b: PositionRecord):
  for field in ("doc_id", "position", "completion", "proxy_correct", "bucket", "split"):
    assert getattr(a, field) == getattr(b, field), field
  np.testing.assert_array_equal(a.context_ids, b.context_ids)
  np.testing.assert_array_equal(a.boundaries, b.boundaries)
  assert np.float32(a.entropy) == np.float32(b.entropy)


def test_record_round_trip_and_layout(tmp_path):
  rec = PositionRecord(doc_id=2**40 + 3, position=17, context_ids=np.array([5, 2**31 - 1, 0]),
                       completion="é =".encode(), boundaries=np.array([2, 4]), entropy=1.25,
                       proxy_correct=True, bucket=2, split="eval")
  data = rec.to_bytes()
  # The documented layout: 37-byte header, then int32 LE context, completion, int32 boundaries.
  assert data[:4] == b"RPTP" and len(data) == 37 + 3 * 4 + 4 + 2 * 4
  assert int.from_bytes(data[6:14], "little") == 2**40 + 3
  assert data[37:41] == (5).to_bytes(4, "little") and data[49:53] == "é =".encode()
  assert_same(PositionRecord.from_bytes(data), rec)
  with pytest.raises(ValueError, match="not an rpt_jax position record"):
    PositionRecord.from_bytes(b"XXXX" + data[4:])
  with pytest.raises(ValueError, match="corrupt"):
    PositionRecord.from_bytes(data + b"\0")
  path = str(tmp_path / "s.arrayrecord")
  assert records.write_shard(path, [rec, rec]) == 2
  assert not (tmp_path / "s.arrayrecord.tmp").exists()
  for got in records.read_shard(path):
    assert_same(got, rec)


def test_boundaries_agree_with_tokenizer_byte_spans(tokenizer):
  tok = tokenizer
  # Byte-fallback pieces split 'é' and the emoji: boundaries may fall inside a character.
  text = "Sequence: 3, 7, 11\nIf x + 7 = 12 then x = 5. é😀!"
  ids, spans = tok.encode_with_byte_spans(text)
  n = len(ids)
  out = records.make_records(
      4, ids, spans, text.encode(), range(1, n), np.zeros(n), np.zeros(n, bool),
      np.zeros(n, np.int8), "train", max_prompt_tokens=5, completion_tokens=3)
  assert [r.position for r in out] == list(range(1, n))
  for r in out:
    t = r.position
    pieces = [tok.token_bytes(i) for i in ids[t:t + 3]]  # each token's own bytes
    assert r.completion == b"".join(pieces)
    assert r.boundaries.tolist() == np.cumsum([len(p) for p in pieces]).tolist()
    np.testing.assert_array_equal(r.context_ids, ids[max(0, t - 5):t])
  assert any(len(tok.token_bytes(i)) > 1 for i in ids)  # multi-byte pieces were exercised
  assert any(r.completion[:1] == b"\x98" for r in out)  # a completion starting mid-character


def test_zero_width_tokens_never_give_boundary_zero():
  # A SentencePiece-style word marker with no bytes at the start, and one mid-text.
  ids = [10, 11, 12, 13]
  spans = [(0, 0), (0, 2), (2, 2), (2, 5)]
  out = records.make_records(0, ids, spans, b"ab cd"[:5], [1, 2, 3], np.zeros(4),
                             np.zeros(4, bool), np.zeros(4, np.int8), "train",
                             max_prompt_tokens=8, completion_tokens=8)
  assert [r.position for r in out] == [1, 3]  # position 2 has nothing to predict
  assert out[0].completion == b"ab cd" and out[0].boundaries.tolist() == [2, 5]
  assert out[1].completion == b" cd" and out[1].boundaries.tolist() == [3]


def test_document_split_is_deterministic_and_near_fraction():
  splits = [records.document_split(i, 0.1, seed=0) for i in range(4000)]
  assert splits == [records.document_split(i, 0.1, seed=0) for i in range(4000)]
  assert 0.08 < splits.count("eval") / 4000 < 0.12
  assert splits != [records.document_split(i, 0.1, seed=1) for i in range(4000)]
  assert all(records.document_split(i, 0.0, 0) == "train" for i in range(100))
  assert all(records.document_split(i, 1.0, 0) == "eval" for i in range(100))
