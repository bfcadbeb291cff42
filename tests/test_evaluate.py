"""Evaluation: per-split accuracies on hand-built records checked against numbers worked by hand,
pass@k vs brute-force enumeration, RL-step FLOPs by hand, scaling fits on synthetic points, and
an end-to-end smoke run with the real sampler and a SentencePiece tokenizer."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rpt_jax import evaluate as ev
from rpt_jax import report as report_lib
from rpt_jax import scaling
from rpt_jax.data import records
from rpt_jax.data.manifest import MANIFEST, MANIFEST_FORMAT
from rpt_jax.data.records import PositionRecord
from rpt_jax.model.config import ModelConfig
from rpt_jax.model.transformer import Transformer
from rpt_jax.rl import prompts

OFFSET = 4  # byte b is token b + OFFSET; 0 = pad, 1 = eos


class ByteTokenizer:
  """One token per UTF-8 byte: every count below can be worked by hand."""

  vocab_size, bos_id, eos_id, pad_id, stop_ids = 256 + OFFSET, None, 1, 0, (1,)

  def encode(self, text):
    return [b + OFFSET for b in text.encode("utf-8")]

  def decode(self, ids):
    return bytes(int(i) - OFFSET for i in ids if i >= OFFSET).decode("utf-8", "replace")

  def token_bytes(self, i):
    return bytes([i - OFFSET]) if i >= OFFSET else b""

  def apply_chat_template(self, message):
    return "<user>" + message + "<assistant><think>\n"


def tid(char: str) -> int:
  return ord(char) + OFFSET


# (context, completion, boundaries, bucket); buckets vs thresholds (0.5, 1.0, 1.5):
# all = rows 0-5, easy (bucket >= 1) = 1-5, medium (>= 2) = 2, 3, 4, hard (>= 3) = 3, 4.
ROWS = [
    ("the q", b"uick", [1, 4], 0),
    ("a cat", b" sat", [1, 4], 1),
    ("a dog", b"s run", [1, 5], 2),
    ("quiz q", b"uiz", [1, 3], 3),
    ("x + y", b" = z", [2, 4], 3),
    ("my faq", b"uery", [1, 4], 1),
]
# The tiny model predicts 'u' after 'q' and ' ' after anything else (see `tiny_model`), so the
# standard argmax is right for rows 0 ('u'), 1 (' '), 3 ('u'), 5 ('u'); wrong for 2 (' ' vs 's')
# and 4 (' ' vs the 2-byte first token ' =').
STANDARD = [True, True, False, True, False, True]

G, MAX_NEW = 4, 48
LONG = "thinking " * 10  # 90 tokens > MAX_NEW: cut without a stop token, no answer
# Four sampled responses per context: (correct, formatted) worked by hand on the right.
RESPONSES = {
    "the q": ["hmm</think> \\boxed{u}",        # 'u' = first token            (1, 1)
              "\\boxed{uick}",                 # no </think>                  (0, 0)
              "a</think>\\boxed{uic}",         # 3 bytes: not a boundary      (0, 1)
              "b</think>\\boxed{uick}"],       # two tokens                   (1, 1)
    "a cat": ["</think>\\boxed{sat}",          # space missing                (0, 1)
              "</think>\\boxed{ sat}",         #                              (1, 1)
              "</think>\\boxed{}",             # empty answer                 (0, 0)
              "</think>\\boxed{ }"],           #                              (1, 1)
    "a dog": [LONG,                            # truncated                    (0, 0)
              "</think>\\boxed{s run}",        #                              (1, 1)
              "</think>\\boxed{s}",            #                              (1, 1)
              "</think>\\boxed{s r}"],         # inside a token               (0, 1)
    "quiz q": ["</think>\\boxed{uiz}"] * 4,    #                              (1, 1) x 4
    "x + y": ["</think>\\boxed{ =}",           #                              (1, 1)
              "</think>\\boxed{ }",            # half of the first token      (0, 1)
              "</think>\\boxed{ = z}",         #                              (1, 1)
              "no answer"],                    #                              (0, 0)
    "my faq": ["</think>\\boxed{x}", "</think>\\boxed{x}", "</think>\\boxed{ery}",
               "</think>\\boxed{uer}"],        # all wrong, all formatted     (0, 1) x 4
}
# Per row: first sample right [1,0,0,1,1,0]; correct counts c = [2,2,2,4,2,0]; format rates
# [.75,.75,.75,1,.75,1]. pass@1 = c/4; pass@2 = 1 - C(4-c,2)/C(4,2) = 5/6 at c=2, 1 at c=4,
# 0 at c=0; pass@4 = [c > 0]. Split means in %, (all, easy, medium, hard):
EXPECTED = {
    "num_positions": (6, 5, 3, 2),
    "proxy_accuracy": (50.0, 40.0, 200 / 3, 50.0),                 # rows 0, 2, 4 marked right
    "standard_accuracy": (400 / 6, 60.0, 100 / 3, 50.0),           # 4/6, 3/5, 1/3, 1/2
    "reasoning_accuracy": (50.0, 40.0, 200 / 3, 100.0),            # 3/6, 2/5, 2/3, 2/2
    "reasoning_mean_reward": (50.0, 50.0, 200 / 3, 75.0),          # mean of c/4
    "pass@1": (50.0, 50.0, 200 / 3, 75.0),
    "pass@2": (2600 / 36, 70.0, 1600 / 18, 1100 / 12),              # 26/36, 21/30, 16/18, 11/12
    "pass@4": (500 / 6, 80.0, 100.0, 100.0),
    "format_rate": (500 / 6, 85.0, 250 / 3, 87.5),                  # 5/6, 4.25/5, 2.5/3, 1.75/2
}
SPLIT_ORDER = ("all", "easy", "medium", "hard")


@dataclasses.dataclass
class FakeOutput:
  tokens: np.ndarray
  logprobs: np.ndarray
  lengths: np.ndarray
  done: np.ndarray


class FakeSampler:
  """The sampler's API; answers each prompt with RESPONSES[its context] and checks the call."""

  def __init__(self, tokenizer, *, expect_params=None):
    self.tokenizer, self.expect_params, self.calls = tokenizer, expect_params, []

  def generate(self, prompt_tokens, prompt_lengths, *, num_samples, max_new_tokens, temperature,
               top_k=0, top_p=1.0, eos_ids=(), rng, params=None, micro_batch=None):
    del top_k, top_p, micro_batch
    assert params is self.expect_params and eos_ids == (1,) and max_new_tokens == MAX_NEW
    self.calls.append({"shape": prompt_tokens.shape, "temperature": temperature,
                       "rng": np.asarray(jax.random.key_data(rng)).tolist()})
    b = prompt_tokens.shape[0]
    tokens = np.zeros((b * num_samples, max_new_tokens), np.int32)
    lengths = np.zeros(b * num_samples, np.int32)
    done = np.zeros(b * num_samples, bool)
    for i in range(b):
      n = int(prompt_lengths[i])
      assert (prompt_tokens[i, n:] == 0).all()  # right-padded with pad_id
      prompt = self.tokenizer.decode(prompt_tokens[i, :n])
      context = prompt.split("### Context\n")[1].split("<assistant>")[0]
      for g in range(num_samples):
        ids = self.tokenizer.encode(RESPONSES[context][g]) + [1]
        row = i * num_samples + g
        lengths[row] = min(len(ids), max_new_tokens)
        done[row] = len(ids) <= max_new_tokens
        tokens[row, :lengths[row]] = ids[:lengths[row]]
    return FakeOutput(tokens, np.zeros(tokens.shape, np.float32), lengths, done)


