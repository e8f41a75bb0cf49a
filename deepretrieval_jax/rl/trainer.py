"""The PPO run manager: the training loop, validation, checkpoints, preemption, metrics.

One step (`_Run.step`):
  1. sample the step's prompts (global batch, same on every host) with the jitted sampler;
  2. decode this host's rows and submit them to the reward pool (returns at once);
  3. while rewards are in flight: on device, assemble the RolloutBatch, recompute the actor's
     log-probs, the reference log-probs and the critic's values (all dispatched asynchronously);
  4. join the rewards, place the scores into the batch, dispatch the advantages, then
     `ppo_update` on them (state donated);
  5. fetch and log the PREVIOUS step's device metrics (async dispatch hygiene), check
     finiteness on the host and stop after `ppo.max_consecutive_skips` skipped steps in a row.

Critic: `ppo.critic="separate"` trains a `ValueModel` (state.critic_params); "shared" makes the
actor a `PolicyValueModel` (LM + value head on its trunk, one optimiser): its params, and so
checkpoints, hold an extra `value_head` subtree that sampling, eval and HF export leave out.

Console: the phase times below at INFO, for step 1 and then once per tenth of the run
(`phases.StepPhaseLog`); validation and checkpoints log a start and a done line with their time.
Timers (seconds, per step; `rl/phases.py` times device phases by completion fences on a
background thread, so nothing here blocks the overlap of steps 3 and the reward wait):
  time/generate_s        sampling + fetching this host's rows (synchronous);
  time/dispatch_s        host time to dispatch step 3's device calls;
  time/reward_wait_s     host wait for the rewards after step 3 was dispatched;
  time/assemble_s, time/logprobs_s, time/ref_logprobs_s, time/values_s, time/advantages_s,
  time/update_s          device time of each phase: its completion - max(the previous phase's
                         completion, its dispatch), dispatch and first-call compilation included;
  time/update_dispatch_s host time to dispatch the update and summarise the rewards;
  time/update_wait_s     host wait for the step's metrics when they are logged (one step late);
  time/step_s            wall time from this step's start to the next one's.

Determinism and resume: the sampling key of step s is fold_in(key(seed), s); the data order is
`data_order.ShardedSampler` (state in the checkpoint metadata); mini-batch shuffling uses the
TrainState's rng; local BM25 (or the reward cache in replay mode) is deterministic. So a run
killed and resumed from its last checkpoint reproduces the uninterrupted run bit for bit on CPU.
Checkpoints: every `train.checkpoint_every` steps, at the end, and on SIGTERM (preemption: the
step in progress finishes, then every host saves and the run returns `preempted=True`).
Only process 0 writes logs; all processes join checkpoints and reward metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn

from deepretrieval_jax import checkpoint, metrics, models, progress, sharding
from deepretrieval_jax import workdir as workdir_lib
from deepretrieval_jax.agent import harness, protocol
from deepretrieval_jax.agent.decode import decode_transcripts
from deepretrieval_jax.config import TrainConfig, resolve_data_dir, to_dataclass, validate
from deepretrieval_jax.data import backends, render, task_data
from deepretrieval_jax.rewards.pool import PoolConfig, RewardPool
from deepretrieval_jax.rewards.tasks import make_task
from deepretrieval_jax.rl import (
    data_order,
    dynamic_sampling,
    mismatch,
    policy_init,
    rollout,
    run_tokenizer,
)
from deepretrieval_jax.rl.phases import PhaseTimer, StepPhaseLog
from deepretrieval_jax.rl.state import (
    PPOConfig,
    create_train_state,
    init_train_state,
    policy_model,
    policy_params,
)
from deepretrieval_jax.rl.update import make_jitted
from deepretrieval_jax.sampler import Sampler, SamplingConfig, causal_lm_fns


class NonFiniteError(FloatingPointError):
    """Too many consecutive PPO steps were skipped for non-finite values."""


@dataclasses.dataclass
class TrainResult:
    step: int  # last completed step
    preempted: bool  # stopped by SIGTERM after checkpointing
    state: object  # the final TrainState
    last_metrics: dict


class _Preemption:
    """SIGTERM sets a flag; the loop checkpoints and returns at the end of the current step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler (tests calling from threads)
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _any_process(flag: bool) -> bool:
    """True when `flag` is set on any process (every process gets the same answer)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.array([int(flag)], np.int32))
    return bool(np.any(flags))


def _prompts(spec, examples, tokenizer, max_len: int, what: str):
    prompts, stats = render.prepare_prompts(spec, examples, tokenizer, max_len, "drop")
    if not prompts:
        raise ValueError(f"config.data.max_prompt_len={max_len}: every {what} prompt is too long")
    if stats.dropped:
        logging.warning("%s: dropped %d of %d over-long prompts", what, stats.dropped, stats.total)
    return prompts


def _lm_params(actor_params):
    """The causal LM's params of an actor (a shared critic's `value_head` left out)."""
    return {k: v for k, v in actor_params.items() if k != "value_head"}


def _critic_params(cfg, actor_params, critic_model, mesh, rules, rng):
    """Critic = the actor's trunk + a fresh value head (config.model.critic_from_actor)."""
    params = policy_init.init_params(critic_model, mesh, rules, rng)
    if cfg.model.critic_from_actor and "transformer" in actor_params:
        params = {**params, "transformer": jax.tree.map(jnp.copy, actor_params["transformer"])}
    return params


