"""Calibration statistics and importance scores of structured units (heads, KV groups, neurons,
layers). Pure tensor functions apart from the small accumulators.

Shapes: hidden size D, query heads Hq, KV heads G = Hq / r, head_dim hd, FFN width I.
A query head h owns q_proj rows and o_proj columns [h*hd, (h+1)*hd); KV head g owns k/v rows
[g*hd, (g+1)*hd) and serves query heads [g*r, (g+1)*r) (the GQA mapping of gpt-fast).
"""

from __future__ import annotations

import torch


class ChannelStats:
    """Per input channel over all calibration tokens: sum and sum of squares (float64 for the
    variance), so mean, variance (FLAP's fluctuation) and L2 norm (Wanda) are all available."""

    def __init__(self, channels: int, device: torch.device):
        self.sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.sum_of_squares = torch.zeros(channels, dtype=torch.float64, device=device)
        self.tokens = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).double()  # [tokens, channels]
        self.sum += x.sum(0)
        self.sum_of_squares += x.pow(2).sum(0)
        self.tokens += x.shape[0]

    def state(self) -> dict[str, torch.Tensor]:
        return {"sum": self.sum, "sum_of_squares": self.sum_of_squares, "tokens": torch.tensor(self.tokens)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.sum, self.sum_of_squares, self.tokens = state["sum"], state["sum_of_squares"], int(state["tokens"])

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.tokens, 1)

    @property
    def variance(self) -> torch.Tensor:
        return (self.sum_of_squares / max(self.tokens, 1) - self.mean.pow(2)).clamp_min(0)

    @property
    def norm(self) -> torch.Tensor:
        return self.sum_of_squares.sqrt()


class LayerChange:
    """Mean over tokens of 1 - cos(input hidden state, output hidden state) of a decoder layer:
    how much the layer changes the residual stream (ShortGPT's block influence)."""

    def __init__(self):
        self.total = 0.0
        self.tokens = 0

    def add_batch(self, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        cos = torch.nn.functional.cosine_similarity(inputs.double(), outputs.double(), dim=-1)  # [b, L]
        self.total += float((1 - cos).sum())
        self.tokens += cos.numel()

    def state(self) -> dict[str, torch.Tensor]:
        return {"total": torch.tensor(self.total, dtype=torch.float64), "tokens": torch.tensor(self.tokens)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.total, self.tokens = float(state["total"]), int(state["tokens"])

    @property
    def value(self) -> float:
        return self.total / max(self.tokens, 1)


def _like(statistic: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Statistics live on the compute device, weights wherever their layer lives."""
    return statistic.to(device=weight.device, dtype=weight.dtype)


def _per_channel(score_rows: torch.Tensor, channels: int, unit: int) -> torch.Tensor:
    """Sum consecutive blocks of ``unit`` entries: [channels] -> [channels / unit]."""
    return score_rows.reshape(channels // unit, unit).sum(-1)


def query_head_scores(score: str, q: torch.Tensor, o: torch.Tensor, head_dim: int, hidden: ChannelStats,
                      attention: ChannelStats) -> torch.Tensor:
    """[Hq] importance of each query head from q_proj [Hq*hd, D] and o_proj [D, Hq*hd]."""
    channels = q.shape[0]
    if score == "magnitude":  # squared weight norm of the unit
        per_channel = q.pow(2).sum(1) + o.pow(2).sum(0)
    elif score == "wanda":  # sum of |W| * ||X_j|| over the unit's weights
        per_channel = (q.abs() @ _like(hidden.norm, q)) + o.abs().sum(0) * _like(attention.norm, o)
    elif score == "flap":  # fluctuation of the o_proj input times the squared column norm
        per_channel = _like(attention.variance, o) * o.pow(2).sum(0)
    else:
        raise ValueError(score)
    return _per_channel(per_channel.double(), channels, head_dim)


def kv_head_scores(score: str, k: torch.Tensor, v: torch.Tensor, head_dim: int, hidden: ChannelStats) -> torch.Tensor:
    """[G] the part of a KV group's importance that lives in k_proj/v_proj [G*hd, D] (FLAP: none)."""
    channels = k.shape[0]
    if score == "magnitude":
        per_channel = k.pow(2).sum(1) + v.pow(2).sum(1)
    elif score == "wanda":
        per_channel = (k.abs() + v.abs()) @ _like(hidden.norm, k)
    else:
        per_channel = torch.zeros(channels, dtype=k.dtype, device=k.device)
    return _per_channel(per_channel.double(), channels, head_dim)


def neuron_scores(score: str, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, hidden: ChannelStats,
                  intermediate: ChannelStats) -> torch.Tensor:
    """[I] importance of each FFN neuron from gate/up [I, D] and down [D, I]."""
    if score == "magnitude":
        result = gate.pow(2).sum(1) + up.pow(2).sum(1) + down.pow(2).sum(0)
    elif score == "wanda":
        result = (gate.abs() + up.abs()) @ _like(hidden.norm, gate) + down.abs().sum(0) * _like(intermediate.norm, down)
    elif score == "flap":
        result = _like(intermediate.variance, down) * down.pow(2).sum(0)
    else:
        raise ValueError(score)
    return result.double()


def standardise(scores: torch.Tensor) -> torch.Tensor:
    """(s - mean) / std within one layer, so that scores of different layers can be ranked
    together (FLAP's adaptive structure search does the same)."""
    std = scores.std() if scores.numel() > 1 else scores.new_tensor(1.0)
    return (scores - scores.mean()) / (std if std > 0 else 1.0)