def write_folder(path, rows, thresholds=(0.5, 1.0, 1.5), shard_size=3):
  """Records as shards + a manifest with the keys `prepare` writes and evaluation reads."""
  os.makedirs(path, exist_ok=True)
  recs = [PositionRecord(doc_id=i, position=len(ctx), context_ids=np.asarray(ctx, np.int32),
                         completion=comp, boundaries=np.asarray(bounds, np.int32),
                         entropy=0.0, proxy_correct=i % 2 == 0, bucket=bucket, split="eval")
          for i, (ctx, comp, bounds, bucket) in enumerate(rows)]
  files = {"eval": [], "train": ["train-00000.arrayrecord"]}
  records.write_shard(os.path.join(path, files["train"][0]), [dataclasses.replace(
      recs[0], doc_id=99, split="train")])  # a train record that evaluation must not read
  for s in range(0, len(recs), shard_size):
    files["eval"].append(f"eval-{s // shard_size:05d}.arrayrecord")
    records.write_shard(os.path.join(path, files["eval"][-1]), recs[s:s + shard_size])
  manifest = {"format": MANIFEST_FORMAT, "files": files,
              "identity": {"config": {"bucket_thresholds": list(thresholds)}}}
  with open(os.path.join(path, MANIFEST), "w") as f:
    json.dump(manifest, f)
  return str(path)


