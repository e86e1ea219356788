"""llmprune perplexity as an ``evaluate`` metric: the same declared protocol as llmprune's reports.

Load it from its local path (no Hub needed): ``evaluate.load(llmprune.metrics.PERPLEXITY)``.
"""

import datasets
import evaluate

_DESCRIPTION = """Perplexity of a causal LM on the given texts under llmprune's declared protocol: the texts
are joined with a blank line and tokenised once without special tokens; the token stream is cut
into non-overlapping windows of `seqlen` tokens (a shorter tail is dropped); BOS is prepended to
each window when the tokenizer adds one itself; ppl = exp(sum NLL / predicted tokens)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the evaluation texts, in order.
    model_id (str): Hub id, local folder (e.g. an llmprune output folder) or llmprune's alias "llama".
    seqlen (int): tokens per window (default 1024).
    max_tokens (int): evaluate at most this many tokens (default: all).
    device (str): "cpu", "cuda", ... (default: cuda when available).
    dtype (str): "float32" (default), "bfloat16" or "float16".
Returns:
    perplexity, nll_sum, predicted_tokens, windows, seqlen, bos_prepended, protocol.
Examples:
    >>> metric = evaluate.load(llmprune.metrics.PERPLEXITY)
    >>> metric.compute(predictions=[open("book.txt").read()], model_id="pruned/my-model", seqlen=512)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LlmprunePerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
            reference_urls=[],  # llmprune is not published on PyPI
        )

    def _compute(self, predictions, model_id, seqlen=1024, max_tokens=None, device=None, dtype="float32"):
        from llmprune.api import check_device
        from llmprune.data import _encode
        from llmprune.evaluate import perplexity, tokenizer_adds_bos
        from llmprune.models.loading import load_model

        compute = check_device("auto" if device is None else device)
        model, tokenizer = load_model(model_id, dtype=dtype)
        ids = _encode(tokenizer, "\n\n".join(predictions))  # [T]
        if max_tokens is not None:
            ids = ids[:max_tokens]
        bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
        model.to(compute)
        return perplexity(model, ids, seqlen, bos, compute, progress=False).as_dict()
