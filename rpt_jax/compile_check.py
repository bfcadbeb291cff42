r"""Will a run config fit its hardware? Compile its programs for the target, on any machine.

`check_run_config(spec)` lowers and compiles, ahead of time, the three device programs of an RPT
step for the config's model and mesh, and reads per-device bytes from
`compiled.memory_analysis()`:

  sampler_prefill  the rollout engine's admission: its prefill contexts at the longest prompt
                   bucket, prefilled and inserted into the slot cache of `rl.decode_slots` rows
                   x (bucket + `rl.max_new_tokens`) positions;
  sampler_decode   one chunk of decode steps over every slot;
  train_step       the whole update: `rl.batch_contexts` contexts at the longest bucket with G
                   responses of `rl.max_new_tokens`, gradients accumulated over micro-batches of
                   `rl.train_micro_batch` contexts, AdamW applied.

Nothing is materialised: the model is `nnx.eval_shape`d from the run's own architecture
(`RunSpec.model.model_config`, as the run builds it: HF config.json, or `compile_check.hf_config`
when the weights are elsewhere, or the scratch model at the tokenizer's size) and every input is a
`jax.ShapeDtypeStruct` carrying its sharding. The programs are lowered through the public
`lower` of the sampler the run builds (`rpt_jax.train.make_rollout_sampler`) and `TrainStep.lower`; the target is found by `rpt_jax.targets`. With `compile_check.platform = 'tpu'`
the programs are compiled for a TPU topology described by libtpu (`jax[tpu]` installed, no TPU
needed): `jax.experimental.topologies.get_topology_desc`. Otherwise they are compiled for this
machine's own devices (e.g. on the 8-GPU host itself). Where neither is possible (libtpu missing,
or a GPU target checked from a CPU machine) the check falls back to counting the bytes of the
arrays each program holds by their shardings (`estimate_memory`, from
`rpt_jax.rl.train_state.bytes_per_device`): parameters, gradients, optimiser state, KV cache; activations and XLA temporaries are then NOT counted, and the report
says so.

Per-device peak of a program = argument + output + temp - alias bytes. During rollouts the
optimiser state is resident too (the train state lives across the step), so the sampler
programs' totals add it. Budget = HBM per device (the `HBM_BYTES` table by device kind, or
`compile_check.hbm_bytes`) x `compile_check.hbm_fraction`. A program the TPU compiler rejects
for memory is reported (its temporaries from the error, fits=False), not raised.

The mesh is built as a run builds it (`jax.make_mesh`), so a mesh shape the slice cannot lay out
is an error here too. Also reported: whether `rpt_jax.validate` accepts the config (the figures
are produced either way), and how many processes hold each batch shard (`hosts_per_batch_shard`:
above 1 when the tensor axis crosses hosts; those processes then read identical rows, which
`rpt_jax.train.process_batch_rows` arranges and tests/test_multihost.py checks).

The target, in the config (see configs/tpu_v4.py):

    c.compile_check = dict(
        platform='tpu', topology='v4:4x4x4', chip_config_name='megacore',
        chips_per_host_bounds=(2, 2, 1), accelerator_type='v4-128', num_devices=64,
        num_processes=16, hbm_bytes=32 * 2**30, hbm_fraction=0.9,
        hf_config={...config.json...},      # or model={...ModelConfig fields...} (tests)
        stated_gib={...})                   # the config's own arithmetic, checked by tests

Command line (works today, on a machine without a TPU when libtpu is installed):

    python -m rpt_jax.compile_check --config=configs/tpu_v4.py

`python -m rpt_jax.main --config=... --mode=compile_check` calls the same function.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from rpt_jax import mesh as mesh_lib
from rpt_jax import targets, validate
from rpt_jax.model.config import ModelConfig
from rpt_jax.model.attention import tracing_for_platform
from rpt_jax.model.transformer import KVCache, Transformer
from rpt_jax.spec import RunSpec

GiB = targets.GiB
PROGRAMS = ("sampler_prefill", "sampler_decode", "train_step")


def abstract_model(model_config: ModelConfig, mesh: Mesh | None,
                   rules: mesh_lib.ShardingRules) -> Transformer:
  """A Transformer whose parameters are ShapeDtypeStructs (no memory, no RNG work)."""
  return nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0), mesh=mesh,
                                            rules=rules))


def run_shapes(spec: RunSpec) -> dict[str, int]:
  """The static shapes of the run's programs (micro-batches as the trainer reads them)."""
  rpt = spec.rpt
  return dict(rollout_contexts=rpt.rollout_micro_contexts, batch_contexts=rpt.batch_contexts,
              train_micro=rpt.train_micro_contexts, prompt_len=max(spec.loader.prompt_buckets),
              new_tokens=rpt.max_new_tokens, generations=rpt.num_generations)