@pytest.fixture(scope="module")
def tokenizer():
  return ByteTokenizer()


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory, tokenizer):
  rows = [(tokenizer.encode(c), comp, b, k) for c, comp, b, k in ROWS]
  return write_folder(tmp_path_factory.mktemp("records"), rows)


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
  """Attention/MLP outputs zeroed, so the last hidden state is the last token's embedding:
  'q' embeds as e0, every other token as e1; lm_head maps e0 -> 'u' and e1 -> ' '."""
  config = ModelConfig(family="llama", vocab_size=tokenizer.vocab_size, hidden_size=16,
                       intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                       head_dim=8, max_position_embeddings=256)
  model = Transformer(config, rngs=nnx.Rngs(0))
  model.layers[0].attn.o.value = jnp.zeros_like(model.layers[0].attn.o.value)
  model.layers[0].mlp.down.value = jnp.zeros_like(model.layers[0].mlp.down.value)
  embed = np.zeros((config.vocab_size, 16), np.float32)
  embed[:, 1] = 1.0
  embed[tid("q")] = np.eye(16)[0]
  model.embed.value = jnp.asarray(embed)
  head = np.zeros((16, config.vocab_size), np.float32)
  head[0, tid("u")] = head[1, tid(" ")] = 5.0
  model.lm_head.value = jnp.asarray(head)
  return model


def test_load_eval_positions_reads_the_eval_split_in_file_order(records_dir, tokenizer):
  positions = ev.load_eval_positions(records_dir)
  assert [p.doc_id for p in positions] == list(range(6))
  assert [tokenizer.decode(p.context_ids) for p in positions] == [r[0] for r in ROWS]
  assert [p.completion for p in positions] == [r[1] for r in ROWS]
  subset = ev.load_eval_positions(records_dir, max_positions=4, seed=3)
  ids = [p.doc_id for p in subset]
  assert len(set(ids)) == 4 and ids == sorted(ids)
  assert ids == [p.doc_id for p in ev.load_eval_positions(records_dir, max_positions=4, seed=3)]
  assert len(ev.load_eval_positions(records_dir, max_positions=50)) == 6
  assert ev.bucket_thresholds(records_dir) == (0.5, 1.0, 1.5)
  with pytest.raises(FileNotFoundError, match="manifest"):
    ev.load_eval_positions(os.path.dirname(records_dir))


def test_difficulty_splits_are_nested_bucket_thresholds():
  assert ev.difficulty_splits((0.5, 1.0, 1.5)) == {
      "easy": (1, 0.5), "medium": (2, 1.0), "hard": (3, 1.5), "all": (0, None)}
  assert list(ev.difficulty_splits((0.5, 1.0, 1.5, 2.5))) == [
      "easy", "medium", "hard", "entropy>2.5", "all"]


def test_standard_accuracy_matches_hand_worked_argmax(tiny_model, tokenizer, records_dir):
  positions = ev.load_eval_positions(records_dir)
  got = ev.standard_accuracy(tiny_model, tokenizer, positions, batch_size=4)
  np.testing.assert_array_equal(got, STANDARD)
  # Sharded over 8 simulated devices (data 2 x fsdp 2 x tensor 2): same answers.
  from rpt_jax import mesh as mesh_lib
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  sharded = ev.standard_accuracy(tiny_model, tokenizer, positions, batch_size=4, mesh=mesh)
  np.testing.assert_array_equal(sharded, STANDARD)
  # Other params (e1 -> 's' instead of ' '): row 2 ('s run') turns right, row 1 (' sat') wrong;
  # the compiled program is reused (one per model structure and sharding).
  other = nnx.clone(tiny_model)
  head = np.array(other.lm_head.value)
  head[1] = 0.0
  head[1, tid("s")] = 5.0
  other.lm_head.value = jnp.asarray(head)
  state = nnx.split(other)[1]
  hits = ev._argmax_fn.cache_info().hits
  got = ev.standard_accuracy(tiny_model, tokenizer, positions, batch_size=4, params=state)
  np.testing.assert_array_equal(got, [True, False, True, True, False, True])
  assert ev._argmax_fn.cache_info().hits == hits + 1
  np.testing.assert_array_equal(  # the model's own weights are untouched
      ev.standard_accuracy(tiny_model, tokenizer, positions, batch_size=4), STANDARD)


