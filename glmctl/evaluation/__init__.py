"""Evaluation on GLM-130B-format tasks (docs/glm130b.md §4.4, §9), used by ``glmctl evaluate``.

    tasks     task YAMLs (GLM-130B's format, read unmodified), file groups, task hashes
    data      the JSON-lines data, validated line by line
    scoring   batched log-prob scoring: packed multiple choice, LM windows, request cache
    runner    the protocols (mul, gen, lm, LAMBADA both ways) and their metrics
    metrics   EM/F1 (SQuAD normalisation, CJK-aware), perplexities, aggregation
    results   results.json in lm-eval's layout, the table
"""
