"""Benchmarks: one harness, one module per table, one command.

Layering (each module imports only those below it; ``tests/test_bench_layout.py`` checks it):

    command    ``fastadapters bench``: runs the tables, prints the summary, then the tables
    training   the training-step table (adapters vs PEFT LoRA and the frozen base)
    kernels    the per-layer kernel table (fused ops vs PEFT's layer and the plain linear; decode rows)
    layers     the multi-adapter layer table (one linear serving B rows from A adapters)
    e2e        the end-to-end serving table (the engine over a request stream, vs base-only and PEFT)
    harness    time_fn, saved_activation_bytes, environment, append_results, the summary/verdict lines

The scripts in ``bench/`` are thin entry points over these modules. Importing this package imports
nothing else (no torch): ``fastadapters bench --help`` answers at once.
"""