def test_evaluate_report_matches_hand_worked_numbers(tiny_model, tokenizer, records_dir, tmp_path):
  params = nnx.split(tiny_model)[1]
  sampler = FakeSampler(tokenizer, expect_params=params)
  config = ev.EvalConfig(num_samples=G, pass_k=(1, 2, 4), temperature=0.7, max_new_tokens=MAX_NEW,
                         template="v0_short", batch_size=4, prompt_buckets=(199, 256))
  report = ev.evaluate(tiny_model, tokenizer, sampler, records_dir, config=config,
                       rng=jax.random.key(0), params=params)
  assert list(report) == ["easy", "medium", "hard", "all"]
  for metric, expected in EXPECTED.items():
    got = [report[s][metric] for s in SPLIT_ORDER]
    np.testing.assert_allclose(got, expected, rtol=1e-12, err_msg=metric)
  assert [report[s]["entropy_above"] for s in SPLIT_ORDER] == [None, 0.5, 1.0, 1.5]
  # Response length: generated tokens incl. the stop token, or MAX_NEW when cut.
  lens = [np.mean([min(len(r.encode()) + 1, MAX_NEW) for r in RESPONSES[c]]) for c, *_ in ROWS]
  assert report["all"]["mean_response_length"] == pytest.approx(np.mean(lens))
  assert report["hard"]["mean_response_length"] == pytest.approx(np.mean(lens[3:5]))
  assert report["all"]["truncated_prompts"] == 0
  # Prompts: "<user>" + 169-byte template + context + "<assistant><think>\n" = 194 + context;
  # 5-byte contexts fit the 199 bucket, the 6-byte ones need 256; batches stay 4 rows.
  assert [c["shape"] for c in sampler.calls] == [(4, 199), (4, 256)]
  assert all(c["temperature"] == 0.7 for c in sampler.calls)
  assert sampler.calls[0]["rng"] != sampler.calls[1]["rng"]  # a fresh key per batch

  path = report_lib.write_report(report, str(tmp_path), "eval")
  with open(path) as f:
    assert json.load(f) == report
  table = report_lib.format_table(report)
  assert "| mode (accuracy %) | easy (n=5) | medium (n=3) | hard (n=2) | all (n=6) |" in table
  assert "| standard next-token prediction (argmax) | 60.00 | 33.33 | 50.00 | 66.67 |" in table
  assert "| next-token reasoning (1 sample) | 40.00 | 66.67 | 100.00 | 50.00 |" in table
  assert "| pass@2 | 70.00 | 88.89 | 91.67 | 72.22 |" in table
  for name, reports in (("one.png", report), ("two.png", {"before RPT": report,
                                                          "after RPT": report})):
    out = report_lib.plot_report(reports, str(tmp_path / name))
    with open(out, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_thought_length_and_breakdown_by_kind_match_hand_worked_numbers(tiny_model, tokenizer,
                                                                         records_dir):
  params = nnx.split(tiny_model)[1]
  config = ev.EvalConfig(num_samples=G, pass_k=(1,), temperature=0.7, max_new_tokens=MAX_NEW,
                         template="v0_short", batch_size=4, prompt_buckets=(199, 256))
  measured = ev.measure(tiny_model, tokenizer, FakeSampler(tokenizer, expect_params=params),
                        records_dir, config=config, rng=jax.random.key(0), params=params)
  # Bytes before '</think>'; a response without one counts its generated tokens (stop included,
  # or MAX_NEW when cut): the q row (3 + 13 + 1 + 1) / 4, the LONG row 48 / 4, 'no answer' 10 / 4.
  thought = [4.5, 0.0, 12.0, 0.0, 2.5, 0.0]
  np.testing.assert_allclose(measured.reasoning["thought_length"], thought)
  report = ev.summarize(measured, (0.5, 1.0, 1.5), config.pass_k)
  assert report["all"]["mean_thought_length"] == pytest.approx(np.mean(thought))
  assert report["hard"]["mean_thought_length"] == pytest.approx(1.25)
  kind = lambda rec: "ends in q" if tokenizer.decode(rec.context_ids).endswith("q") else "other"
  table = ev.breakdown(measured, kind, (0.5, 1.0, 1.5))
  assert list(table) == ["hard", "all"] and list(table["all"]) == ["ends in q", "other"]
  # all: rows 0, 3, 5 end in q (argmax right 3/3, first sample right 1, 1, 0); rows 1, 2, 4 not
  # (argmax 1/3, first sample 0, 0, 1). hard: row 3 (q) and row 4.
  want = {("all", "ends in q"): (3, 100.0, 200 / 3, 1.5),
          ("all", "other"): (3, 100 / 3, 100 / 3, 14.5 / 3),
          ("hard", "ends in q"): (1, 100.0, 100.0, 0.0), ("hard", "other"): (1, 0.0, 100.0, 2.5)}
  for (split, k), (n, std, rsn, th) in want.items():
    got = table[split][k]
    assert got["num_positions"] == n
    assert (got["standard_accuracy"], got["reasoning_accuracy"],
            got["mean_thought_length"]) == pytest.approx((std, rsn, th))
  text = report_lib.breakdown_table(table, table, "all")
  assert "| ends in q | 3 | 100.0 | 100.0 | 66.7 | 66.7 | 1.5 |" in text
  summary = report_lib.summary_table(report, report)
  assert summary.splitlines()[-1].split()[:2] == ["all", "6"]


def test_modes_can_run_alone(tiny_model, tokenizer, records_dir):
  config = ev.EvalConfig(modes=("standard",), template="v0_short", batch_size=4)
  report = ev.evaluate(tiny_model, tokenizer, None, records_dir, config=config,
                       rng=jax.random.key(0))
  assert report["all"]["reasoning_accuracy"] is None and report["all"]["format_rate"] is None
  assert report["easy"]["standard_accuracy"] == pytest.approx(60.0)
  assert "reasoning" not in report_lib.format_table(report)


def test_prompt_left_truncation_keeps_the_end_of_the_context(tokenizer):
  rec = PositionRecord(0, 9, np.asarray(tokenizer.encode("abcdefghi"), np.int32), b"j",
                       np.asarray([1], np.int32), 0.0, False, 0, "eval")
  ids, truncated = prompts.fitted_prompt_ids(rec.context_ids, tokenizer, "v0_short", 194 + 3)
  assert truncated and len(ids) == 197 and tokenizer.decode(ids).endswith(
      "### Context\nghi<assistant><think>\n")
  with pytest.raises(ValueError, match="raise data.prompt_buckets"):
    prompts.fitted_prompt_ids(rec.context_ids, tokenizer, "v0_short", 100)


def test_pass_at_k_equals_brute_force_enumeration():
  for n in range(1, 7):
    for c in range(n + 1):
      for k in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), k))  # samples 0..c-1 are correct
        brute = sum(any(i < c for i in s) for s in subsets) / len(subsets)
        assert ev.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
  with pytest.raises(ValueError):
    ev.pass_at_k(4, 5, 1)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_samples": 2, "pass_k": (1, 4)}, "pass_k"),
    ({"reward": "dense"}, "first-token"),
    ({"reward": "nope"}, "unknown reward"),
    ({"template": "nope"}, "unknown prompt template"),
    ({"modes": ("beam",)}, "modes"),
    ({"prompt_buckets": (256, 128)}, "prompt_buckets"),
    ({"max_positions": 0}, "max_positions"),
    ({"temperature": -1.0}, "temperature"),
])
def test_eval_config_rejects_bad_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ev.EvalConfig(**kwargs)


