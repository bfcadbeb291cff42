"""How well the pretrained offline policy does its worked skill (rpt_jax.data.skills) alone.

Pretrains the config's policy in `--workdir` (or reuses the pretrained checkpoint there), then
on `--problems` fresh skill problems (a stream no pretraining row holds) reports:

  greedy     whole-problem accuracy per skill kind: the greedy response's boxed answer equals
             the worked answer (what RPT's reward needs on a computed position);
  forced     teacher-forced per-token argmax accuracy on the worked response's digits, split by
             role: `fact` (a digit right after `=`: a step's value), `result` (a digit after
             `:`: the result so far), `operand` (any other digit in the thought), `answer`
             (inside `\\boxed{}`);
  reference  the same figures of a policy that always boxes the most common answer of the
             problems (the floor a skill has to beat), measured on the same problems.

Run (the offline default's pretraining, then the probe; ~6 min idle on 2 cores):

    python -m benchmarks.skill_probe --config=configs/local.py --workdir=/tmp/skill_probe \\
        [--set pretrain.steps=600 --set pretrain.skill_example_fraction=0.6]
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rpt_jax import pipeline
from rpt_jax import spec as spec_lib
from rpt_jax.data import skills
from rpt_jax.rl import prompts

PROBE_SEED = 10_007  # pretraining draws skill rows from `pretrain.seed` (0): a disjoint stream


def load_config(path: str, overrides: list[str]):
  """The ml_collections config of `path` with `key=value` overrides (value parsed as the
  field's type)."""
  module_spec = importlib.util.spec_from_file_location("probe_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config()
  for item in overrides:
    key, value = item.split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    old = node[leaf]
    node[leaf] = (type(old)(json.loads(value)) if isinstance(old, (tuple, list, bool))
                  else type(old)(value))
  return config


def _role(text_before: str, piece: str) -> str | None:
  """The role of a response digit token (None for non-digits), from the text before it."""
  if not piece.strip().isdigit():
    return None
  if "\\boxed{" in text_before:
    return "answer"
  last = text_before.rstrip("0123456789")[-1:]
  return {"=": "fact", ":": "result"}.get(last, "operand")


def probe(run: pipeline.Run, num_problems: int, max_new_tokens: int = 80) -> dict:
  """{'greedy': {kind: accuracy}, 'forced': {role: accuracy}, 'reference': {...}, 'n': {...}}
  for `num_problems` skill problems of stream PROBE_SEED, from the policy in `run.model`."""
  tok, model = run.tokenizer, run.model
  examples = list(skills.skill_examples(PROBE_SEED, num_problems))
  prompt_ids = [tok.encode(tok.apply_chat_template(e.problem)) for e in examples]
  response_ids = [tok.encode(prompts.format_response(e.thought, e.answer)) for e in examples]
  width = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids)) + 1
  width = -(-width // 64) * 64
  tokens = np.full((num_problems, width), tok.pad_id, np.int32)
  lengths = np.zeros((num_problems,), np.int32)
  for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
    tokens[i, :len(p) + len(r)] = p + r
    lengths[i] = len(p)

  # Teacher-forced: position t's argmax against token t + 1, on the response's digits.
  graphdef, state = nnx.split(model)

  @jax.jit
  def argmax_BT(state, tokens_BT):
    m = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    hidden, _ = m.hidden_states(tokens_BT, positions, (tokens_BT != tok.pad_id).astype(jnp.int32))
    return jnp.argmax(m.logits(hidden), -1)

  predicted = np.concatenate([np.asarray(argmax_BT(state, tokens[i:i + 32]))
                              for i in range(0, num_problems, 32)])
  forced = collections.defaultdict(list)
  for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
    for j, token in enumerate(r):
      role = _role(tok.decode(r[:j]), tok.decode([token]))
      if role is not None:
        right = predicted[i, len(p) + j - 1] == token
        forced[role].append(right)
        forced[f"{examples[i].kind}/{role}"].append(right)

  # Greedy: the whole response sampled at temperature 0 from the prompt alone.
  prompt_width = -(-int(lengths.max()) // 16) * 16
  prompts_only = np.where(np.arange(prompt_width)[None, :] < lengths[:, None],
                          tokens[:, :prompt_width], tok.pad_id)
  out = run.sampler.generate(prompts_only, lengths, num_samples=1, max_new_tokens=max_new_tokens,
                             temperature=0.0, eos_ids=tuple(tok.stop_ids),
                             rng=jax.random.key(0), params=nnx.state(model))
  texts = prompts.response_texts(tok, np.asarray(out.tokens), np.asarray(out.lengths),
                                 np.asarray(out.done))
  greedy = collections.defaultdict(list)
  for e, text in zip(examples, texts):
    greedy[e.kind].append(prompts.extract_prediction(text) == e.answer)
  common = collections.Counter(e.answer for e in examples).most_common(1)[0][0]
  reference = collections.defaultdict(list)
  for e in examples:
    reference[e.kind].append(e.answer == common)
  mean = lambda d: {k: float(np.mean(v)) for k, v in sorted(d.items())}
  everything = lambda d: float(np.mean([x for v in d.values() for x in v]))
  return {"greedy": {**mean(greedy), "all": everything(greedy)},
          "reference": {**mean(reference), "all": everything(reference)},
          "forced": mean(forced), "n": {k: len(v) for k, v in sorted(greedy.items())},
          "samples": [(e.problem[-24:], e.thought, t) for e, t in zip(examples[:4], texts[:4])]}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/local.py")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--set", action="append", default=[], help="config key=value override")
  parser.add_argument("--problems", type=int, default=128)
  parser.add_argument("--max-new-tokens", type=int, default=80)
  args = parser.parse_args(argv)
  config = load_config(args.config, args.set)
  run = pipeline.Run(spec_lib.RunSpec.from_config(config), args.workdir, progress=False)
  t0 = time.perf_counter()
  pretrained = run.pretrain()  # None: reused the workdir's checkpoint
  t1 = time.perf_counter()
  result = probe(run, args.problems, args.max_new_tokens)
  result["pretrain_seconds"] = t1 - t0 if pretrained else 0.0
  result["probe_seconds"] = time.perf_counter() - t1
  if pretrained:
    result["pretrain"] = {k: pretrained["pretrain"][k] for k in
                          ("steps_per_second", "skill_loss", "plain_loss")}
  for problem, want, got in result.pop("samples"):
    print(f"{problem!r}\n  want {want}\n  got  {got!r}")
  print("skill probe (greedy whole-problem accuracy; reference = always the most common "
        "answer):")
  for kind in result["greedy"]:
    print(f"  {kind:9s} greedy {result['greedy'][kind]:.3f}  reference "
          f"{result['reference'][kind]:.3f}  n={result['n'].get(kind, args.problems)}")
  print("teacher-forced digit accuracy: " + "  ".join(
      f"{role} {acc:.3f}" for role, acc in result["forced"].items()))
  print(json.dumps({k: v for k, v in result.items() if k not in ("greedy", "reference")}))
  return result


if __name__ == "__main__":
  main()