def lower_programs(spec: RunSpec, model_config: ModelConfig, mesh: Mesh,
                   programs: Sequence[str] = PROGRAMS) -> dict[str, Any]:
  """{name: jax.stages.Lowered} for the requested PROGRAMS, from abstract inputs only."""
  from rpt_jax import train  # pylint: disable=g-import-not-at-top
  from rpt_jax.rl import optim, train_state, update  # pylint: disable=g-import-not-at-top

  sh, rpt, rules = run_shapes(spec), spec.rpt, spec.rules
  lp, n, g = sh["prompt_len"], sh["new_tokens"], sh["generations"]
  lowered = {}
  if {"sampler_prefill", "sampler_decode"} & set(programs):
    sampler = train.make_rollout_sampler(abstract_model(model_config, mesh, rules), rpt,
                                         mesh=mesh, rules=rules,
                                         pad_id=model_config.pad_token_id or 0)
    both = sampler.lower(sh["rollout_contexts"], lp, num_samples=g, max_new_tokens=n,
                         temperature=rpt.temperature, top_k=rpt.top_k, top_p=rpt.top_p,
                         eos_ids=model_config.eos_token_ids)
    lowered.update({f"sampler_{k}": v for k, v in both.items() if f"sampler_{k}" in programs})
  if "train_step" in programs:
    optimizer = optim.make_optimizer(**rpt.optimizer)
    graphdef, params = train_state.split_params(abstract_model(model_config, mesh, rules))
    state = train_state.abstract_train_state(params, optimizer, mesh, rules)
    bt = sh["batch_contexts"]
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    batch = update.RolloutBatch(
        prompt_tokens=i32(bt, lp), prompt_lengths=i32(bt), completion_tokens=i32(bt * g, n),
        completion_mask=i32(bt * g, n), advantages=jax.ShapeDtypeStruct((bt * g,), jnp.float32))
    step = update.make_train_step(
        graphdef, rpt.loss, optimizer, num_generations=g, temperature=rpt.temperature,
        micro_batch_contexts=sh["train_micro"], shared_prefix=rpt.shared_prefix, mesh=mesh,
        rules=rules)
    lowered["train_step"] = step.lower(state, batch)
  return lowered


def estimate_memory(spec: RunSpec, model_config: ModelConfig,
                    mesh_shape: dict[str, int]) -> dict[str, int]:
  """Per-device bytes of the arrays a run holds, by their shardings alone (`mesh_shape` maps
  each mesh axis to its size): the train state (`train_state.bytes_per_device`: params, grads,
  optimizer, compute_params) and kv_cache, the rollout engine's slot cache (`rl.decode_slots`
  rows x (prompt bucket + response) positions, compute dtype), and the objective's copies of the
  weights: reference (the KL anchor, rl.beta > 0) and teacher (RLP's EMA), each laid out like
  the params (0 when not held). Activations and XLA temporaries are not included."""
  from rpt_jax.rl import optim, train_state  # pylint: disable=g-import-not-at-top

  params = nnx.state(abstract_model(model_config, None, spec.rules), nnx.Param)
  out = train_state.bytes_per_device(params, optim.make_optimizer(**spec.rpt.optimizer),
                                     mesh_shape, spec.rules, model_config.compute_dtype)
  sh = run_shapes(spec)
  cache_shape = KVCache.shape(model_config, spec.rpt.slots, sh["prompt_len"] + sh["new_tokens"])
  cache_spec = spec.rules.spec(KVCache.LOGICAL_AXES, cache_shape,
                               train_state._MeshShape(mesh_shape))  # pylint: disable=protected-access
  out["kv_cache"] = 2 * model_config.num_layers * train_state.shard_bytes(
      cache_shape, model_config.compute_dtype, cache_spec, mesh_shape)
  out["reference"] = out["params"] if spec.rpt.loss.beta > 0 else 0
  out["teacher"] = out["params"] if spec.rpt.objective.objective.teacher else 0
  return out