def test_rl_step_flops_by_hand():
  config = ModelConfig(family="llama", vocab_size=100, hidden_size=8, intermediate_size=16,
                       num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4)
  # Forward per token at window 10 + 6 = 16: matmuls 2 * [2 * (2*8*2*4 + 2*8*1*4 + 3*8*16)
  # + 8*100] = 2 * 1952 = 3904, attention 4 * 2 layers * 2 heads * 4 * 16 = 1024: 4928.
  # Shared prefix: 3 * (10 + 4 * 6) = 102 tokens; per row: 3 * 4 * 16 = 192. Times 4 (1 + 3).
  kw = dict(contexts=3, generations=4, prompt_len=10, response_len=6)
  assert scaling.rl_step_flops(config, **kw) == 4 * 102 * 4928
  assert scaling.rl_step_flops(config, shared_prefix=False, **kw) == 4 * 192 * 4928


def _report(accuracy_by_split):
  return {s: {"num_positions": 10, "reasoning_accuracy": a} for s, a in accuracy_by_split.items()}


def test_scaling_report_recovers_known_laws(tmp_path):
  compute = np.linspace(100, 1200, 12) * 2.0e17
  laws = {"easy": (-30.0, 0.08, 45.0), "medium": (-5.0e3, 0.25, 34.0)}
  points = []
  for i, c in enumerate(compute):
    accs = {s: a / c**alpha + p for s, (a, alpha, p) in laws.items()}
    accs["hard"] = 20.0 + i if i < 2 else None  # measured at two checkpoints only
    points.append((float(c), _report(accs)))
  out = scaling.scaling_report(points, str(tmp_path))
  for split, (a, alpha, p) in laws.items():
    assert out[split]["alpha"] == pytest.approx(alpha, rel=1e-5)
    assert out[split]["A"] == pytest.approx(a, rel=1e-4)
    assert out[split]["p_star"] == pytest.approx(p, rel=1e-6)
    assert out[split]["r2"] == pytest.approx(1.0, abs=1e-9) and out[split]["num_points"] == 12
  assert out["hard"]["num_points"] == 2 and "not enough points" in out["hard"]["error"]
  assert os.path.isfile(out["plot"])
  with open(tmp_path / "scaling.json") as f:
    assert json.load(f)["easy"]["alpha"] == pytest.approx(0.08, rel=1e-5)

  few = scaling.scaling_report(points[:2], str(tmp_path / "few"))
  assert few["plot"] is None
  assert all("not enough points" in few[s]["error"] for s in ("easy", "medium", "hard"))


