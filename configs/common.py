"""Shared sub-configs: every experiment config starts from `base_config()` and edits fields.

Field names match the frozen dataclasses they become at module boundaries
(`deepretrieval_jax.config` does the conversion and validation), so `--config.ppo.clip_eps=0.1`
and `PPOConfig.clip_eps` are the same thing. Task configs change only what differs.
"""

from __future__ import annotations

import ml_collections

# Model presets by name (see deepretrieval_jax.models.ModelConfig.preset) with their HF repos.
HF_REPOS = {
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
}


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
    """Device mesh (data, fsdp, tensor); -1 on one axis means "all remaining devices"."""
    return ml_collections.ConfigDict(
        dict(
            data=data,  # data-parallel replicas (batch sharded, weights replicated)
            fsdp=fsdp,  # fully-sharded data parallel (batch and weights sharded)
            tensor=tensor,  # tensor (model) parallel within a layer
        )
    )


def model_config(preset: str = "qwen2.5-3b") -> ml_collections.ConfigDict:
    """Policy/critic architecture and where their weights come from."""
    return ml_collections.ConfigDict(
        dict(
            # ModelConfig.preset name ("qwen2.5-3b", "llama3.2-3b", "tiny", ...); "" = the shape
            # of model.hf_path's config.json (any Qwen2/Llama checkpoint, no preset needed).
            preset=preset,  # preset name, or "" = the shape of hf_path's config.json
            # ModelConfig fields that override the preset / config.json (e.g. dtype, remat).
            overrides=ml_collections.ConfigDict(dict(dtype="bfloat16", remat=True)),
            hf_path="",  # HF checkpoint dir (config.json + safetensors); "" = random init
            init_checkpoint="",  # an SFT workdir's checkpoint dir; actor AND reference start here
            critic_from_actor=True,  # critic trunk starts from the actor's initial weights
            # LoRA RL: train rank-r adapters on the actor's projections; the optimiser state and
            # the trained params are the adapters only, the frozen base is also the reference
            # policy (one copy); the critic trains fully. HF export merges the adapters.
            lora=ml_collections.ConfigDict(
                dict(
                    rank=0,  # adapter rank r; 0 = full fine-tuning
                    alpha=16.0,  # adapter output scale alpha / r
                    targets=("q", "k", "v", "o", "gate", "up", "down"),  # adapted projections
                )
            ),
        )
    )


def tokenizer_config(name: str = "") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            # "" = the tokenizer files in model.hf_path (else the offline Qwen2.5 tokenizer);
            # "qwen2.5" = the offline Qwen2.5 tokenizer; or a HF tokenizer directory.
            name=name,  # "" = model.hf_path's tokenizer (else Qwen2.5), "qwen2.5" or a dir
        )
    )


def data_config(task: str = "pubmed") -> ml_collections.ConfigDict:
    """Which task, where its files are, and prompt shapes."""
    return ml_collections.ConfigDict(
        dict(
            task=task,  # TaskSpec name in deepretrieval_jax.data (prompt texts + reward family)
            data_dir="",  # root of the task files; "" = $DEEPRETRIEVAL_DATA_DIR
            corpus="",  # corpus dir under data_dir; "" = the task's own (e.g. wikipedia_dpr)
            train_split="train",  # split the policy trains on
            val_split="test",  # split the greedy validation runs on
            max_prompt_len=500,  # tokens; longer prompts are dropped (original: filtered)
            prompt_buckets=(128, 256, 512),  # left-padded prompt lengths (fewer recompiles)
            shuffle_seed=0,  # data order; part of the resumable iterator state
            num_val_examples=-1,  # examples in each validation pass; -1 = whole split
            # Replacements of the task's prompt texts (TaskSpec fields); None = the task's own.
            prompt=prompt_config(),  # prompt pieces replacing the task's (None = keep)
        )
    )