def _make_backend(cfg, spec):
    """The task's search backend; HTTP engines get config.reward's API key and rate."""
    r = cfg.reward
    key = None
    if r.api_key_env:
        key = os.environ.get(r.api_key_env)
        if not key:
            raise ValueError(
                f"config.reward.api_key_env: ${r.api_key_env} is not set (set it, or set "
                "api_key_env='' to search without a key at the engine's lower rate limit)"
            )
    index_opts, _ = backends.split_search_opts(spec, r.search_opts)
    data_dir = resolve_data_dir(cfg.data.data_dir) if spec.corpus else None
    return backends.task_backend(
        spec, data_dir, index_opts, api_key=key, rate_per_s=r.rate_per_s or None
    )


class _Run:
    """Everything one training run holds; `train` drives it."""

    def __init__(self, cfg, workdir, train_examples, val_examples, backend, agent_kw=None):
        validate(cfg, jax.process_count())
        self.cfg, self.workdir = cfg, workdir_lib.as_path(workdir)  # local or gs://
        self.tc = to_dataclass(TrainConfig, cfg.train, "train")
        self.ppo = to_dataclass(PPOConfig, cfg.ppo, "ppo")
        spec = task_data.task_spec(cfg)
        self.agent = harness.agent_config(cfg)  # multi-turn search agent, or None
        if train_examples is None:
            train_examples = task_data.load_examples(cfg, spec, cfg.data.train_split)
        if val_examples is None:
            val_examples = task_data.load_examples(cfg, spec, cfg.data.val_split)
        self.spec, self.model_cfg = spec, policy_init.model_config(cfg)
        tok = run_tokenizer.load_tokenizer(cfg, self.model_cfg)
        self.codec = tok  # text <-> model ids: the model speaks the tokenizer's ids
        if self.agent is not None and self.agent.max_turns == 1:
            if spec.assistant_prefix.rstrip().endswith(protocol.SEARCH_OPEN):
                raise ValueError(
                    "config.agent.max_turns=1 with data.prompt.assistant_prefix "
                    f"{spec.assistant_prefix!r}: every rollout would end in a search without "
                    "an answer (e.g. configs/scifact_agent.py:one_turn prefills '<answer>')"
                )
        if self.agent is not None:  # its reward task scores whole transcripts
            self.spec = self.spec.replace(
                reward_task=self.agent.reward_task, reward_opts=self.agent.reward_opts
            )
        if cfg.data.num_val_examples > 0:
            val_examples = list(val_examples)[: cfg.data.num_val_examples]
        self.train_prompts = _prompts(spec, train_examples, tok, cfg.data.max_prompt_len, "train")
        self.val_prompts = _prompts(spec, val_examples, tok, cfg.data.max_prompt_len, "validation")
        self.buckets = tuple(sorted(cfg.data.prompt_buckets))
        self.B, self.n = self.tc.prompts_per_step, cfg.sampling.n

        self.mesh = sharding.make_mesh(cfg.mesh)
        self.rules = sharding.TRAIN_RULES
        dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if self.B % dp:
            raise ValueError(
                f"train.prompts_per_step ({self.B}) must be divisible by data*fsdp ({dp})"
            )
        self.actor = policy_model(self.ppo, self.model_cfg)  # + value head: shared critic
        self.lm = models.CausalLM(self.model_cfg)  # what samples, is loaded and exported
        self.critic = models.ValueModel(self.model_cfg) if self.ppo.separate_critic else None
        self.steps = make_jitted(self.ppo, self.actor, self.critic, self.mesh, self.rules)
        self.data = data_order.ShardedSampler(
            len(self.train_prompts), self.B, cfg.data.shuffle_seed
        )
        self.ckpt = checkpoint.CheckpointManager(
            self.workdir / checkpoint.CHECKPOINT_DIR, self.tc.max_to_keep, self.tc.async_checkpoint
        )
        self.state, self.start_step = self._init_or_restore()
        self.timer = PhaseTimer()
        self.phase_log = StepPhaseLog(self.tc.num_steps, self.start_step)  # INFO lines

        self.stop = tuple(cfg.sampling.stop)
        token_bytes = None
        if self.stop or self.agent is not None:  # the agent stops at </search>
            from deepretrieval_jax.sampling import token_bytes_from_tokenizer

            token_bytes = token_bytes_from_tokenizer(tok, self.model_cfg.vocab_size)
        sampler_kw = dict(
            token_bytes=token_bytes,
            mesh=self.mesh,
            param_shardings=sharding.param_shardings(self.lm, self.mesh, sharding.SAMPLER_RULES),
            batch_axes=("data", "fsdp"),
            prompt_buckets=tuple(cfg.data.prompt_buckets),
            # The sampler's weights in the compute dtype: half the bytes of fp32 master weights
            # per chip and per decode step, same samples (docs/benchmarks.md, AOT compiles).
            weights_dtype=self.model_cfg.dtype,
        )
        s = cfg.sampling
        common = dict(
            max_new_tokens=s.max_new_tokens, eos_ids=self.codec.eos_ids, pad_id=self.codec.pad_id,
            stop=self.stop,
        )  # fmt: skip
        sampler_model = self.model_cfg  # sampling.compute_dtype: e.g. a bf16 sampler
        if s.compute_dtype:
            sampler_model = dataclasses.replace(sampler_model, dtype=s.compute_dtype)
        fns = causal_lm_fns(sampler_model, rules=sharding.SAMPLER_RULES)
        self.pool = self._make_pool(backend)
        _, self.search_opts = backends.split_search_opts(spec, cfg.reward.search_opts)
        samplers = [
            SamplingConfig(method="sample", temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                           min_p=s.min_p, n=s.n, **common),
            SamplingConfig(method="greedy", n=1, **common),
        ]  # fmt: skip
        if self.agent is None:
            self.sampler, self.greedy = (Sampler(fns, c, **sampler_kw) for c in samplers)
        else:  # the multi-turn agent (agent/): same configs, plus searches between turns
            self.sampler, self.greedy = (
                self._agent_sampler(fns, c, sampler_kw, **(agent_kw or {})) for c in samplers
            )
        bt = self.steps.batch_shardings
        self._assemble = jax.jit(
            functools.partial(rollout.assemble_batch, n=self.n), out_shardings=bt
        )
        # Sampler-trainer mismatch metrics (+ TIS with ppo.tis_cap); DAPO dynamic sampling.
        self._correct = mismatch.make_jitted_correction(self.ppo.tis_cap, bt, self.mesh)
        self.oversample = s.dynamic_oversample if s.dynamic_sampling else 1
        self._take_rows = jax.jit(dynamic_sampling.take_rows, out_shardings=(bt, bt.tokens_BxT))
        self.writer = metrics.MetricsWriter(
            self.workdir, self.tc.num_steps, self.start_step,
            tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
            wandb=cfg.logging.get("wandb"),
        )  # fmt: skip

    # ------------------------------------------------------------------ setup pieces
    def _init_or_restore(self):
        cfg = self.cfg
        latest = self.ckpt.latest_step()
        k_actor, k_critic, k_state = policy_init.init_keys(cfg.seed)
        if latest is not None:
            actor_abs = nn.meta.unbox(sharding.abstract_params(self.actor))
            critic_abs = None
            if self.critic is not None:
                critic_abs = nn.meta.unbox(sharding.abstract_params(self.critic))
            abstract = jax.eval_shape(
                functools.partial(create_train_state, self.ppo),
                actor_abs,
                critic_abs,
                actor_abs,
                jax.ShapeDtypeStruct((2,), jnp.uint32),
            )
            target = jax.tree.map(
                lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                abstract,
                self.steps.state_shardings,
            )
            if self.model_cfg.lora_rank:  # LoRA checkpoints hold no base: reload it as at start
                target = target.replace(ref_params=None)
            latest, state, meta = self.ckpt.restore_latest(target)  # falls back past a corrupt step
            if self.model_cfg.lora_rank:
                base = policy_init.load_policy_params(cfg, self.lm, self.mesh, self.rules, k_actor)
                state = state.replace(ref_params=base)
            self.data.set_state(meta["data"])
            logging.info("Resumed from %s step %d", self.ckpt.directory, latest)
            return state, latest
        actor_params = critic_params = None  # random init: one jitted init of everything
        if not (cfg.model.init_checkpoint or cfg.model.hf_path):
            policy_init.warn_random_init(self.model_cfg)
        if cfg.model.init_checkpoint or cfg.model.hf_path or self.model_cfg.lora_rank:
            # LM weights only; a shared critic's value head starts fresh in init_train_state.
            actor_params = policy_init.load_policy_params(
                cfg, self.lm, self.mesh, self.rules, k_actor
            )
            if self.ppo.separate_critic:
                critic_params = _critic_params(
                    cfg, actor_params, self.critic, self.mesh, self.rules, k_critic
                )
        state = init_train_state(
            self.ppo, self.actor, self.critic, k_state, self.mesh, self.rules,
            actor_params=actor_params, critic_params=critic_params,
        )  # fmt: skip
        logging.info("Policy: %.2fM params", policy_init.param_count(state.actor_params) / 1e6)
        return state, 0

    def _agent_sampler(self, fns, config, sampler_kw, documents=None, sampler_fns=None):
        """An `agent.decode.AgentSampler`; `documents` ({id: (title, text)}) and `sampler_fns`
        (a scripted policy) replace the corpus's texts and the model in rollouts (tests)."""
        from deepretrieval_jax.agent.decode import AgentSampler

        if documents is None:
            documents = harness.load_documents(self.spec, resolve_data_dir(self.cfg.data.data_dir))
        config = dataclasses.replace(config, tool_stop=(protocol.SEARCH_CLOSE,))
        task = self.pool.tasks[self.spec.reward_task]
        return AgentSampler(
            sampler_fns or fns, config, self.agent, codec=self.codec,
            search_fn=harness.pool_search_fn(self.pool, task, self.search_opts, documents),
            prompt_suffix=self.spec.assistant_prefix, local_rows=rollout.local_rows,
            make_global=lambda x: sharding.global_batch(x, self.mesh, self.rules), **sampler_kw,
        )  # fmt: skip

    def _make_pool(self, backend):
        cfg, spec = self.cfg, self.spec
        data_dir = resolve_data_dir(cfg.data.data_dir) if spec.family == "evidence" else None
        passages = backends.task_passages(spec, data_dir)  # evidence: answer matching
        task = make_task(spec.reward_task, dict(spec.reward_opts), passages=passages)
        if backend is None:
            backend = _make_backend(cfg, spec)
        pool_cfg = dict(cfg.reward.pool)
        pool_cfg["retries"] = None if pool_cfg["retries"] < 0 else pool_cfg["retries"]
        if pool_cfg["cache_mode"] != "off" and not pool_cfg["cache_path"]:
            if workdir_lib.is_remote(self.workdir):  # SQLite needs a local file
                raise ValueError(
                    f"config.reward.pool.cache_path: the workdir {self.workdir} is remote; "
                    "give a local file for the reward cache (or cache_mode=off)"
                )
            pool_cfg["cache_path"] = str(self.workdir / "reward_cache.sqlite")
        pool_cfg["cache_path"] = pool_cfg["cache_path"] or None
        pool = RewardPool({task.backend: backend}, {spec.reward_task: task}, PoolConfig(**pool_cfg))
        return pool.start()

    # ------------------------------------------------------------------ one step
    def _global_prompts(self, prompts):
        """The batch left-padded to the smallest prompt bucket that holds its longest prompt
        (one compilation per bucket used: short batches do not pay for the longest prompts)."""
        texts = [p.text for p in prompts]
        longest = max(p.num_tokens for p in prompts)
        length = next((b for b in self.buckets if b >= longest), self.buckets[-1])
        return rollout.encode_prompts(self.codec, texts, length)

    def _sample_and_submit(self, sampler, prompts, rng):
        """Sample the global batch, decode this host's rows, submit them; returns handles."""
        enc = self._global_prompts(prompts)
        t0 = time.perf_counter()
        # Raw key data on the host: every process passes the same value, which the sampler
        # places on the global mesh (a single-device jax.Array cannot go there multi-host).
        rng = np.asarray(jax.random.key_data(rng))
        params = _lm_params(policy_params(self.state))  # LoRA: base + adapters
        if self.agent is None:
            out = sampler(params, enc.tokens_BxP, enc.mask_BxP, rng)
        else:  # multi-turn: searches between turns; the stats go to the agent/* metrics
            out, self._turn_stats = sampler(params, enc.tokens_BxP, enc.mask_BxP, rng)
        tokens, lengths = rollout.local_rows(out.tokens_BnxL), rollout.local_rows(out.lengths_Bn)
        reasons = rollout.local_rows(out.finish_reason_Bn)
        t_gen = time.perf_counter() - t0
        start, _ = rollout.local_row_range(out.lengths_Bn)
        n = sampler.config.n
        if self.agent is None:
            completions = rollout.decode_completions(self.codec, tokens, lengths, reasons)
            completions = rollout.finish_completions(self.spec, completions, reasons, self.stop)
        else:  # the whole transcript: generated and inserted text
            completions = decode_transcripts(self.codec, out, reasons, rollout.local_rows)
        examples = [p.example for p in prompts]
        reqs = rollout.reward_requests(self.spec, examples, completions, start, n, self.search_opts)
        pending = self.pool.submit(reqs)
        return enc, out, pending, (completions, lengths, reasons), t_gen

    def step(self, step: int):
        """Runs PPO step `step` (1-based); returns (device metrics, host metrics)."""
        t_step = time.perf_counter()
        # Sampling needs the previous update's params: wait for them here, so that the wait
        # does not inflate time/generate_s (the update's device time is its own phase).
        jax.block_until_ready(self.state.step)
        idx = next(self.data)
        prompts = [self.train_prompts[i] for i in idx]
        for _ in range(self.oversample - 1):  # dynamic sampling: more candidate prompts
            prompts += [self.train_prompts[i] for i in next(self.data)]
        rng = jax.random.fold_in(jax.random.key(self.cfg.seed), step)
        enc, out, pending, local, t_gen = self._sample_and_submit(self.sampler, prompts, rng)

        t0 = time.perf_counter()  # device work while the rewards are in flight
        run, st = self.timer.run, self.state
        bt = self.steps.batch_shardings
        p_tok, p_mask = jax.device_put((enc.tokens_BxP, enc.mask_BxP), bt.tokens_BxT)
        batch = run("assemble", self._assemble, p_tok, p_mask, out)
        sampler_logp = batch.old_logp_BxT  # the sampler's own log-probs (mismatch metrics)
        if self.ppo.recompute_logprobs:  # else the sampler's log-probs (assemble_batch)
            batch = batch.replace(old_logp_BxT=run("logprobs", self.steps.logprobs, st, batch))
        if self.ppo.use_ref:
            batch = batch.replace(
                ref_logp_BxT=run("ref_logprobs", self.steps.ref_logprobs, st, batch)
            )
        if self.ppo.use_critic:  # the ValueModel, or the shared actor's value head
            batch = batch.replace(old_values_BxT=run("values", self.steps.values, st, batch))
        t_dispatch = time.perf_counter() - t0

        t0 = time.perf_counter()
        results = pending.result()
        t_reward = time.perf_counter() - t0
        scores, valid = rollout.result_arrays(results)
        if self.ppo.overlong_filter:  # DAPO: truncated samples leave the loss, unscored
            valid = rollout.filter_truncated(valid, local[2])
        scores, valid = sharding.global_batch((scores, valid), self.mesh, self.rules)
        batch = batch.replace(scores_B=scores, valid_B=valid)
        dynamic = {}
        if self.oversample > 1:  # keep B groups with reward variance (fixed batch shape)
            rows, dynamic = dynamic_sampling.select_groups(
                *dynamic_sampling.host_global((scores, valid)), self.n, self.B
            )
            batch, sampler_logp = self._take_rows((batch, sampler_logp), rows)
        adv = run("advantages", self.steps.advantages, st, batch)
        adv = run("mismatch", self._correct, batch, sampler_logp, adv)

        t0 = time.perf_counter()
        self.state, dev_metrics = self.steps.update(st, batch, adv)
        self.timer.mark("update", t0, dev_metrics)  # not the state: the next update donates it
        completions, lengths, reasons = local
        summary = rollout.summarize_results(results, lengths, reasons, "", self.spec.reward_task)
        host = rollout.merge_summaries(rollout.allgather_json(summary))
        host.update({f"pool/{k}": v for k, v in self.pool.metrics(reset=True).items()
                     if isinstance(v, (int, float))})  # fmt: skip
        host.update(dynamic)
        if self.agent is not None:
            prefix = self.spec.assistant_prefix
            host.update(harness.turn_metrics(self._turn_stats, completions, prefix))
        gen_tokens = host["response/length_mean"] * self.B * self.n * self.oversample
        host.update({
            "time/generate_s": t_gen, "time/reward_wait_s": t_reward, "time/dispatch_s": t_dispatch,
            "time/update_dispatch_s": time.perf_counter() - t0,
            "throughput/generate_tokens_per_s": gen_tokens / max(t_gen, 1e-9),
        })  # fmt: skip
        host["_t_step_start"] = t_step
        host["_phases"] = self.timer.take()
        host["_tokens"] = gen_tokens + self.B * self.n * self.oversample * enc.tokens_BxP.shape[1]
        host["_samples"] = completions[: self.tc.log_samples]
        return dev_metrics, host

    def log(self, step: int, dev_metrics, host: dict, t_end: float | None = None) -> dict:
        """Fetches a step's device metrics, checks them, writes everything (process 0).

        `t_end`: when the next step started (its sampling needs this step's update), so
        time/step_s is the wall time between step starts; default: now.
        """
        t0 = time.perf_counter()
        dev = {k: float(v) for k, v in jax.device_get(dev_metrics).items()}
        t_wait = time.perf_counter() - t0
        samples = host.pop("_samples")
        t_start, tokens = host.pop("_t_step_start"), host.pop("_tokens")
        phases = host.pop("_phases").seconds()  # done: their metrics were just fetched
        values = {f"ppo/{k}": v for k, v in dev.items()}
        values["kl/mean"] = dev.get("kl_ref", 0.0)
        values.update(host)
        values["time/update_wait_s"] = t_wait
        values.update({f"time/{name}_s": s for name, s in phases.items()})
        values["time/step_s"] = (time.perf_counter() if t_end is None else t_end) - t_start
        values["throughput/tokens_per_s"] = tokens / max(values["time/step_s"], 1e-9)
        self.writer.write(step, values)
        if jax.process_index() == 0:
            self.phase_log.add(step, values)
        if step == 1 or (self.tc.val_every and step % self.tc.val_every == 0):
            self.writer.write_texts(step, "train/completions", samples)
        if dev.get("skipped", 0.0) > 0:
            bad = [k for k, v in dev.items() if not np.isfinite(v)]
            logging.warning("Step %d skipped: non-finite values (%s)", step, bad or "inputs")
        if dev.get("consecutive_skips", 0.0) >= self.ppo.max_consecutive_skips:
            raise NonFiniteError(
                f"PPO step {step}: {int(dev['consecutive_skips'])} consecutive steps skipped for "
                f"non-finite loss/gradients/inputs (ppo.max_consecutive_skips="
                f"{self.ppo.max_consecutive_skips}); last finite-input flag "
                f"{dev.get('inputs_finite')}, non-finite metrics "
                f"{[k for k, v in dev.items() if not np.isfinite(v)]}"
            )
        return values

    def validate(self, step: int) -> dict:
        """Greedy decoding on the validation prompts; returns val/* metrics."""
        parts, samples = [], []
        for i in range(0, len(self.val_prompts), self.B):
            chunk = self.val_prompts[i : i + self.B]
            real = len(chunk)
            chunk = chunk + [chunk[-1]] * (self.B - real)  # fixed shape: one compilation
            _, out, pending, (comps, lengths, reasons), _ = self._sample_and_submit(
                self.greedy, chunk, jax.random.key(0)
            )
            results = pending.result()
            start, _ = rollout.local_row_range(out.lengths_Bn)
            keep = [j for j in range(len(results)) if start + j < real]
            parts.append(rollout.summarize_results(
                [results[j] for j in keep], lengths[keep], reasons[keep], "val/", self.spec.reward_task
            ))  # fmt: skip
            samples += [comps[j] for j in keep]
        merged = [p for chunk in rollout.allgather_json(parts) for p in chunk]
        values = rollout.merge_summaries([_sum_parts(merged)])
        self.writer.write(step, values, advance=False)
        self.writer.write_texts(step, "val/completions", samples[: self.tc.log_samples])
        self.writer.log(f"step {step}: validation reward {values['val/reward/mean']:.4f}")
        return values

    def save(self, step: int):
        state = self.state
        if self.model_cfg.lora_rank:  # adapters + their optimiser state; the base is reloaded
            state = state.replace(ref_params=None)
        self.ckpt.save(step, state, {"data": self.data.get_state(), "step": step})

    def close(self):
        self.timer.close()
        self.ckpt.close()
        self.pool.close()
        self.writer.close()