# ---- the real sampler, end to end ---------------------------------------------------------------

def test_end_to_end_with_real_sampler_and_sentencepiece(tmp_path):
  sampler_lib = pytest.importorskip("rpt_jax.rl.sampler")
  from rpt_jax.data import synthetic
  from rpt_jax.tokenizer import train_sentencepiece

  docs = list(synthetic.synthetic_documents(synthetic.SyntheticConfig(num_documents=60, seed=5)))
  tok = train_sentencepiece(docs, 400, str(tmp_path / "sp.model"))
  config = ModelConfig(family="qwen2", vocab_size=tok.vocab_size, hidden_size=32,
                       intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=8, max_position_embeddings=1024, attention_bias=True)
  model = Transformer(config, rngs=nnx.Rngs(1))
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0, -1])  # one compile per length
  rows, want = [], []
  for d, doc in enumerate(docs[:3]):
    ids, spans = tok.encode_with_byte_spans(doc)
    t_list = [t for t in (5, 22, 43, 60) if t < len(ids) - 1]  # buckets t % 4: 1, 2, 3, 0
    for r in records.make_records(d, ids, spans, doc.encode(), t_list, np.zeros(len(ids)),
                                  np.zeros(len(ids), bool), np.arange(len(ids)) % 4, "eval",
                                  max_prompt_tokens=32, completion_tokens=4):
      # Reference: an unpadded, unbatched forward. Every other row gets the model's own argmax
      # as its true next token, so both outcomes occur whatever the random weights predict.
      guess = tok.token_bytes(int(jnp.argmax(forward(state, jnp.asarray(r.context_ids)[None]))))
      completion, bounds = r.completion, r.boundaries.tolist()
      if len(rows) % 2 == 0 and guess:
        completion, bounds = guess + completion, [len(guess)] + [len(guess) + b for b in bounds]
      want.append(guess == completion[:bounds[0]])
      rows.append((r.context_ids.tolist(), completion, bounds, r.bucket))
  assert any(want) and len(rows) >= 8
  data_dir = write_folder(tmp_path / "data", rows)
  sampler = sampler_lib.Sampler(model, pad_id=tok.pad_id)
  eval_config = ev.EvalConfig(num_samples=2, pass_k=(1, 2), temperature=1.0, max_new_tokens=8,
                              template="v0_short", batch_size=4, prompt_buckets=(512,))
  report = ev.evaluate(model, tok, sampler, data_dir, config=eval_config, rng=jax.random.key(2))
  assert report["all"]["num_positions"] == len(rows)
  for entry in report.values():
    for key in ("standard_accuracy", "reasoning_accuracy", "pass@1", "pass@2", "format_rate"):
      assert entry[key] is None or 0.0 <= entry[key] <= 100.0
    if entry["num_positions"]:
      assert entry["pass@1"] <= entry["pass@2"] + 1e-9
      assert 1.0 <= entry["mean_response_length"] <= 8.0
  got = ev.standard_accuracy(model, tok, ev.load_eval_positions(data_dir), batch_size=4)
  np.testing.assert_array_equal(got, want)
  assert report["all"]["standard_accuracy"] == pytest.approx(100.0 * np.mean(want))
