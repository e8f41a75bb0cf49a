"""Cold-start supervised fine-tuning on (prompt, completion) pairs.

Shape legend: B sequences, P prompt length (left-padded bucket), C completion length
(right-padded), T = P + C, V vocabulary, D embed.

Each sequence is `[prompt, left-padded to P][completion + EOS, right-padded to C]`. The loss is
token cross-entropy on completion tokens only: the logits at positions P-1 .. T-2 predict
tokens P .. T-1, and only the LM head on those C positions is computed (B x C x V logits, not
B x T x V; the head dominates a small model's cost on a 152k vocabulary).

Pairs come from `config.sft.pairs_path` (JSONL: {"prompt": str or chat messages, "completion":
str}) or, by default, from the task's training split with a teacher completion that answers
with the input itself as the query (the "original query" baseline in the task's answer
format), which teaches a randomly initialised policy the format.

The result is a CheckpointManager directory `WORKDIR/checkpoints` whose state is
{"params", "opt_state", "step"} (metadata: the data order's state); PPO starts its actor AND
reference from "params" (`--config.model.init_checkpoint=WORKDIR/checkpoints`). A run restarted
in the same workdir resumes from its latest checkpoint (`sft.checkpoint_every`).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from deepretrieval_jax import checkpoint, metrics, models, sharding
from deepretrieval_jax import workdir as workdir_lib
from deepretrieval_jax.config import SFTConfig, to_dataclass
from deepretrieval_jax.data import render, task_data
from deepretrieval_jax.models import lora
from deepretrieval_jax.rl import data_order, policy_init, run_tokenizer


@flax.struct.dataclass
class SFTBatch:
    tokens_BxT: jax.Array  # int32, prompt (left-padded) then completion (right-padded)
    mask_BxT: jax.Array  # int32, 1 on real tokens
    loss_mask_BxT: jax.Array  # float32, 1 on completion tokens (the targets)


@flax.struct.dataclass
class SFTState:
    step: jax.Array  # int32 scalar
    params: dict
    opt_state: optax.OptState


def teacher_completion(spec, example) -> str:
    """The completion after the task's assistant prefix, answering with the input as query
    (SQL: with the gold SQL, since a question is no SQL)."""
    if spec.input_format == "sql":
        if not isinstance(example.label, str):
            raise ValueError(f"task {spec.name}: example {example.id} has no gold SQL to teach")
        value = example.label
    else:
        value = render.original_query(spec, example.input)
    payload = json.dumps({spec.answer_key: value}, indent=4)
    answer = f"{payload}\n</answer>"
    if spec.assistant_prefix.endswith("<think>\n"):
        return f"The query should combine the key terms of the input.\n</think>\n<answer>\n{answer}"
    if spec.assistant_prefix.endswith("<answer>\n"):
        return answer
    return f"<answer>\n{answer}"


def load_pairs(cfg, spec, tokenizer) -> list[tuple[str, str]]:  # tokenizer: render_chat
    """(prompt text, completion text) pairs: the JSONL file or teacher pairs from the task."""
    sft = cfg.sft
    if sft.pairs_path:
        path = Path(sft.pairs_path)
        if not path.is_absolute() and cfg.data.data_dir:
            path = Path(cfg.data.data_dir) / path
        if not path.exists():
            raise FileNotFoundError(f"config.sft.pairs_path: {path} does not exist")
        pairs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            row = json.loads(line)
            if "prompt" not in row or "completion" not in row:
                raise ValueError(f"{path}, line {n}: expected keys 'prompt' and 'completion'")
            prompt = row["prompt"]
            if not isinstance(prompt, str):
                prompt = tokenizer.render_chat(prompt, assistant_prefix=spec.assistant_prefix)
            pairs.append((prompt, row["completion"]))
        return pairs
    examples = task_data.load_examples(cfg, spec, cfg.data.train_split)
    return [
        (render.render_prompt(spec, ex.input, tokenizer), teacher_completion(spec, ex))
        for ex in examples
    ]


def encode_pairs(pairs, tokenizer, prompt_len: int, completion_len: int) -> dict:
    """Numpy SFT arrays of token ids; pairs that do not fit are dropped (and logged)."""
    end_id = tokenizer.eos_ids[0]
    rows = []
    for prompt, completion in pairs:
        p, c = tokenizer.encode(prompt), tokenizer.encode(completion) + [end_id]
        if len(p) <= prompt_len and len(c) <= completion_len:
            rows.append((p, c))
    if not rows:
        raise ValueError(
            f"no SFT pair fits prompt_len={prompt_len}, completion_len={completion_len} "
            "(config.data.max_prompt_len, config.sft.max_len)"
        )
    if len(rows) < len(pairs):
        logging.warning("SFT: dropped %d of %d over-long pairs", len(pairs) - len(rows), len(pairs))
    T = prompt_len + completion_len
    tokens = np.full((len(rows), T), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(rows), T), np.int32)
    loss_mask = np.zeros((len(rows), T), np.float32)
    for i, (p, c) in enumerate(rows):
        tokens[i, prompt_len - len(p) : prompt_len] = p
        tokens[i, prompt_len : prompt_len + len(c)] = c
        mask[i, prompt_len - len(p) : prompt_len + len(c)] = 1
        loss_mask[i, prompt_len : prompt_len + len(c)] = 1.0
    return {"tokens_BxT": tokens, "mask_BxT": mask, "loss_mask_BxT": loss_mask}


def completion_logits(module, tokens_BxT, mask_BxT, start: int):
    """Logits predicting tokens[start:], from hidden states at positions start-1 .. T-2.

    Used with `CausalLM.apply(..., method=completion_logits)`; returns [B, T - start, V].
    """
    positions_BxT = jnp.maximum(jnp.cumsum(mask_BxT, axis=1) - 1, 0)
    hidden_BxTxD, _ = module.hidden_states(tokens_BxT, positions_BxT, mask_BxT)
    hidden_BxCxD = hidden_BxTxD[:, start - 1 : -1]
    if module.config.tie_embeddings:
        return module.transformer.embedder.attend(hidden_BxCxD)
    return module.lm_head(hidden_BxCxD)


def sft_loss(params, batch: SFTBatch, *, model, prompt_len: int):
    logits_BxCxV = model.apply(
        {"params": params}, batch.tokens_BxT, batch.mask_BxT, prompt_len, method=completion_logits
    )
    targets_BxC = batch.tokens_BxT[:, prompt_len:]
    weights_BxC = batch.loss_mask_BxT[:, prompt_len:]
    logp_BxC = jnp.take_along_axis(
        jax.nn.log_softmax(logits_BxCxV, axis=-1), targets_BxC[..., None], axis=-1
    )[..., 0]
    num_tokens = jnp.maximum(weights_BxC.sum(), 1.0)
    loss = -(logp_BxC * weights_BxC).sum() / num_tokens
    correct = (jnp.argmax(logits_BxCxV, -1) == targets_BxC) * weights_BxC
    return loss, {"loss": loss, "token_accuracy": correct.sum() / num_tokens}


def train_step(state: SFTState, batch: SFTBatch, *, model, optimizer, prompt_len: int):
    """One AdamW step on the completion cross-entropy; returns (state, metrics)."""
    grad_fn = jax.value_and_grad(
        functools.partial(sft_loss, model=model, prompt_len=prompt_len), has_aux=True
    )
    (_, aux), grads = grad_fn(state.params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    aux = {**aux, "grad_norm": optax.tree.norm(grads)}
    return SFTState(step=state.step + 1, params=params, opt_state=opt_state), aux


def make_optimizer(sft: SFTConfig) -> optax.GradientTransformation:
    schedule = optax.join_schedules(
        [
            optax.linear_schedule(0.0, sft.lr, max(sft.warmup_steps, 1)),
            optax.constant_schedule(sft.lr),
        ],
        [max(sft.warmup_steps, 1)],
    )
    return optax.chain(
        optax.clip_by_global_norm(sft.grad_clip) if sft.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=sft.weight_decay),
    )


def state_shardings(model, optimizer, mesh, rules) -> SFTState:
    """An SFTState of NamedShardings: params per `rules`, AdamW moments following their params
    (boxed abstract init), the step count replicated."""
    boxed_params = sharding.abstract_params(model)
    boxed_opt = jax.eval_shape(optimizer.init, boxed_params)
    return SFTState(
        step=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
        params=sharding.shardings_for(boxed_params, mesh, rules),
        opt_state=sharding.shardings_for(boxed_opt, mesh, rules),
    )


def jit_train_step(model, optimizer, prompt_len: int, state_sh: SFTState):
    """`train_step` jitted with the state's shardings and the state donated; call (and lower)
    it inside `sharding.mesh_rules(mesh, rules)`."""
    return jax.jit(
        functools.partial(train_step, model=model, optimizer=optimizer, prompt_len=prompt_len),
        out_shardings=(state_sh, None),
        donate_argnums=0,
    )


def run_sft(cfg, workdir: str) -> dict:
    """Fine-tunes the policy on (prompt, completion) pairs and checkpoints its params."""
    sft = to_dataclass(SFTConfig, cfg.sft, "sft")
    if sft.num_steps == 0:
        raise ValueError("config.sft.num_steps is 0: nothing to do")
    if sft.batch_size % jax.process_count():
        raise ValueError(f"config.sft.batch_size ({sft.batch_size}) must divide over processes")
    workdir = workdir_lib.as_path(workdir)  # local or gs://
    spec, model_cfg = task_data.task_spec(cfg), policy_init.model_config(cfg)
    tokenizer = run_tokenizer.load_tokenizer(cfg, model_cfg)
    prompt_len = max(cfg.data.prompt_buckets)
    completion_len = sft.max_len - prompt_len
    if completion_len <= 0:
        raise ValueError(
            f"config.sft.max_len ({sft.max_len}) must exceed the prompt bucket {prompt_len}"
        )
    pairs = load_pairs(cfg, spec, tokenizer)
    arrays = encode_pairs(pairs, tokenizer, prompt_len, completion_len)
    num_pairs = len(arrays["tokens_BxT"])
    it = data_order.ShardedSampler(
        num_pairs, sft.batch_size, cfg.seed, jax.process_index(), jax.process_count()
    )

    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.TRAIN_RULES
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if sft.batch_size % dp:
        raise ValueError(
            f"config.sft.batch_size ({sft.batch_size}) must divide by data*fsdp ({dp})"
        )
    model = models.CausalLM(lora.base_config(model_cfg))  # SFT trains the full model
    params = policy_init.load_policy_params(cfg, model, mesh, rules, jax.random.key(cfg.seed))
    logging.info(
        "SFT: %d pairs, policy %.2fM params", num_pairs, policy_init.param_count(params) / 1e6
    )
    optimizer = make_optimizer(sft)
    state_sh = state_shardings(model, optimizer, mesh, rules)
    with sharding.mesh_rules(mesh, rules):
        opt_state = jax.jit(optimizer.init, out_shardings=state_sh.opt_state)(params)
    step0 = jax.device_put(jnp.zeros((), jnp.int32), state_sh.step)
    state = SFTState(step=step0, params=params, opt_state=opt_state)
    step_fn = jit_train_step(model, optimizer, prompt_len, state_sh)
    ckpt = checkpoint.CheckpointManager(
        workdir / checkpoint.CHECKPOINT_DIR, max_to_keep=1, async_save=False
    )
    start = ckpt.latest_step() or 0
    if start:  # resume: params, optimiser state, step and data order continue exactly
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _saved(state)
        )
        saved, meta = ckpt.restore(start, target=target)
        state = SFTState(**saved)
        it.set_state(meta["data"])
        logging.info("SFT resumed from step %d", start)
    writer = metrics.MetricsWriter(
        workdir, total_steps=sft.num_steps, start_step=start, tensorboard=cfg.logging.tensorboard,
        progress=cfg.logging.progress, desc="sft", wandb=cfg.logging.get("wandb"),
    )  # fmt: skip
    pending, t0 = None, time.time()
    for step in range(start + 1, sft.num_steps + 1):
        idx = next(it)
        local = {k: v[idx] for k, v in arrays.items()}
        batch = SFTBatch(**sharding.global_batch(local, mesh, rules))
        with sharding.mesh_rules(mesh, rules):
            state, aux = step_fn(state, batch)
        if pending is not None:  # fetch step t-1's metrics after dispatching step t
            _log_sft(writer, *pending)
        pending = (step, aux, time.time() - t0)
        if sft.checkpoint_every and step % sft.checkpoint_every == 0 and step < sft.num_steps:
            ckpt.save(step, _saved(state), {"stage": "sft", "data": it.get_state()})
    if pending is not None:
        _log_sft(writer, *pending)
    if start < sft.num_steps:
        ckpt.save(sft.num_steps, _saved(state), {"stage": "sft", "data": it.get_state()})
    ckpt.close()
    writer.close()
    return state.params


def _saved(state: SFTState) -> dict:
    """The checkpointed state: PPO reads only "params" (`checkpoint.restore_params`)."""
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step}


def _log_sft(writer, step, aux, elapsed):
    values = {f"sft/{k}": float(v) for k, v in jax.device_get(aux).items()}
    if not np.isfinite(values["sft/loss"]):
        raise FloatingPointError(f"SFT step {step}: loss is {values['sft/loss']}")
    values["sft/elapsed_s"] = elapsed
    writer.write(step, values)
