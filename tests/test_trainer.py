"""The PPO run manager end to end on a tiny model, a tiny BM25 corpus and 8 CPU devices:
metrics + checkpoint of a run, kill (SIGTERM) and resume bit for bit, the non-finite stop."""

import functools
import json
import os
import signal

import jax
import ml_collections
import numpy as np
import pytest
import trainer_fixtures as fx

from deepretrieval_jax import checkpoint, metrics
from deepretrieval_jax.config import TrainConfig
from deepretrieval_jax.rl import rollout, sft, trainer

NUM_STEPS = 2


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    # Several runs compile the same programs: share them through JAX's persistent cache.
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _train(workdir, num_steps=NUM_STEPS, **overrides):
    cfg = fx.tiny_config(num_steps)
    for key, value in overrides.items():
        section, field = key.split("__")
        setattr(cfg[section], field, value)
    ex = fx.examples()
    return trainer.train(cfg, workdir, train_examples=ex, val_examples=ex, backend=fx.backend())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    return workdir, _train(workdir, train__val_every=NUM_STEPS)  # validates at the end


def test_run_writes_metrics_tensorboard_and_checkpoints(full_run):
    workdir, result = full_run
    assert result.step == NUM_STEPS and not result.preempted
    records = metrics.read_jsonl(workdir / metrics.JSONL_NAME)
    train_rows = [r for r in records if "ppo/policy_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, NUM_STEPS + 1))
    row = train_rows[-1]
    for key in (
        "reward/mean", "reward/invalid_fraction", "reward/format_ok", "kl/mean", "ppo/entropy",
        "ppo/grad_norm_actor", "ppo/grad_norm_critic", "ppo/explained_variance",
        "ppo/clip_frac" if "ppo/clip_frac" in row else "ppo/policy_loss",
        "response/length_mean", "pool/samples", "time/generate_s", "time/reward_wait_s",
        "time/update_wait_s", "throughput/tokens_per_s", "reward/task/scifact/mean",
        "time/logprobs_s", "time/ref_logprobs_s", "time/values_s", "time/advantages_s",
        "time/update_s",
    ):  # fmt: skip
        assert key in row, f"missing metric {key}; have {sorted(row)}"
    assert any(k.startswith("reward/bucket/scifact/") for k in row)
    assert np.isclose(sum(v for k, v in row.items() if k.startswith("reward/bucket/")), 1.0)
    assert any("val/reward/mean" in r for r in records), "no end-of-run validation record"
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    assert (workdir / metrics.PLOT_NAME).exists()

    mgr = checkpoint.CheckpointManager(workdir / "checkpoints", async_save=False)
    assert mgr.latest_step() == NUM_STEPS
    state, meta = mgr.restore()
    mgr.close()
    assert meta["step"] == NUM_STEPS and "data" in meta
    assert int(state["step"]) == NUM_STEPS
    np.testing.assert_array_equal(
        state["actor_params"]["transformer"]["final_norm"]["scale"],
        jax.device_get(result.state.actor_params["transformer"]["final_norm"]["scale"]),
    )


def test_sigterm_then_resume_is_bitwise_identical(full_run, tmp_path, monkeypatch):
    _, reference = full_run
    original_step = trainer._Run.step

    def step_then_sigterm(self, step):
        out = original_step(self, step)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the preemption notice arrives mid-run
        return out

    monkeypatch.setattr(trainer._Run, "step", step_then_sigterm)
    handler_before = signal.getsignal(signal.SIGTERM)
    first = _train(tmp_path)
    assert first.preempted and first.step == 1
    assert signal.getsignal(signal.SIGTERM) == handler_before  # handler restored on exit
    monkeypatch.setattr(trainer._Run, "step", original_step)

    resumed = _train(tmp_path)
    assert resumed.step == NUM_STEPS and not resumed.preempted
    assert fx.params_digest(resumed.state.actor_params) == fx.params_digest(
        reference.state.actor_params
    ), "resumed actor params differ from the uninterrupted run"
    assert fx.params_digest(resumed.state.critic_params) == fx.params_digest(
        reference.state.critic_params
    )
    steps = [r["step"] for r in metrics.read_jsonl(tmp_path / metrics.JSONL_NAME)
             if "ppo/policy_loss" in r]  # fmt: skip
    assert steps == [1, 2]


def test_cpu_budget_stops_after_the_step_that_spends_it_and_checkpoints(tmp_path, capsys):
    result = _train(tmp_path, num_steps=5, train__cpu_budget_minutes=1e-9)
    assert result.step == 1 and not result.preempted
    assert "CPU budget of 1e-09 min spent at step 1" in capsys.readouterr().out
    mgr = checkpoint.CheckpointManager(tmp_path / "checkpoints", async_save=False)
    assert mgr.latest_step() == 1
    mgr.close()


def test_cpu_budget_stops_after_the_crossing_step_or_at_the_nearest_boundary():
    after, nearest = (TrainConfig(cpu_budget_stop=r) for r in ("after", "nearest"))
    budget = 600.0
    # Steps of 100 s: "after" stops past the budget; "nearest" stops when the next step would
    # end farther above it than the spend now is below it (a tie stops).
    assert [trainer.budget_spent(u, 100.0, budget, after) for u in (500, 600, 601)] == [
        False, False, True,
    ]  # fmt: skip
    assert [trainer.budget_spent(u, 100.0, budget, nearest) for u in (540, 550, 560)] == [
        False, True, True,
    ]  # fmt: skip
    # A 400 s step at 350 s spent: one more would end at 750 (150 over) vs 250 under: go on.
    assert not trainer.budget_spent(350.0, 400.0, budget, nearest)
    assert trainer.budget_spent(401.0, 400.0, budget, nearest)
    with pytest.raises(ValueError, match="cpu_budget_stop"):
        TrainConfig(cpu_budget_stop="closest")


def test_overlong_filter_masks_exactly_the_truncated_rows_out_of_the_update(tmp_path):
    # 4 new tokens: the tiny random policy runs out of tokens on most rows, not on all.
    _train(tmp_path, num_steps=1, sampling__max_new_tokens=4, ppo__overlong_filter=True)
    row = next(
        r for r in metrics.read_jsonl(tmp_path / metrics.JSONL_NAME) if "ppo/policy_loss" in r
    )
    rows = row["pool/samples"]
    truncated = round(row["response/truncated_fraction"] * rows)
    assert 0 < truncated, "no truncated row: the test would not exercise the filter"
    assert row["ppo/invalid_count"] == truncated  # the reward pool itself failed no row
    assert row["reward/invalid_fraction"] == 0.0


def test_non_finite_rewards_stop_the_run_naming_the_step(tmp_path, monkeypatch):
    real_result_arrays = rollout.result_arrays

    def nan_scores(results):
        scores, valid = real_result_arrays(results)
        return np.full_like(scores, np.nan), valid

    monkeypatch.setattr(rollout, "result_arrays", nan_scores)
    with pytest.raises(trainer.NonFiniteError, match=r"PPO step 2: 2 consecutive steps skipped"):
        _train(tmp_path, num_steps=5, ppo__max_consecutive_skips=2)
    records = metrics.read_jsonl(tmp_path / metrics.JSONL_NAME)
    assert [r["ppo/skipped"] for r in records if "ppo/skipped" in r] == [1.0, 1.0]


def test_examples_left_out_of_validation_are_not_scored(tmp_path):
    # A fixed-shape validation batch pads the last chunk; padded rows must not count.
    parts = [rollout.summarize_results([], np.zeros(0, int), np.zeros(0, int), "val/", "t")]
    merged = rollout.merge_summaries(parts)
    assert merged["val/reward/mean"] == 0.0 and merged["val/reward/invalid_fraction"] == 0.0
    assert json.loads(json.dumps(merged)) == merged


def test_sft_checkpoint_starts_ppo_from_the_data_dir(tmp_path):
    # The real data path: BEIR files on disk, BM25 built from them, SFT -> PPO init.
    cfg = fx.tiny_config(num_steps=1)
    cfg.data.data_dir = str(fx.write_beir(tmp_path / "data"))
    cfg.sft.num_steps, cfg.sft.batch_size, cfg.sft.max_len = 2, 8, 160
    sft_params = sft.run_sft(cfg, tmp_path / "sft")
    records = metrics.read_jsonl(tmp_path / "sft" / metrics.JSONL_NAME)
    assert [r["step"] for r in records] == [1, 2] and records[-1]["sft/loss"] > 0

    cfg.model.init_checkpoint = str(tmp_path / "sft" / "checkpoints")
    result = trainer.train(cfg, tmp_path / "ppo")
    assert result.step == 1
    ref = jax.device_get(result.state.ref_params)  # reference = the SFT policy, untouched
    assert fx.params_digest(ref) == fx.params_digest(sft_params)
    # The critic's trunk started from the SFT policy's trunk (then took one update).
    assert result.state.critic_params["transformer"]["embedder"]["embedding"].shape == (
        sft_params["transformer"]["embedder"]["embedding"].shape
    )


def test_pubmed_backend_requires_the_configured_api_key(monkeypatch):
    from configs import pubmed
    from deepretrieval_jax.data import task_data

    cfg = pubmed.get_config()
    spec = task_data.task_spec(cfg)
    monkeypatch.delenv("NCBI_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"config.reward.api_key_env: \$NCBI_API_KEY is not set"):
        trainer._make_backend(cfg, spec)
    monkeypatch.setenv("NCBI_API_KEY", "k")
    backend = trainer._make_backend(cfg, spec)
    assert backend.has_api_key and backend.config.rate_per_s == cfg.reward.rate_per_s


def test_sft_restarted_in_its_workdir_resumes_bitwise(tmp_path):
    cfg = fx.tiny_config()
    cfg.data.data_dir = str(fx.write_beir(tmp_path / "data"))
    cfg.sft.batch_size, cfg.sft.max_len, cfg.sft.warmup_steps = 8, 160, 2
    cfg.sft.num_steps = 3
    straight = sft.run_sft(cfg, tmp_path / "straight")
    cfg.sft.num_steps, cfg.sft.checkpoint_every = 2, 1
    sft.run_sft(cfg, tmp_path / "resumed")  # "killed" after step 2
    cfg.sft.num_steps = 3
    resumed = sft.run_sft(cfg, tmp_path / "resumed")
    assert fx.params_digest(resumed) == fx.params_digest(straight)
    steps = [r["step"] for r in metrics.read_jsonl(tmp_path / "resumed" / metrics.JSONL_NAME)]
    assert steps == [1, 2, 3]


def test_shared_critic_run_checkpoints_a_value_head_that_hf_export_drops(tmp_path):
    from deepretrieval_jax import hf_io
    from deepretrieval_jax.rl import policy_init

    cfg = fx.tiny_config(num_steps=1)
    cfg.ppo.critic = "shared"
    ex = fx.examples()
    result = trainer.train(cfg, tmp_path, train_examples=ex, val_examples=ex, backend=fx.backend())
    assert result.step == 1 and result.state.critic_params is None
    assert "value_head" in result.state.actor_params
    assert np.isfinite(result.last_metrics["ppo/value_loss"])
    assert "ppo/grad_norm_critic" not in result.last_metrics  # one optimiser
    assert result.last_metrics["time/values_s"] >= 0.0

    model_cfg = policy_init.model_config(cfg)
    params = checkpoint.restore_policy_params(tmp_path, model_cfg)  # value_head left unread
    assert "value_head" not in params
    with_head = {**params, "value_head": result.state.actor_params["value_head"]}
    hf_io.save_params(with_head, model_cfg, tmp_path / "hf")  # dropped with a log line
    _, loaded = hf_io.load_params(tmp_path / "hf", model_cfg)
    assert fx.params_digest(loaded) == fx.params_digest(params)
    assert fx.params_digest(params) == fx.params_digest(
        {k: v for k, v in result.state.actor_params.items() if k != "value_head"}
    )


def test_dynamic_sampling_bf16_sampler_and_tis_are_logged(tmp_path):
    """GRPO with DAPO dynamic sampling (2x candidates), a bf16 sampler and TIS: the run keeps
    its batch shape and logs the dropped fraction and the sampler-trainer mismatch each step."""
    _train(
        tmp_path, sampling__n=2, sampling__dynamic_sampling=True, sampling__dynamic_oversample=2,
        sampling__compute_dtype="bfloat16", ppo__advantage_estimator="grpo", ppo__tis_cap=2.0,
        ppo__kl_in_reward=False,
    )  # fmt: skip
    records = metrics.read_jsonl(tmp_path / metrics.JSONL_NAME)
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
    for r in records:
        assert 0.0 <= r["dynamic/zero_variance_fraction"] <= 1.0
        assert r["dynamic/candidate_groups"] == 16  # 2 x 8 prompts
        assert r["ppo/mismatch_abs_logp_diff_mean"] > 1e-4  # bf16 sampler vs fp32 trainer
        assert 0.0 < r["ppo/tis_weight_mean"] <= 2.0


def test_lora_run_checkpoints_adapters_only_resumes_and_exports_merged(tmp_path, monkeypatch):
    """config.model.lora.rank > 0: the checkpoint holds the adapters and their optimiser state,
    no base; a resumed run reloads the base; the merged export reproduces the adapter forward."""
    from deepretrieval_jax import lora_export
    from deepretrieval_jax.models import CausalLM, lora
    from deepretrieval_jax.rl import policy_init
    from deepretrieval_jax.rl.state import policy_params

    cfg = fx.tiny_config(NUM_STEPS)
    cfg.model.lora.rank = 4
    ex = fx.examples()
    run = functools.partial(trainer.train, train_examples=ex, val_examples=ex, backend=fx.backend())
    first = run(cfg, tmp_path)
    saved = checkpoint.saved_structure(tmp_path / "checkpoints", NUM_STEPS)
    assert lora.is_adapter_tree(saved["actor_params"])
    assert not saved.get("ref_params")  # the frozen base is not checkpointed
    n_adapter = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(saved["actor_params"]))
    n_opt = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(saved["actor_opt_state"]))
    assert n_adapter < n_opt <= 2 * n_adapter + 8  # AdamW moments of the adapters (+ counts)
    base = first.state.ref_params
    cfg.train.num_steps = NUM_STEPS + 1
    resumed = run(cfg, tmp_path)
    assert resumed.step == NUM_STEPS + 1
    for a, b in zip(jax.tree.leaves(resumed.state.ref_params), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same base, reloaded
    model_cfg = policy_init.model_config(cfg)
    vocab = model_cfg.vocab_size
    mesh = jax.tree.leaves(base)[0].sharding.mesh  # the adapters restored beside the base
    merged = lora_export.merged_policy_params(tmp_path, model_cfg, base, mesh=mesh)
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6) % vocab
    args = (tokens, np.broadcast_to(np.arange(6), (2, 6)), np.ones((2, 6), bool))
    want = CausalLM(model_cfg).apply({"params": policy_params(resumed.state)}, *args)[0]
    got = CausalLM(lora.base_config(model_cfg)).apply({"params": merged}, *args)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    with pytest.raises(checkpoint.CheckpointError, match="LoRA adapters only"):
        checkpoint.restore_policy_params(tmp_path, lora.base_config(model_cfg))

    # Evaluation of the run's directory merges its adapters onto the same base.
    from deepretrieval_jax import eval as eval_lib

    seen = {}

    def capture(model_config, params, *args, **kw):
        seen.update(config=model_config, params=params)
        return lambda prompts: [""] * len(prompts)

    ecfg = cfg.copy_and_resolve_references()
    with ecfg.unlocked():
        ecfg.eval = ml_collections.ConfigDict(
            dict(checkpoint_dir=str(tmp_path), step=-1, checkpoint_key="actor_params", batch_size=2)
        )
    monkeypatch.setattr(eval_lib, "policy_generate_fn", capture)
    eval_lib._policy(ecfg, eval_lib.DecodeSpec(max_new_tokens=2))
    assert seen["config"] == lora.base_config(model_cfg)
    got = CausalLM(seen["config"]).apply({"params": seen["params"]}, *args)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