def prompt_config() -> ml_collections.ConfigDict:
    """Optional replacements of a task's prompt pieces (see data.tasks.TaskSpec)."""

    def none():  # one placeholder per field: a shared FieldReference would link them all
        return ml_collections.config_dict.placeholder(str)

    return ml_collections.ConfigDict(
        dict(
            system=none(),  # system turn
            instruction=none(),  # first part of the user turn
            output_format=none(),  # answer-format instructions (with an example)
            note=none(),  # appended to output_format after a newline
            input_header=none(),  # line before the rendered input
            # Start of the assistant turn, written by the harness (e.g. '<answer>{"query": "');
            # the reward parser prepends it to the completion.
            assistant_prefix=none(),  # start of the assistant turn (prefilled)
            # Appended by the harness to a completion that ended on a stop string (after cutting
            # it there), e.g. "</answer>": with a prefilled answer opening and stop '"}', the
            # answer format cannot break (report such a protocol as such).
            answer_suffix=none(),  # closes a completion that ended on a stop string
        )
    )


def sampling_config() -> ml_collections.ConfigDict:
    """Rollout sampling (validation always decodes greedily with the same length limits)."""
    return ml_collections.ConfigDict(
        dict(
            temperature=1.0,  # softmax temperature; original 1.0 (PubMed), 0.6 (BEIR/SQL)
            top_k=0,  # 0 = off
            top_p=1.0,  # nucleus mass; 1.0 = off
            min_p=0.0,  # 0.0 = off
            max_new_tokens=500,  # response length limit (tokens)
            n=1,  # samples per prompt
            # Stop strings (exact bytes) ending a completion, in training, validation and
            # evaluation; the token that completes one is kept.
            stop=(),  # stop strings, e.g. ('"}',); () = EOS / max_new_tokens only
            # The ppo/mismatch_* metrics measure the sampler-trainer gap; ppo.tis_cap corrects it.
            compute_dtype="",  # sampler dtype ("bfloat16": sample in bf16); "" = model's dtype
            # Dynamic sampling: dynamic_oversample x train.prompts_per_step prompts are sampled,
            # zero-variance groups dropped first (dynamic/zero_variance_fraction logs the share).
            dynamic_sampling=False,  # DAPO: keep prompts_per_step groups whose n rewards differ
            dynamic_oversample=2,  # candidate prompts per kept prompt (>= 2 when enabled)
        )
    )


