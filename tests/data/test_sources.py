"""Corpus sources (text/JSONL/Parquet/TFDS/synthetic) and their error messages."""

import json
import os
import re

import numpy as np
import pytest

from rpt_jax import errors
from rpt_jax.data import sources, synthetic
from rpt_jax.data.sources import SourceConfig, SourceStats, iter_documents


def docs(**kw):
  return list(iter_documents(SourceConfig(**kw)))


def test_text_files_and_paragraphs(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "b.txt").write_text("second doc\n\nstill second\n")
  (tmp_path / "sub" / "a.txt").write_text("first\n")
  (tmp_path / "skip.md").write_text("not a txt")
  (tmp_path / "blank.txt").write_text("  \n")
  # Sorted by path: b.txt < blank.txt < sub/a.txt; the whitespace-only file is skipped.
  assert docs(kind="text", path=str(tmp_path)) == ["second doc\n\nstill second\n", "first\n"]
  assert docs(kind="text", path=str(tmp_path / "b.txt"), split_on_blank_lines=True) == [
      "second doc\n", "still second\n"]
  assert docs(kind="text", path=str(tmp_path), max_documents=1) == ["second doc\n\nstill second\n"]


def test_jsonl_field_and_missing_field_names_file_and_line(tmp_path):
  path = tmp_path / "c.jsonl"
  path.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
  assert docs(kind="jsonl", path=str(path)) == ["one", "two"]
  path.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"body": "x"}) + "\n")
  with pytest.raises(ValueError, match=re.escape(f"{path}:2: no field 'text' (found ['body'])")):
    docs(kind="jsonl", path=str(path))


def test_parquet_column(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.table({"content": ["p1", None, "p2"], "id": [1, 2, 3]}),
                 tmp_path / "x.parquet")
  assert docs(kind="parquet", path=str(tmp_path), field="content") == ["p1", "p2"]
  with pytest.raises(ValueError, match="no column 'text'"):
    docs(kind="parquet", path=str(tmp_path))


def test_non_utf8_bytes_are_replaced_counted_and_warned(tmp_path):
  (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe end")
  (tmp_path / "good.txt").write_bytes("fine é".encode())
  stats = SourceStats()
  with pytest.warns(UserWarning, match=r"bad.txt: 1 file\(s\) contained bytes that are not valid"):
    out = list(iter_documents(SourceConfig(kind="text", path=str(tmp_path)), stats))
  assert out == ["ok \ufffd\ufffd end", "fine é"]
  assert stats.invalid_utf8_documents == 1 and stats.documents == 2
  (tmp_path / "l.jsonl").write_bytes(b'{"text": "a\xffb"}\n')
  with pytest.warns(UserWarning, match=r"l.jsonl: 1 line\(s\)"):
    assert docs(kind="jsonl", path=str(tmp_path / "l.jsonl")) == ["a\ufffdb"]


def test_missing_and_empty_corpora_raise_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match="corpus path .*nowhere.* does not exist"):
    docs(kind="text", path=str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="holds no .txt files"):
    docs(kind="text", path=str(tmp_path))
  (tmp_path / "e.txt").write_text("\n \n")
  with pytest.raises(ValueError, match="has no non-empty documents"):
    docs(kind="text", path=str(tmp_path))
  with pytest.raises(ValueError, match="data.source.path is empty"):
    SourceConfig(kind="jsonl")
  with pytest.raises(ValueError, match="data.source.kind 'csv' is unknown"):
    SourceConfig(kind="csv", path="x")


