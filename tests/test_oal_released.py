"""OAL's released models (HengGao12/OAL README: "pretrained models for testing", "Teacher Model Pretrained Weights")
read as they are (docs/methods/oal.md, "The authors' released models"): files in the released layouts, random
weights, no downloads.

- A student is OpenOOD's `ResNet18_224x224` (openood/networks/resnet18_224x224.py: torchvision's `ResNet(BasicBlock,
  [2, 2, 2, 2])`), saved bare by OpenOOD's recorder (`torch.save(net.module.state_dict() or net.state_dict(),
  'best.ckpt')`, openood/recorders/base_recorder.py), scored by EBO at T = 1 (scripts/ood/ebo/cifar10_test_ood_ebo.sh,
  openood/postprocessors/ebo_postprocessor.py): `ood-eval experiment=cifar10_oal ckpt_path=best.ckpt`.
- A teacher is timm's ViT-B/16 state dict (openood/trainers/oal_trainer.py: `timm.create_model(
  "vit_base_patch16_224.orig_in21k_ft_in1k")` with a 10-class head loading `pytorch_model.bin`, and
  `VisionTransformer(num_classes=100)` loading the fine-tune's `best.ckpt`, both strictly): `method.teacher.ckpt=`.
  Or a Hugging Face `ViTForImageClassification` state dict (configs/networks/vit_cifar100.yml's
  `pytorch_model_cifar100.bin`), checked against a transcription of its forward (openood/networks/ViT2.py).

The layouts are written out here (names and shapes), not taken from ood; the references are the released classes'
own forward (torchvision's ResNet, timm's VisionTransformer) after a strict load, as the released code loads them.
The ViTs have 2 blocks instead of 12 and skip timm's random init (`+method.teacher.backbone.depth=2`,
`weight_init=skip`, timm's arguments: the weights come from the file): the names are the same.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import compose_config

from ood.features.bank import FeatureBank
from ood.models import ResNet18


def _resnet18_224x224_state(num_classes: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """OpenOOD's ResNet18_224x224 parameter and buffer names and shapes, random values (BN statistics included)."""
    def conv(o: int, i: int, k: int) -> dict[str, torch.Tensor]:
        return {"weight": torch.randn(o, i, k, k, generator=gen) * (2 / (i * k * k)) ** 0.5}

    def bn(c: int) -> dict[str, torch.Tensor]:
        return {"weight": 1 + 0.1 * torch.randn(c, generator=gen), "bias": 0.1 * torch.randn(c, generator=gen),
                "running_mean": 0.1 * torch.randn(c, generator=gen), "running_var": 0.5 + torch.rand(c, generator=gen),
                "num_batches_tracked": torch.tensor(100)}

    parts = {"conv1": conv(64, 3, 7), "bn1": bn(64)}
    inp = 64
    for n, width in enumerate((64, 128, 256, 512), start=1):
        for i in range(2):
            block = f"layer{n}.{i}"
            parts |= {f"{block}.conv1": conv(width, inp if i == 0 else width, 3), f"{block}.bn1": bn(width),
                      f"{block}.conv2": conv(width, width, 3), f"{block}.bn2": bn(width)}
            if i == 0 and n > 1:  # stride 2: the 1x1 projection shortcut
                parts |= {f"{block}.downsample.0": conv(width, inp, 1), f"{block}.downsample.1": bn(width)}
        inp = width
    parts["fc"] = {"weight": 0.05 * torch.randn(num_classes, 512, generator=gen),
                   "bias": 0.1 * torch.randn(num_classes, generator=gen)}
    return {f"{module}.{name}": value for module, tensors in parts.items() for name, value in tensors.items()}


