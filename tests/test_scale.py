"""ImageNet-scale evaluation pieces: chunked float64 statistics (any bank dtype), chunked faiss adds, IVF at size."""

from __future__ import annotations

import faiss
import pytest
import torch

import ood.detectors.mahalanobis as mahalanobis_module
import ood.neighbors as knn_module
from ood.detectors import build_detector, float16_detectors
from ood.features.bank import FeatureBank
from ood.neighbors import KNNIndex


def _banks(dtype: torch.dtype = torch.float32) -> tuple[FeatureBank, FeatureBank]:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(50)
    centres = torch.randn(4, 16, generator=gen) * 3
    feats = (centres[labels] + torch.randn(200, 16, generator=gen)).to(torch.float16).to(dtype)
    w, b = torch.randn(4, 16, generator=gen), torch.randn(4, generator=gen)
    test = (torch.randn(30, 16, generator=gen) * 3).to(torch.float16).to(dtype)
    make = lambda f, y: FeatureBank(logits=f.float() @ w.T + b, features=f, labels=y, weight=w, bias=b)  # noqa: E731
    return make(feats, labels), make(test, None)


@pytest.mark.parametrize("name, kwargs", [("mahalanobis", {}), ("rmds", {}), ("vim", {"dim": 8}), ("knn", {"k": 5})])
def test_chunked_and_float16_banks_give_the_whole_bank_scores(name: str, kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 7 rows and float16 banks (same values) reproduce the one-chunk float32 scores."""
    train, test = _banks()
    expected = build_detector(name, **kwargs).fit(train).score(test)
    monkeypatch.setattr(mahalanobis_module, "CHUNK", 7)
    monkeypatch.setattr(knn_module, "ADD_CHUNK", 7)
    chunked = build_detector(name, **kwargs).fit(train).score(test)
    assert torch.allclose(chunked, expected, rtol=1e-9, atol=1e-9)
    train16, test16 = _banks(torch.float16)
    half = build_detector(name, **kwargs).fit(train16).score(test16)
    assert torch.allclose(half, expected, rtol=1e-5, atol=1e-5)


def test_auto_index_switches_to_ivf_at_size(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(1))
    q = torch.randn(20, 8, generator=torch.Generator().manual_seed(2))
    exact = KNNIndex("l2", kind="auto", device="cpu").add(x)
    assert isinstance(exact._index, faiss.IndexFlat)
    monkeypatch.setattr(knn_module, "AUTO_IVF_ROWS", 300)
    ivf = KNNIndex("l2", kind="auto", nlist=4, nprobe=4, device="cpu").add(x)
    assert isinstance(ivf._index, faiss.IndexIVFFlat)
    # every cell probed: IVF equals exact search
    d_exact, i_exact = exact.search(q, 3)
    d_ivf, i_ivf = ivf.search(q, 3)
    assert torch.equal(i_ivf, i_exact) and torch.allclose(d_ivf, d_exact, atol=1e-4)


@pytest.mark.slow
def test_float16_feature_banks_end_to_end(tmp_path) -> None:
    """Digits with float16 features: knn/mahalanobis within 1e-3 AUROC of the float32 run; unsupported detectors refused."""
    from helpers import NO_FIGURES, compose_config, run_config

    from ood.errors import ConfigError
    from ood.utils import instantiate

    common = ["trainer.max_epochs=1", "trainer.enable_progress_bar=false", "detectors.names=[knn,mahalanobis]", "detectors.tune=false",
              NO_FIGURES]
    full = {(r["detector"], r["ood_dataset"]): r["auroc"] for r in run_config(tmp_path / "a", common)}
    half = {(r["detector"], r["ood_dataset"]): r["auroc"] for r in run_config(tmp_path / "b", [*common, "evaluation.feature_dtype=float16"])}
    assert full.keys() == half.keys() and max(abs(full[k] - half[k]) for k in full) < 1e-3
    with pytest.raises(ConfigError, match="float16 supports the detectors .* not \\['odin'\\]"):
        instantiate(compose_config(tmp_path, ["detectors.names=[knn,odin]", "evaluation.feature_dtype=float16"]).evaluation)


def test_float16_refusal_names_the_override_that_runs_the_rest(tmp_path) -> None:
    """`detectors=all` with float16 features is refused with the `detectors.exclude=[...]` to type (its network-pass
    detectors), and that override alone makes the same command start (before, the refusal listed names and left the
    user to write it); `detectors=fast`, every cached detector, starts as it is."""
    import re

    from helpers import compose_config

    from ood.errors import ConfigError
    from ood.utils import instantiate

    names = lambda overrides: {d.name for d in instantiate(compose_config(tmp_path, overrides).evaluation).evaluator.detectors}  # noqa: E731
    every = names(["detectors=all"])
    common = ["detectors=all", "evaluation.feature_dtype=float16"]
    with pytest.raises(ConfigError) as refused:
        instantiate(compose_config(tmp_path, common).evaluation)
    override = re.search(r"detectors\.exclude=\[[a-z_0-9,]+\]", str(refused.value))
    assert override is not None, str(refused.value)
    evaluation = instantiate(compose_config(tmp_path, [*common, override.group()]).evaluation)
    assert evaluation.feature_dtype == torch.float16
    assert {d.name for d in evaluation.evaluator.detectors} == every & set(float16_detectors())
    assert every - set(float16_detectors()) == {"mcdropout", "nac", "odin", "rankfeat"}
    assert names(["detectors=fast", "evaluation.feature_dtype=float16"]) == names(["detectors=fast"])