def test_every_corpus_error_is_a_user_error_naming_the_file(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n{"text": broken\n')
  with pytest.raises(errors.InputError, match=re.escape(f"{bad}:2 is not valid JSON")):
    docs(kind="jsonl", path=str(bad))
  corrupt = tmp_path / "c.parquet"
  corrupt.write_bytes(b"PAR1 this is not parquet at all")
  with pytest.raises(errors.InputError, match=re.escape(f"{str(corrupt)!r} is not a readable "
                                                        "Parquet file")):
    docs(kind="parquet", path=str(corrupt))
  with pytest.raises(errors.MissingInputError, match="data.source.path"):
    docs(kind="text", path=str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(errors.InputError, match="holds no .txt files"):
    docs(kind="text", path=str(tmp_path / "empty"))


def _reference_split(text: str, max_chars: int) -> list[str]:
  """By hand: greedy paragraphs (each ends after its blank-line run), none longer than max."""
  paragraphs = re.findall(r".*?(?:\n[ \t]*\n\s*|$)", text, flags=re.S)
  pieces, current = [], ""
  for p in (p for p in paragraphs if p):
    assert len(p) <= max_chars  # this reference only packs whole paragraphs
    if len(current) + len(p) > max_chars:
      pieces.append(current)
      current = ""
    current += p
  return pieces + [current] if current else pieces


def test_long_documents_are_cut_at_paragraphs_into_bounded_pieces(tmp_path):
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "epsilon"]
  paragraphs = [" ".join(rng.choice(words, size=rng.integers(5, 60))) + "\n"
                for _ in range(200)]
  text = "\n".join(paragraphs)  # paragraphs separated by one blank line
  (tmp_path / "book.txt").write_text(text)
  got = docs(kind="text", path=str(tmp_path), max_document_chars=1000)
  assert "".join(got) == text
  assert all(len(d) <= 1000 for d in got) and len(got) >= len(text) // 1000
  assert got == _reference_split(text, 1000)
  # No cut at all: one document per file.
  assert docs(kind="text", path=str(tmp_path), max_document_chars=None) == [text]
  # A line longer than the limit is cut between words, a word longer than it anywhere.
  long_line = "word " * 50 + "x" * 70
  pieces = list(sources.split_document(long_line, 32))
  assert "".join(pieces) == long_line and all(len(p) <= 32 for p in pieces)
  assert all(p.endswith(" ") for p in pieces[:-3])  # between words while there are words


def _tiny_tfds_builder():
  import tensorflow_datasets as tfds

  class RptTinyCorpus(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(5):
        yield i, {"text": f"tfds doc {i} é"}

  return RptTinyCorpus


def test_tfds_local_array_record_dataset(tmp_path):
  import tensorflow_datasets as tfds

  builder = _tiny_tfds_builder()(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  out = docs(kind="tfds", name="rpt_tiny_corpus", data_dir=str(tmp_path))
  assert sorted(out) == [f"tfds doc {i} é" for i in range(5)]  # TFDS fixes its own order
  assert out == docs(kind="tfds", name="rpt_tiny_corpus", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="no feature 'body'"):
    docs(kind="tfds", name="rpt_tiny_corpus", data_dir=str(tmp_path), field="body")


def test_tfds_name_without_local_data(tmp_path):
  with pytest.raises(FileNotFoundError, match="TFDS dataset 'mnist' is not prepared under"):
    docs(kind="tfds", name="mnist", data_dir=str(tmp_path))
  assert list(tmp_path.iterdir()) == []  # Nothing created, nothing downloaded.


def test_synthetic_corpus_is_deterministic_and_correct():
  cfg = synthetic.SyntheticConfig(num_documents=60, seed=3)
  first = list(synthetic.synthetic_documents(cfg))
  assert first == list(synthetic.synthetic_documents(cfg))
  assert first[:20] == list(synthetic.synthetic_documents(
      synthetic.SyntheticConfig(num_documents=20, seed=3)))
  assert first != list(synthetic.synthetic_documents(
      synthetic.SyntheticConfig(num_documents=60, seed=4)))
  text = "".join(first)
  assert 10_000 < len(text) < 60 * 1500
  # Every computed statement in the corpus is true (checked independently here).
  sums = re.findall(r"\b(\d+) ([-+*]) (\d+) = (\d+)\b", text)
  assert len(sums) > 50
  for a, op, b, c in sums:
    assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c)
  for b, rhs, x in re.findall(r"If x \+ (\d+) = (\d+) then x = (\d+)\.", text):
    assert int(x) + int(b) == int(rhs)
  for b, rhs, x in re.findall(r"If (\d+) \* x = (\d+) then x = (\d+)\.", text):
    assert int(b) * int(x) == int(rhs)
  for seq in re.findall(r"Sequence: ([\d, ]+)", text):
    t = [int(v) for v in seq.split(", ")]
    assert (len({b - a for a, b in zip(t, t[1:])}) == 1
            or all(b == a * (t[1] // t[0]) for a, b in zip(t, t[1:]))
            or all(c == a + b for a, b, c in zip(t, t[1:], t[2:])))
  answers = re.findall(r"(\d+) [-+] (\d+) = (\d+)\. The answer is (\d+)\.", text)
  assert answers and all(c == d for _, _, c, d in answers)
  assert docs(kind="synthetic", synthetic=cfg) == first


def test_a_corpus_of_a_few_large_files_gives_held_out_positions_and_evaluates(tmp_path):
  """Three large files of real English and code through `python -m rpt_jax.main`: cut into
  bounded documents, some of them held out, and evaluation scores held-out positions."""
  import argparse
  import inspect
  import textwrap

  import micro_run
  from pydoc_data import topics

  corpus = tmp_path / "corpus"
  corpus.mkdir()
  english = "\n\n".join(list(topics.topics.values()))[:330_000]
  files = {"python_docs.txt": english, "argparse.txt": inspect.getsource(argparse),
           "textwrap.txt": inspect.getsource(textwrap) * 2}
  for name, text in files.items():
    (corpus / name).write_text(text)
  total_chars = sum(len(t) for t in files.values())
  config = micro_run.write_config(str(tmp_path / "micro.py"), {
      "data.source.kind": "text", "data.source.path": str(corpus), "pretrain.steps": 0,
      "eval.max_positions": 0,
      # A tokenizer trained on English and code spends more tokens on the prompt template.
      "data.prompt_buckets": (224,)})
  workdir = str(tmp_path / "workdir")
  micro_run.run_main(config, workdir, "--mode=prepare", timeout=900)
  with open(os.path.join(workdir, "records", "manifest.json")) as f:
    manifest = json.load(f)
  documents = manifest["documents"]["read"]
  # Bounded documents: at least one per max_document_chars of text, so many per file.
  assert documents >= total_chars // sources.DEFAULT_MAX_DOCUMENT_CHARS >= 3 * len(files)
  eval_counts = manifest["counts"]["eval"]
  assert eval_counts["documents"] >= 1 and eval_counts["records"] >= 1
  # Positions kept scale with the corpus: the per-document cap applies to each piece.
  kept = sum(manifest["counts"][s]["records"] for s in ("train", "eval"))
  assert kept > len(files) * micro_run.MICRO["data.max_positions_per_document"]

  proc = micro_run.run_main(config, workdir, "--mode=eval", timeout=900)
  report = json.loads(proc.stdout[proc.stdout.index("{"):])
  assert report["all"]["num_positions"] == eval_counts["records"]