# The TPU compiler's out-of-memory messages, e.g. "... the total memory required for HLO
# temporaries (65.21G) exceeds available HBM (15.25G)" or "Used 45.03G of 31.25G hbm".
_OOM_PATTERNS = (
    re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\)", re.I),
    re.compile(r"Used ([\d.]+)([KMGT]?)(?:i?B)? of [\d.]+[KMGT]?(?:i?B)? hbm", re.I),
)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _memory_figures(compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  figures = {name: int(getattr(stats, f"{name}_size_in_bytes", 0) or 0)
             for name in ("argument", "output", "temp", "alias", "generated_code")}
  figures["peak"] = (figures["argument"] + figures["output"] + figures["temp"]
                     - figures["alias"])
  return figures


def _oom_figures(message: str, estimate: dict[str, int], name: str) -> dict[str, int] | None:
  """Figures from a compiler out-of-memory error: its temporaries, plus the program's
  arguments as counted by sharding (the compiler does not report them on failure)."""
  for pattern in _OOM_PATTERNS:
    match = pattern.search(message)
    if match:
      temp = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
      args = {"train_step": estimate["params"] + estimate["optimizer"],
              "sampler_prefill": estimate["params"],
              "sampler_decode": estimate["params"]}[name]
      return dict(temp=temp, argument_estimate=args, peak=temp + args)
  return None


def _gib(x: float) -> float:
  return round(x / GiB, 3)


def _verdict(name: str, peak: int, resident: int, budget: int, hbm: int) -> dict[str, Any]:
  total = peak + resident
  fits = total <= budget
  message = (f"{name}: {_gib(total)} GiB per device of a {_gib(budget)} GiB budget "
             f"({_gib(hbm)} GiB HBM)")
  if not fits:
    message += (f": OVER by {_gib(total - budget)} GiB. Lower the micro-batch, raise fsdp/tensor, "
                "or shorten prompt_buckets/max_new_tokens.")
  return dict(total_bytes=total, total_gib=_gib(total), fits=fits, message=message)



def check_run_config(spec: RunSpec, mesh: Mesh | None = None, *,
                     programs: Sequence[str] = PROGRAMS) -> dict[str, Any]:
  """Compiles (or, failing that, counts) the run's device programs; returns a JSON-able report.

  spec: the run's spec; its `compile_check` section names the target (configs/tpu_v4.py).
  mesh: this machine's run mesh (ignored for a described TPU target).
  programs: a subset of PROGRAMS to check.

  Report: target (platform, device kind, devices, mesh, HBM, budget, method, note), model
  (family, parameter count), estimate (byte counts by sharding), programs: for each, the
  memory_analysis figures, resident_other_bytes, total_bytes/gib, fits and a message; and `fits`
  for all of them. A program that the TPU compiler rejects for memory is reported with
  fits=False and the compiler's own figures instead of raising.
  """
  target = targets.resolve_target(spec, mesh)
  fraction = float(spec.target.get("hbm_fraction") or targets.DEFAULT_HBM_FRACTION)
  budget = int(target.hbm_bytes * fraction)
  # The weights need not be here: the architecture is enough. A spec `validate` rejects is still
  # measured (the figures are what one needs to decide on a fix); the rejection is reported.
  checked = dataclasses.replace(spec, model=dataclasses.replace(spec.model, hf_path=""),
                                proxy_hf_path="", tokenizer_path="")
  try:
    validate.validate_run(checked, mode="compile_check", num_devices=target.num_devices,
                          num_processes=int(spec.target.get("num_processes") or 1))
    validation = "ok"
  except validate.ConfigError as e:
    validation = f"rejected by rpt_jax.validate: {e}"
  model_config = spec.model.model_config(spec.untrained_vocab())
  validate.validate_against_model(spec, model_config.max_position_embeddings)
  model_config.check_context_length(max(spec.loader.prompt_buckets) + spec.rpt.max_new_tokens)
  estimate = estimate_memory(spec, model_config, target.mesh_shape)
  report: dict[str, Any] = {
      "validation": validation,
      "target": dict(platform=target.platform, device_kind=target.device_kind,
                     num_devices=target.num_devices, mesh=target.mesh_shape,
                     hbm_gib=_gib(target.hbm_bytes), budget_gib=_gib(budget),
                     method=target.method, note=target.note),
      "model": dict(family=model_config.family, params=model_config.num_params(),
                    layers=model_config.num_layers, param_dtype=model_config.param_dtype,
                    compute_dtype=model_config.compute_dtype, remat=model_config.remat),
      "shapes": run_shapes(spec),
      "estimate_gib": {k: _gib(v) for k, v in estimate.items()},
      "programs": {},
  }
  if target.mesh is not None:
    report["target"]["hosts_per_batch_shard"] = targets.shared_batch_shards(target.mesh,
                                                                            spec.rules)
  # The train state outlives a step: while the sampler runs, the optimiser state (not an input
  # of the sampler programs) still occupies HBM.
  # So do the objective's weight copies (KL reference, EMA teacher), in every program.
  copies = estimate["reference"] + estimate["teacher"]
  resident = {"sampler_prefill": estimate["optimizer"] + copies,
              "sampler_decode": estimate["optimizer"] + copies, "train_step": copies}
  if target.method == "eval_shape":
    counted = {
        "sampler_prefill": estimate["params"] + estimate["compute_params"],
        "sampler_decode": estimate["params"] + estimate["compute_params"] + estimate["kv_cache"],
        "train_step": estimate["params"] + 2 * estimate["grads"] + estimate["optimizer"],
    }
    for name in programs:
      entry = dict(peak_bytes=counted[name], resident_other_bytes=resident[name])
      entry.update(_verdict(name, counted[name], resident[name], budget, target.hbm_bytes))
      entry["message"] += " (arrays only: activations and temporaries not counted)"
      report["programs"][name] = entry
  else:
    for name in programs:
      start = time.perf_counter()
      entry: dict[str, Any] = {}
      try:  # One program at a time: compiling a 14B model's step takes GBs of host memory.
        with tracing_for_platform(target.mesh.devices.flat[0].platform):
          lowered = lower_programs(spec, model_config, target.mesh, (name,))[name]
        compiled = lowered.compile()
        del lowered
        figures = _memory_figures(compiled)
      except Exception as e:  # pylint: disable=broad-except
        figures = _oom_figures(str(e), estimate, name)
        if figures is None:
          raise
        entry["compiler_error"] = str(e).splitlines()[0][:400]
      entry["compile_s"] = round(time.perf_counter() - start, 1)
      entry.update({f"{k}_bytes": v for k, v in figures.items()})
      entry["resident_other_bytes"] = resident[name]
      entry.update(_verdict(name, figures["peak"], resident[name], budget, target.hbm_bytes))
      if "compiler_error" in entry:
        entry["fits"] = False
      report["programs"][name] = entry
  report["fits"] = all(p["fits"] for p in report["programs"].values())
  return report


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  _CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (configs/*.py).")
  _PROGRAMS = flags.DEFINE_list("programs", list(PROGRAMS), "Programs to check.")

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
      raise app.UsageError("--config is required, e.g. --config=configs/tpu_v4.py")
    report = check_run_config(RunSpec.from_config(_CONFIG.value), programs=_PROGRAMS.value)
    print(json.dumps(report, indent=2))

  logging.set_verbosity(logging.WARNING)
  app.run(_main)
