"""Serving a trained policy: query rewriting (CLI) and an HTTP service with batching.

`policy` loads params + tokenizer and generates; `rewrite` turns task inputs into prompts and
completions into queries and search results; `scheduler` batches concurrent requests onto the
device; `server` is the aiohttp app (`/v1/rewrite` and an OpenAI-compatible subset).
"""