def _vit_b16_state(num_classes: int, depth: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """timm's ViT-B/16 (224 px, CLS token, 768-d, MLP 3072) parameter names and shapes with `depth` blocks."""
    shapes = {"cls_token": (1, 1, 768), "pos_embed": (1, 197, 768), "patch_embed.proj.weight": (768, 3, 16, 16),
              "patch_embed.proj.bias": (768,)}
    for i in range(depth):
        b = f"blocks.{i}"
        shapes |= {f"{b}.norm1.weight": (768,), f"{b}.norm1.bias": (768,), f"{b}.attn.qkv.weight": (2304, 768),
                   f"{b}.attn.qkv.bias": (2304,), f"{b}.attn.proj.weight": (768, 768), f"{b}.attn.proj.bias": (768,),
                   f"{b}.norm2.weight": (768,), f"{b}.norm2.bias": (768,), f"{b}.mlp.fc1.weight": (3072, 768),
                   f"{b}.mlp.fc1.bias": (3072,), f"{b}.mlp.fc2.weight": (768, 3072), f"{b}.mlp.fc2.bias": (768,)}
    shapes |= {"norm.weight": (768,), "norm.bias": (768,), "head.weight": (num_classes, 768), "head.bias": (num_classes,)}
    return {k: (1.0 if k.startswith("norm") and k.endswith("weight") else 0.0) + 0.05 * torch.randn(s, generator=gen)
            for k, s in shapes.items()}


def _ebo(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """OpenOOD's EBO confidence as released (ebo_postprocessor.py: T * logsumexp(output / T); the scripts' T = 1)."""
    return temperature * torch.logsumexp(logits / temperature, dim=1)


def test_a_released_oal_student_evaluates_as_released(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ood-eval experiment=<preset> ckpt_path=best.ckpt` fills the student from the released file (the projector,
    CLUB networks and teacher are not in it: OAL's score reads none of them) and scores it as EBO at T = 1. CIFAR-100's
    student differs only in its head (cifar100_oal: the same preset with data=cifar100)."""
    preset, classes = "cifar100_oal", 100
    from torchvision.models.resnet import BasicBlock, ResNet

    import ood.cli
    import ood.train

    state = _resnet18_224x224_state(classes, torch.Generator().manual_seed(classes))
    torch.save(state, tmp_path / "best.ckpt")
    released = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=classes).eval()
    released.load_state_dict(state)  # strict: the transcription is the released network's layout
    loaded = {}

    def load_weights(method: object, path: Path, cfg: object = None) -> None:
        ood.cli.load_weights(method, path, cfg)
        loaded["method"] = method

    monkeypatch.setattr(ood.train, "load_weights", load_weights)
    cfg = compose_config(tmp_path / "eval", [f"experiment={preset}", f"ckpt_path={tmp_path / 'best.ckpt'}",
                                             "trainer=cpu", "evaluate=false", "+method.teacher.backbone.depth=2",
                                             "+method.teacher.backbone.weight_init=skip"], "eval")
    ood.train.run(cfg)
    method = loaded["method"].eval()
    assert isinstance(method.backbone, ResNet18)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # the weights' test: any size
    with torch.no_grad():
        logits, expected = method.backbone.run(x).logits, released(x)
    # the same modules in the same order on the same input: bit for bit (1e-4 let a BatchNorm eps of 2e-5 through)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert float(expected.std()) > 0.1, "logits that say something"
    scores = method.ood_score(FeatureBank(logits=expected))
    torch.testing.assert_close(scores, _ebo(expected).double(), rtol=1e-6, atol=1e-5)


def test_a_released_oal_teacher_loads_under_the_presets_teacher(tmp_path: Path) -> None:
    """`method.teacher.ckpt=pytorch_model.bin` under cifar10_oal's `method/teacher=vit_b16`: the teacher's logits and
    768-d features are timm's VisionTransformer's, strictly loaded from the same file as oal_trainer.py loads it.
    CIFAR-100's teacher (the fine-tune's `best.ckpt`) has the same names and a 100-class head."""
    preset, file, classes = "cifar10_oal", "pytorch_model.bin", 10
    timm = pytest.importorskip("timm")
    from ood.utils import instantiate

    state = _vit_b16_state(classes, 2, torch.Generator().manual_seed(classes))
    torch.save(state, tmp_path / file)
    released = timm.models.vision_transformer.VisionTransformer(num_classes=classes, depth=2, weight_init="skip").eval()
    released.load_state_dict(state)
    cfg = compose_config(tmp_path, [f"experiment={preset}", f"method.teacher.ckpt={tmp_path / file}",
                                    "+method.teacher.backbone.depth=2", "+method.teacher.backbone.weight_init=skip"])
    method = instantiate(cfg.method, backbone=ResNet18(classes))
    method.load_teacher(cfg.method.teacher.ckpt)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = method.teacher.run(x)
        features = released.forward_head(released.forward_features(x), pre_logits=True)
        torch.testing.assert_close(out.logits, released(x), rtol=0, atol=0)  # timm's own modules: bit for bit
    torch.testing.assert_close(out.features, features, rtol=0, atol=0)
    assert out.features.shape[1] == 768 and not method.teacher.training


def _hf_vit_state(classes: int, depth: int, dim: int, mlp: int, patches: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """transformers' `ViTForImageClassification` names and shapes (openood/networks/ViT2.py: `vit.embeddings`,
    `vit.encoder.layer.N.{attention.attention.query|key|value, attention.output.dense, intermediate.dense,
    output.dense, layernorm_before, layernorm_after}`, `vit.layernorm`, `classifier`; no pooler), random values. The
    embeddings are tiny (std ~1e-4 into the first LayerNorm), so that its eps (HF 1e-12, timm 1e-6) shows."""
    shapes = {"vit.embeddings.cls_token": (1, 1, dim), "vit.embeddings.position_embeddings": (1, patches + 1, dim),
              "vit.embeddings.patch_embeddings.projection.weight": (dim, 3, 16, 16),
              "vit.embeddings.patch_embeddings.projection.bias": (dim,)}
    for i in range(depth):
        layer = f"vit.encoder.layer.{i}"
        for name in ("query", "key", "value"):
            shapes |= {f"{layer}.attention.attention.{name}.weight": (dim, dim),
                       f"{layer}.attention.attention.{name}.bias": (dim,)}
        shapes |= {f"{layer}.attention.output.dense.weight": (dim, dim), f"{layer}.attention.output.dense.bias": (dim,),
                   f"{layer}.intermediate.dense.weight": (mlp, dim), f"{layer}.intermediate.dense.bias": (mlp,),
                   f"{layer}.output.dense.weight": (dim, mlp), f"{layer}.output.dense.bias": (dim,)}
        for norm in ("layernorm_before", "layernorm_after"):
            shapes |= {f"{layer}.{norm}.weight": (dim,), f"{layer}.{norm}.bias": (dim,)}
    shapes |= {"vit.layernorm.weight": (dim,), "vit.layernorm.bias": (dim,), "classifier.weight": (classes, dim),
               "classifier.bias": (classes,)}
    state = {k: (1.0 if "norm" in k and k.endswith("weight") else 0.0) + 0.1 * torch.randn(s, generator=gen)
             for k, s in shapes.items()}
    for key in ("vit.embeddings.cls_token", "vit.embeddings.position_embeddings",
                "vit.embeddings.patch_embeddings.projection.bias"):
        state[key] *= 1e-3
    state["vit.embeddings.patch_embeddings.projection.weight"] *= 4e-5
    return state


def _hf_vit_forward(state: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`ViTForImageClassification(ViTConfig(...))(x)` in eval mode, transcribed from ViT2.py (ViTEmbeddings,
    ViTSelfAttention, ViTLayer: pre-norm residual blocks with exact GELU, `ViTModel.layernorm`, the classifier on
    token 0; LayerNorm eps `ViTConfig().layer_norm_eps` = 1e-12): (the CLS token after the final norm, logits)."""
    def lin(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(t, state[f"{name}.weight"], state[f"{name}.bias"])

    def norm(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, t.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-12)

    patches = F.conv2d(x, state["vit.embeddings.patch_embeddings.projection.weight"],
                       state["vit.embeddings.patch_embeddings.projection.bias"], stride=16).flatten(2).transpose(1, 2)
    cls = state["vit.embeddings.cls_token"].expand(len(x), -1, -1)
    h = torch.cat([cls, patches], dim=1) + state["vit.embeddings.position_embeddings"]
    n, t, d = h.shape
    layers = sorted({int(k.split(".")[3]) for k in state if k.startswith("vit.encoder.layer.")})
    for i in layers:
        layer = f"vit.encoder.layer.{i}"
        a = norm(h, f"{layer}.layernorm_before")
        q, k, v = (lin(a, f"{layer}.attention.attention.{name}").view(n, t, heads, d // heads).permute(0, 2, 1, 3)
                   for name in ("query", "key", "value"))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
        context = (probs @ v).permute(0, 2, 1, 3).reshape(n, t, d)
        h = lin(context, f"{layer}.attention.output.dense") + h
        h = lin(F.gelu(lin(norm(h, f"{layer}.layernorm_after"), f"{layer}.intermediate.dense")),
                f"{layer}.output.dense") + h
    token = norm(h, "vit.layernorm")[:, 0]
    return token, lin(token, "classifier")


def test_a_hugging_face_vit_teacher_file_loads_under_the_presets_teacher(tmp_path: Path) -> None:
    """`configs/networks/vit_cifar100.yml`'s teacher is a Hugging Face `ViTForImageClassification` file
    (`pytorch_model_cifar100.bin`, `torch.save(model.state_dict())`): read as it is under `method/teacher=vit_b16`
    (its sizes from the teacher config, here 2 layers of 64-d, 4 heads, 32 px), its features and logits are HF's
    (query / key / value stacked into timm's qkv, LayerNorm eps 1e-12); a head of other classes is one line."""
    pytest.importorskip("timm")
    from ood.errors import CheckpointError
    from ood.models import SmallCNN
    from ood.utils import instantiate

    classes, depth, dim, heads = 100, 2, 64, 4
    state = _hf_vit_state(classes, depth, dim, 4 * dim, 4, torch.Generator().manual_seed(0))
    torch.save(state, tmp_path / "pytorch_model_cifar100.bin")
    tiny = [f"+method.teacher.backbone.{k}={v}" for k, v in
            (("depth", depth), ("embed_dim", dim), ("num_heads", heads), ("img_size", 32), ("weight_init", "skip"))]
    cfg = compose_config(tmp_path, ["method=oal", "method/teacher=vit_b16", *tiny,
                                    f"method.teacher.ckpt={tmp_path / 'pytorch_model_cifar100.bin'}"])
    method = instantiate(cfg.method, backbone=SmallCNN(classes, in_channels=3))
    method.load_teacher(cfg.method.teacher.ckpt)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = method.teacher.run(x)
        features, logits = _hf_vit_forward(state, x, heads)
    torch.testing.assert_close(out.features, features, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-5)
    assert float(logits.std()) > 0.1 and not method.teacher.training
    other = instantiate(cfg.method, backbone=SmallCNN(10, in_channels=3))
    with pytest.raises(CheckpointError, match=r"fc.bias has shape \(100,\) in the file and \(10,\) in the model"):
        other.load_teacher(cfg.method.teacher.ckpt)