def ppo_config() -> ml_collections.ConfigDict:
    """rl.state.PPOConfig fields: the recipe of the original PubMed run (reference section 5)."""
    return ml_collections.ConfigDict(
        dict(
            advantage_estimator="gae",  # "gae" (critic) | "grpo" | "rloo" (need sampling.n > 1)
            gamma=1.0,  # GAE discount per token
            lam=1.0,  # GAE lambda
            whiten_advantages=True,  # whiten GAE advantages over the batch's response tokens
            grpo_normalize_std=True,  # GRPO: divide by the group std
            grpo_eps=1e-6,  # GRPO: added to the group std
            critic="separate",  # GAE: "separate" ValueModel (original) | "shared" value head
            value_loss_coef=0.5,  # shared critic: loss = actor loss + coef * value loss
            kl_in_reward=True,  # True: -kl_coef * KL per token in the reward (original)
            kl_estimator="k1",  # in-reward estimator: k1 (logp - logp_ref, original), k2, k3
            kl_coef=0.001,  # in-reward KL coefficient (fixed unless kl_adaptive)
            kl_adaptive=False,  # adaptive KL controller (Ziegler et al.)
            kl_target=6.0,  # adaptive: target per-token KL
            kl_horizon=10000.0,  # adaptive: horizon in samples
            kl_loss_coef=0.0,  # > 0: add kl_loss_coef * KL to the actor loss
            kl_loss_estimator="low_var_kl",  # estimator of that loss term
            clip_low=0.2,  # policy ratio clip below: 1 - clip_low
            clip_high=0.2,  # policy ratio clip above: 1 + clip_high
            dual_clip=ml_collections.config_dict.placeholder(float),  # dual clip c > 1, or None
            # token-mean: PPO, DAPO; seq-mean-token-mean: GRPO, GSPO; -sum-norm: Dr. GRPO.
            loss_agg="token-mean",  # token-mean | seq-mean-token-{mean,sum,sum-norm}
            loss_norm_len=0,  # seq-mean-token-sum-norm: constant length (tokens); 0 = batch T
            policy_loss="ppo",  # "ppo" (token-level ratio) | "gspo" (sequence-level ratio)
            # DAPO soft overlong penalty added to the score: 0 until overlong_max_len -
            # overlong_buffer_len response tokens, then linear down to -overlong_penalty_factor.
            overlong_buffer_len=0,  # DAPO overlong penalty ramp length (tokens); 0 = off
            overlong_max_len=0,  # overlong penalty: full at this length; = sampling.max_new_tokens
            overlong_penalty_factor=1.0,  # overlong penalty at overlong_max_len (reward units)
            # DAPO overlong filtering: samples cut at sampling.max_new_tokens are masked out of
            # the loss and the group statistics (response/truncated_fraction: their share).
            overlong_filter=False,  # True = truncated samples are neither rewarded nor punished
            # Truncated importance sampling: each token's policy-gradient term is weighted by
            # min(pi_trainer / pi_sampler, tis_cap) (ppo/mismatch_* metrics show the gap).
            tis_cap=0.0,  # TIS cap against the sampler-trainer mismatch; 0 = off (verl: 2.0)
            entropy_coef=0.001,  # entropy bonus weight
            value_clip=0.5,  # value clip around the rollout values
            max_grad_norm=1.0,  # global-norm clip, actor and critic separately
            actor_lr=1e-6,  # AdamW learning rate of the policy
            critic_lr=1e-5,  # AdamW learning rate of the value model
            lr_schedule="constant",  # "constant" | "cosine" (after warm-up)
            warmup_steps=0,  # linear warm-up, in optimiser updates
            total_steps=0,  # cosine: optimiser updates to reach min_lr_ratio * lr
            min_lr_ratio=0.0,  # cosine floor
            adam_b1=0.9,  # AdamW beta1
            adam_b2=0.999,  # AdamW beta2
            adam_eps=1e-8,  # AdamW epsilon
            weight_decay=0.01,  # AdamW decoupled weight decay
            ppo_epochs=1,  # passes over each rollout batch
            mini_batch_size=16,  # rows (samples) per optimiser update; divides the rollout
            micro_batch_size=0,  # rows per forward/backward slice (update, log-probs, values); 0 = mini
            shuffle=True,  # permute rows into mini-batches each epoch
            max_consecutive_skips=3,  # stop the run after this many non-finite steps in a row
            # True: old log-probs from one actor pass before the update; False: the sampler's
            # (saves a forward pass; exact up to numerics for one fp32 update per rollout)
            recompute_logprobs=True,  # False: the sampler's log-probs as the old ones
        )
    )


def reward_config() -> ml_collections.ConfigDict:
    """Reward pool (asyncio, no JAX; fields of rewards.pool.PoolConfig) and the search backend."""
    return ml_collections.ConfigDict(
        dict(
            pool=ml_collections.ConfigDict(
                dict(
                    concurrency=16,  # searches in flight per backend
                    request_timeout_s=120.0,  # one search call, backend retries included
                    batch_timeout_s=900.0,  # whole step's batch; unfinished samples -> invalid
                    retries=-1,  # pool-level retries of retryable errors; -1 = backend default
                    max_invalid_fraction=0.5,  # stop the step above this infrastructure failure
                    cache_mode="off",  # "off" | "read_write" | "record" | "replay"
                    cache_path="",  # sqlite cache; "" = WORKDIR/reward_cache.sqlite if cached
                )
            ),
            # Overrides of the task's search-backend options (TaskSpec.backend_opts), e.g.
            # k1, b, top_k for BM25; base_url for PubMed / CT.gov (a local stand-in).
            search_opts=ml_collections.ConfigDict(),
            rate_per_s=0.0,  # HTTP backends: token-bucket requests/s; 0 = backend default
            api_key_env="",  # env var holding the search API key (PubMed: NCBI_API_KEY)
        )
    )


def train_config() -> ml_collections.ConfigDict:
    """Loop length, validation, checkpoints, failure handling."""
    return ml_collections.ConfigDict(
        dict(
            num_steps=1250,  # PPO steps (each: sample -> reward -> advantages -> update)
            prompts_per_step=64,  # global prompts per step; divisible by the process count
            val_every=50,  # greedy validation every N steps and at the end (0 = never)
            checkpoint_every=50,  # orbax checkpoint every N steps (also at the end and SIGTERM)
            max_to_keep=3,  # checkpoints kept
            async_checkpoint=True,  # write checkpoints in the background
            log_samples=4,  # completions logged as text at each validation
            # Equal-compute comparisons: stop (checkpointing) at a step boundary once this
            # process's CPU time in the loop (all threads: sampler, update, BM25) reaches it.
            cpu_budget_minutes=0.0,  # minutes of CPU time; 0 = run all num_steps
            # "nearest": at the boundary nearest the budget, the next step's CPU time estimated
            # as the last one's (for arms whose steps cost very different amounts).
            cpu_budget_stop="after",  # after the first step exceeding the budget | "nearest"
        )
    )


