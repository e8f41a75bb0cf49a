"""The multi-turn search agent: the protocol as text (`protocol`, no JAX) and the rollout loop
that pauses decoding at `</search>`, searches, and resumes on the KV cache (`decode`)."""
