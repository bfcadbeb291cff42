"""Documented defaults for every rpt_jax run: the paper's hyper-parameters (PAPER.md, Table 5).

Other configs start from `get_config()` here and override what differs. Any field can be
overridden on the command line: `--config.rl.num_generations=4`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = ""  # --workdir wins; required for real runs (local or gs://)

  # Device mesh ('data', 'fsdp', 'tensor'); -1 fills with the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  # Logical axis -> mesh axis overrides, e.g. (('vocab', 'tensor'),); None = rpt_jax.mesh defaults.
  c.sharding_rules = ml_collections.config_dict.placeholder(tuple)

  # The policy. `hf_path`: a Hugging Face checkpoint directory (config.json + safetensors).
  # Empty `hf_path` builds `scratch` from its fields (the offline default).
  c.model = ml_collections.ConfigDict()
  c.model.hf_path = ""
  c.model.param_dtype = "float32"  # fp32 master weights
  c.model.compute_dtype = "bfloat16"  # bf16 compute on TPU/GPU
  c.model.remat = "full"  # 'none' | 'full' | 'dots'
  # rpt_jax.model.attention: 'auto' (tpu: splash, gpu: cudnn in bf16, cpu: xla; decode steps
  # read only each row's live cache) | 'xla' | 'chunked' | 'splash' | 'cudnn'.
  c.model.attention = "auto"
  # The layer stack as one lax.scan in training and prefill (one compiled layer body): on a TPU
  # the scheduler otherwise keeps per-layer weights live across unrolled layers (tpu_v5e.py).
  c.model.scan_layers = False
  c.model.scratch = ml_collections.ConfigDict(dict(
      family="qwen2", vocab_size=0, hidden_size=256, intermediate_size=768, num_layers=4,
      num_heads=8, num_kv_heads=2, head_dim=32, rope_theta=10000.0, max_position_embeddings=1024,
      tie_word_embeddings=True))

  # Tokenizer: an HF directory / SentencePiece .model; empty = the model's hf_path, or (offline)
  # train a SentencePiece model of `train_vocab_size` on the corpus.
  c.tokenizer = ml_collections.ConfigDict(dict(path="", train_vocab_size=1024))

  # Corpus and position selection (entropy filtering with a proxy model).
  c.data = ml_collections.ConfigDict()
  c.data.source = ml_collections.ConfigDict(dict(
      kind="synthetic", path="", field="text", name="", data_dir="", split="train",
      max_documents=0,  # 0 = all
      # Longer documents (a whole file) are cut at paragraph ends into pieces of at most this
      # many characters, each a document (0 = never cut); see rpt_jax.data.sources.
      max_document_chars=8000,
      synthetic_documents=5000))  # built-in corpus size (~380 bytes per document)
  c.data.proxy_hf_path = ""  # empty = the policy itself scores positions
  c.data.filter = "entropy"  # 'entropy' | 'proxy_miss' | 'random' | 'all'
  c.data.entropy_threshold = 0.5  # the paper does not state its training threshold
  c.data.difficulty_thresholds = (0.5, 1.0, 1.5)  # easy / medium / hard (nested), PAPER.md
  c.data.max_prompt_tokens = 4096  # paper: max prompt length 4,096
  c.data.min_context_tokens = 8
  c.data.completion_tokens = 8  # ground-truth tokens kept per position for the reward
  c.data.eval_fraction = 0.05  # held-out documents
  c.data.max_positions_per_document = 0  # 0 = keep every selected position
  c.data.score_seq_len = 4096  # proxy scoring window (tokens)
  c.data.score_overlap = 1024  # context shared by consecutive windows of a long document
  c.data.score_batch_size = 8  # windows per proxy call (a multiple of data x fsdp)
  # Documents per record shard: the unit of resume, and of work per host (hosts take shards
  # in turn, all scoring together).
  c.data.docs_per_shard = 256
  c.data.prompt_buckets = (1024, 2048, 4096, 5120)  # template + chat markers add tokens
  c.data.template = "v0"
  c.data.worker_count = 0  # Grain worker processes (0 = in the main process)
  c.data.records_dir = ""  # default: <workdir>/records

  # RPT / GRPO (PAPER.md Section 3.3).
  c.rl = ml_collections.ConfigDict()
  c.rl.batch_contexts = 256  # contexts per step (global)
  c.rl.num_generations = 8  # G
  c.rl.temperature = 0.8
  c.rl.top_k = 0  # 0 = off
  c.rl.top_p = 1.0  # 1.0 = off
  c.rl.max_new_tokens = 8192  # max response length
  # The objective (rpt_jax/rl/objectives.py): 'prefix_match' | 'first_token' | 'dense' (1 if
  # right, else p(true first token)) | 'rlp' (information gain over an EMA teacher, RLP).
  c.rl.reward = "prefix_match"
  c.rl.ema_decay = 0.999  # rlp: the EMA teacher's decay per step
  c.rl.advantage = "grpo"  # 'grpo' | 'drgrpo' | 'rloo'
  c.rl.eps_low = 0.2
  c.rl.eps_high = 0.2
  c.rl.aggregation = "token-mean"
  c.rl.beta = 0.0  # KL to the reference: zero in the paper
  c.rl.kl_estimator = "k3"
  c.rl.reference = ""  # beta > 0: an HF folder of the KL reference; '' = the starting policy
  c.rl.ntp_coef = 0.0  # RMT: next-token loss on the context tokens (0 = off)
  # RMT's decaying response budget (start, floor, decay): max(floor, start * decay**(step /
  # steps)) tokens; () = off. length_reward_coef adds coef * (1 - thought length / budget).
  c.rl.thought_budget = ()
  c.rl.length_reward_coef = 0.0
  c.rl.entropy_coef = 0.0
  c.rl.dynamic_sampling_from_step = 500  # drop all-equal groups and refill from this step on
  c.rl.dynamic_sampling_max_tries = 4
  c.rl.rollout_micro_batch = 64  # contexts in flight: the default decode slots are this x G
  # Decode slots of the continuous-batching rollout engine (rpt_jax.rl.engine): rows that finish
  # are replaced by waiting ones. 0 = rollout_micro_batch x num_generations (the same KV cache).
  c.rl.decode_slots = 0
  # Contexts prefilled per admission into free slots (G rows each). On a mesh, a multiple of the
  # batch split (data x fsdp) splits the prefill across it; 1 repeats it on every batch shard.
  c.rl.prefill_contexts = 1
  # Over-sampling with abort (off: the paper is exactly on-policy). N > 0 offers the engine
  # rl.batch_contexts + N contexts per rollout call and stops once rl.batch_contexts whole groups
  # are done; contexts it never started wait for the next call.
  c.rl.oversample_contexts = 0
  # With over-sampling: rows still decoding then continue in the next step as partial rollouts
  # (staleness logged, their sampling log-probs in the PPO ratio) instead of being dropped. The
  # slot cache then stays allocated through the update, and prompts pad to the widest bucket.
  c.rl.partial_rollouts = False
  c.rl.train_micro_batch = 8  # contexts (each with its G rollouts) per gradient-accumulation micro-step
  c.rl.shared_prefix = True  # encode each context once per group in the train pass

  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-6, b1=0.9, b2=0.999, weight_decay=0.01, eps=1e-8, warmup_steps=0,
      schedule="constant", grad_clip_norm=1.0))

  c.train = ml_collections.ConfigDict(dict(
      steps=1000, log_every=1, checkpoint_every=50, keep_checkpoints=3, eval_every=100,
      max_consecutive_nonfinite=3))

  # Plain next-token pretraining (used by the offline default to start from a non-random policy).
  c.pretrain = ml_collections.ConfigDict(dict(
      steps=0, batch_size=32, seq_len=256, learning_rate=1e-3, warmup_steps=50,
      reasoning_example_fraction=0.5, skill_example_fraction=0.0,
      thought="Let me work out the next token.",
      max_context_tokens=64, min_context_tokens=8, log_every=10))

  c.eval = ml_collections.ConfigDict(dict(
      max_positions=200, num_samples=1, pass_k=(1,), temperature=0.8, batch_contexts=32))

  # --mode=study (rpt_jax.study): evaluations along RPT for the scaling fit, and the filters the
  # ablation trains with the same RL budget; each study evaluation samples eval_samples answers
  # per position and compares their mean reward (a quarter of one answer's sampling variance).
  c.study = ml_collections.ConfigDict(dict(
      eval_points=6, filters=("entropy", "proxy_miss", "random", "all"), eval_samples=4))

  # Multi-host start-up (TPU discovers these itself; set them for multi-process CPU/GPU).
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="", num_processes=0, process_id=-1))
  return c