def sft_config() -> ml_collections.ConfigDict:
    """Cold-start supervised fine-tuning on (prompt, completion) pairs."""
    return ml_collections.ConfigDict(
        dict(
            pairs_path="",  # JSONL of {"prompt": [...messages] or str, "completion": str}; ""=task
            num_steps=0,  # optimiser steps (0 = skip SFT)
            batch_size=16,  # global sequences per step
            lr=1e-5,  # AdamW peak learning rate
            warmup_steps=10,  # linear warm-up, then constant
            weight_decay=0.01,  # AdamW decoupled weight decay
            grad_clip=1.0,  # global-norm gradient clip
            max_len=1024,  # prompt + completion tokens; longer pairs are dropped
            checkpoint_every=0,  # 0 = only at the end
        )
    )


def base_config() -> ml_collections.ConfigDict:
    """The full config tree with the original PubMed recipe's values."""
    cfg = ml_collections.ConfigDict()
    cfg.seed = 0  # params init, sampling and shuffling RNG
    # FSDP over every device: replicated, the fp32 train state of a 3B actor + critic + AdamW
    # + reference (~86 GB) fits no accelerator (docs/benchmarks.md, AOT compile table).
    cfg.mesh = mesh_config(data=1, fsdp=-1)
    cfg.model = model_config()
    cfg.tokenizer = tokenizer_config()
    cfg.data = data_config()
    cfg.sampling = sampling_config()
    cfg.ppo = ppo_config()
    cfg.reward = reward_config()
    cfg.train = train_config()
    cfg.sft = sft_config()
    cfg.logging = ml_collections.ConfigDict(
        dict(
            tensorboard=True,  # TensorBoard event files under WORKDIR/tb
            progress=True,  # progress bar on process 0's console (plain lines off a terminal)
            wandb=ml_collections.ConfigDict(
                dict(
                    enabled=False,  # also log to Weights & Biases (pip install -e .[wandb])
                    project="deepretrieval_jax",  # W&B project
                    entity="",  # W&B team or user; "" = your default
                    name="",  # run name; "" = the workdir's name
                    mode="online",  # online | offline (local files, `wandb sync` later) | disabled
                    tags=(),  # W&B run tags
                )
            ),
        )
    )
    return cfg


def config_args(arg: str | None, allowed: tuple[str, ...], where: str) -> set[str]:
    """The comma-separated `FILE.py:a,b` arguments of a config; unknown ones are an error."""
    args = set((arg or "").split(",")) - {""}
    unknown = sorted(args - set(allowed))
    if unknown:
        use = ",".join(allowed) if allowed else "no argument"
        raise ValueError(f"{where}: unknown arg(s) {unknown}; use {use}")
    return args


def agent_config() -> ml_collections.ConfigDict:
    """The multi-turn search agent (deepretrieval_jax/agent; AgentConfig). Its presence in a
    config turns the rollout multi-turn: search, read the results, search again or answer."""
    return ml_collections.ConfigDict(
        dict(
            max_turns=3,  # generation turns per row: up to max_turns - 1 searches, then answer
            docs_per_search=3,  # results shown in each <information> block
            doc_chars=300,  # characters of each shown document (title: text), then "..."
            info_max_tokens=192,  # tokens of one inserted block (its width in the buffer)
            max_turn_tokens=64,  # tokens one turn may generate
            # Leave the decode loop to search once this fraction of rows waits; 1.0 = when
            # every row waits or is finished (fewest host round trips).
            exit_waiting_fraction=1.0,  # fraction of waiting rows that triggers the searches
            reward_task="agent_ndcg",  # agent_ndcg (BEIR) | agent_qa (QA: EM / F1)
            reward_opts=ml_collections.ConfigDict(),  # its TaskConfig overrides (rewards/agent.py)
        )
    )
