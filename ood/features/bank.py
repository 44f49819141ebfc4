"""`FeatureBank`: the cached outputs of one forward pass over one split, the input of every detector."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class FeatureBank:
    """Per-sample outputs of one split plus the final linear layer.

    logits [N, C], features [N, D] (penultimate), labels [N] or None (OOD sets), weight [C, D] and bias [C]
    of the last layer; `extras` holds whatever a method declared for the cache (e.g. an early-layer map),
    `index` the dataset index of each row (rows are sorted by it).
    """

    logits: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    index: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.logits.shape[0]
        if self.features.shape[0] != n:
            raise ValueError(f"logits have {n} rows but features {self.features.shape[0]}")
        if self.labels is not None and self.labels.shape[0] != n:
            raise ValueError(f"logits have {n} rows but labels {self.labels.shape[0]}")

    def __len__(self) -> int:
        return self.logits.shape[0]

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(1)

    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) of the final linear layer; raises when the bank was built without them."""
        if self.weight is None or self.bias is None:
            raise ValueError("this FeatureBank has no final-layer weight/bias; pass weight= and bias=")
        return self.weight, self.bias

    def subset(self, rows: torch.Tensor) -> FeatureBank:
        """The bank restricted to `rows` (a boolean mask or index tensor); head and extras follow."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return replace(
            self,
            logits=self.logits[rows],
            features=self.features[rows],
            labels=pick(self.labels),
            index=pick(self.index),
            extras={k: v[rows] for k, v in self.extras.items()},
        )

    def to(self, device: torch.device | str) -> FeatureBank:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            logits=self.logits.to(device),
            features=self.features.to(device),
            labels=move(self.labels),
            weight=move(self.weight),
            bias=move(self.bias),
            index=move(self.index),
            extras={k: v.to(device) for k, v in self.extras.items()},
        )
