"""The decoding core: Jacobi and multi-block decoding, exact against greedy (and sampled) AR decoding.

    core        DecodeFields (block size, token budget, guesses), special tokens, left padding
    modes       the decoding modes, named once (jacobi, ar, multiblock) and their generate functions
    jacobi      one Jacobi block per row: the pass, the commit rule, the shared decode loop
    multiblock  several blocks in flight per row
    kv_cache    the reserved cache layer a block's rows are written to and rolled back from
    guesses     initial guesses of a block (prompt n-grams, random tokens, ...)
    sampling    exact sampling inside Jacobi iterations (the same tokens as AR sampling, same seed)

What this layer may import: torch, transformers, `cllm.models.loading` (a model's cache and context),
`cllm.errors` and `cllm.config`; never Ray, a stage, the serving layers or the training code. Serving,
collection and evaluation call it. This file imports nothing, so naming the package costs no torch import.
"""
