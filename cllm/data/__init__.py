"""Trajectory data: collecting Jacobi trajectories with Ray Data and storing them as Parquet rows.

    collect_config  CollectOptions, CollectConfig (no Ray: the pipeline reads them while parsing)
    collect         the collection stage: Ray Data actors decode prompts and write one row per block
    trajectories    plan the prompts, decode a batch, clean and augment its blocks: one row per block
                    (states, fixed point) in an Arrow schema; no Ray
    store           a collection's output folder: which decode batches it holds, its settings manifest

What this layer may import: the decoding core, `cllm.models`, `cllm.tasks` (the prompts), `cllm.config`;
only `collect` imports Ray. Training reads what it writes, never the reverse. This file imports nothing.
"""