def _sum_parts(parts):
    """Adds host summaries of several validation chunks into one."""
    total = dict(parts[0])
    for p in parts[1:]:
        for k in (
            "n",
            "valid",
            "reward_sum",
            "format_ok",
            "answer_ok",
            "length_sum",
            "eos",
            "max_tokens",
        ):
            total[k] += p[k]
        total["length_max"] = max(total["length_max"], p["length_max"])
        for k in ("buckets", "metric_sums", "metric_counts"):
            merged = dict(total[k])
            for name, v in p[k].items():
                merged[name] = merged.get(name, 0) + v
            total[k] = merged
    return total


def budget_spent(used_s: float, last_step_s: float, budget_s: float, tc) -> bool:
    """Whether the CPU budget ends the run after a step: `used_s` spent so far, the step just
    done took `last_step_s`. "after": once the budget is exceeded; "nearest": when stopping now
    leaves the spend nearer the budget than one more step (of `last_step_s`) would."""
    if tc.cpu_budget_stop == "nearest":
        return used_s + last_step_s / 2 >= budget_s
    return used_s > budget_s


def train(
    cfg, workdir, *, train_examples=None, val_examples=None, backend=None, agent_kw=None
) -> TrainResult:
    """Runs (or resumes) PPO as configured; returns the final state and last metrics.

    `train_examples`/`val_examples` (lists of `data.records.Example`) and `backend` (a search
    backend) replace the configured data and search index (tests, notebooks); `agent_kw`
    (`documents`, `sampler_fns`) the multi-turn agent's document texts and rollout policy.
    """
    run = _Run(cfg, workdir, train_examples, val_examples, backend, agent_kw)
    step, pending, last = run.start_step, None, {}
    preempted = over_budget = False
    cpu_start, budget_s = time.process_time(), run.tc.cpu_budget_minutes * 60
    cpu_step = cpu_start  # CPU time at the end of the previous step
    try:
        with _Preemption() as preemption:
            while step < run.tc.num_steps:
                step += 1
                t_start = time.perf_counter()
                dev, host = run.step(step)
                if pending is not None:  # fetch step t-1's metrics after dispatching step t
                    last = run.log(*pending, t_end=t_start)
                pending = (step, dev, host)
                if run.tc.val_every and step % run.tc.val_every == 0 and step < run.tc.num_steps:
                    last = run.log(*pending)
                    pending = None
                    with progress.phase(f"validation at step {step}"):
                        run.validate(step)
                if run.tc.checkpoint_every and step % run.tc.checkpoint_every == 0:
                    with progress.phase(f"checkpoint at step {step}"):
                        run.save(step)
                if _any_process(preemption.requested):
                    preempted = True
                    break
                cpu_now = time.process_time()
                if budget_s and _any_process(
                    budget_spent(cpu_now - cpu_start, cpu_now - cpu_step, budget_s, run.tc)
                ):
                    over_budget = True
                    break
                cpu_step = cpu_now
            if pending is not None:
                last = run.log(*pending)
            if preempted:
                run.writer.log(f"SIGTERM: checkpointing step {step} and stopping")
            else:
                if over_budget:
                    run.writer.log(
                        f"CPU budget of {run.tc.cpu_budget_minutes:g} min spent at step"
                        f" {step} ({(time.process_time() - cpu_start) / 60:.1f} min): stopping;"
                        f" train.num_steps={step} repeats this run"
                    )
                if run.tc.val_every:
                    with progress.phase(f"validation at step {step}"):
                        run.validate(step)
            with progress.phase(f"checkpoint at step {step}"):
                run.ckpt.wait_until_finished()
                if run.ckpt.latest_step() != step:
                    run.save(step)
    finally:
        run.close()
    return TrainResult(step=step, preempted=preempted, state=run.state, last_metrics=last)
