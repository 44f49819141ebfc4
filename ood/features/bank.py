"""`FeatureBank`: the cached outputs of one forward pass over one split, the input of every detector."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

#: rows per chunk of the finiteness check (65536 x 2048 float32 = 512 MiB at the widest backbone)
ROW_CHUNK = 65536


def row_slices(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most `size` rows covering `n` rows (none for `n` = 0): the blocks a bank is read in
    when a whole-bank float64 or pairwise tensor would not fit."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


@dataclass
class FeatureBank:
    """Per-sample outputs of one split plus the final linear layer.

    logits [N, C], features [N, D] (penultimate) or None, labels [N] or None (OOD sets), weight [C, D] and bias [C]
    of the last layer; `extras` holds whatever a method declared for the cache (e.g. an early-layer map),
    `index` the dataset index of each row (rows are sorted by it). Without features (logits precomputed, or a model
    whose penultimate layer is out of reach) the logit-only detectors (msp, energy, ...) run and the others refuse
    the bank in one line (`Detector.reads_features`).
    """

    logits: torch.Tensor
    features: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    index: torch.Tensor | None = None
    #: the (object, version) of logits and features when `nonfinite_rows` last found every row finite: later checks
    #: of the same, unchanged tensors cost nothing (an in-place write bumps the version and they are scanned again)
    _finite_as_of: tuple[int, ...] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = self.logits.shape[0]
        if self.features is not None and self.features.shape[0] != n:
            raise ValueError(f"logits have {n} rows but features {self.features.shape[0]}")
        if self.labels is not None and self.labels.shape[0] != n:
            raise ValueError(f"logits have {n} rows but labels {self.labels.shape[0]}")

    def __len__(self) -> int:
        return self.logits.shape[0]

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(1)

    def nonfinite_rows(self) -> torch.Tensor:
        """[N] bool: rows whose logits or penultimate features (when the bank has them) hold NaN or +-inf. Row chunk
        by row chunk, so a memory-mapped bank is not copied; remembered while the tensors stay as they were when every
        row was finite."""
        n = len(self)
        tensors = [t for t in (self.logits, self.features) if t is not None]
        # tensors carry a version that in-place writes bump; a lazy row view (`NormalisedRows`) is not remembered,
        # nor is an inference tensor (made under `torch.inference_mode`), which has no version: reading it raised
        versions = [None if isinstance(t, torch.Tensor) and t.is_inference() else getattr(t, "_version", None)
                    for t in tensors]
        state = None if None in versions else tuple(x for t, v in zip(tensors, versions) for x in (id(t), v))
        if state is not None and self._finite_as_of == state:
            return torch.zeros(n, dtype=torch.bool, device=self.logits.device)
        chunks = row_slices(n, ROW_CHUNK)
        finite = lambda rows: torch.stack([torch.isfinite(t[rows]).flatten(1).all(1) for t in tensors]).all(0)  # noqa: E731
        bad = torch.cat([~finite(rows) for rows in chunks]) if n else torch.zeros(0, dtype=torch.bool, device=self.logits.device)
        self._finite_as_of = None if bool(bad.any()) else state
        return bad

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
            features=pick(self.features),
            labels=pick(self.labels),
            index=pick(self.index),
            extras={k: v[rows] for k, v in self.extras.items()},
        )

    def to(self, device: torch.device | str) -> FeatureBank:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            logits=self.logits.to(device),
            features=move(self.features),
            labels=move(self.labels),
            weight=move(self.weight),
            bias=move(self.bias),
            index=move(self.index),
            extras={k: v.to(device) for k, v in self.extras.items()},
        )
