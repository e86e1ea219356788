"""Metrics packaged for the ``evaluate`` library.

    import evaluate, llmprune.metrics
    ppl = evaluate.load(llmprune.metrics.PERPLEXITY)          # a local path: no Hub, works offline
    ppl.compute(predictions=texts, model_id="path/to/folder")  # same protocol as llmprune's reports
"""

from pathlib import Path

PERPLEXITY = str(Path(__file__).resolve().parent / "llmprune_perplexity")
