"""Heatmap-based OOD detection (`method=heatmap`, docs/methods/heatmap.md): known answers for the loss, score,
prototypes, decoder plans and feature scaling, the pool prepared without a Trainer, the `data.ood_subset` option,
and a seeded digits run from the shared CE checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import NO_FIGURES, compose_config, rows_by
from omegaconf import OmegaConf

from ood import CONFIG_DIR
from ood.losses import heatmap_loss
from ood.methods.heatmap import class_prototypes, heatmap_score, released_pairing
from ood.models.decoder import HeatmapDecoder, decoder_plan
from ood.utils import instantiate


def test_loss_known_answers() -> None:
    # w = 1 + 5|t| = [1, 6]; (0.5 + 0 - 0)^2 * 1 + (0 + 0 - 1)^2 * 6 = 6.25
    heat, x, t = torch.tensor([[[[0.5, 0.0]]]]), torch.zeros(1, 1, 1, 2), torch.tensor([[[[0.0, 1.0]]]])
    assert heatmap_loss(heat, x, t).item() == pytest.approx(6.25)
    assert heatmap_loss(heat, x, t, alpha=0.0).item() == pytest.approx(1.25)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.rand(4, 3, 5, 5, generator=gen) * 2 - 1, torch.rand(4, 3, 5, 5, generator=gen) * 2 - 1
    assert heatmap_loss(t - x, x, t).item() == pytest.approx(0.0, abs=1e-12)
    heat = torch.rand(4, 3, 5, 5, generator=gen, requires_grad=True)
    heatmap_loss(heat, x, t).backward()
    expected = 2 * (1 + 5 * t.abs()) * (heat.detach() + x - t) / 4  # per-sample 2w(M + x - t), batch mean
    torch.testing.assert_close(heat.grad, expected)


def test_score_range_and_zero() -> None:
    assert heatmap_score(torch.zeros(2, 3, 4, 4)).tolist() == [0.0, 0.0]
    heat = torch.zeros(1, 2, 1, 2)
    heat[0, 0, 0] = torch.tensor([0.5, -0.2])
    heat[0, 1, 0] = torch.tensor([-0.1, 0.8])
    assert heatmap_score(heat).item() == pytest.approx(-(0.5 + 0.8) / 2)
    scores = heatmap_score(
        torch.tanh(torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 3)
    )
    assert bool(((scores >= -1) & (scores <= 0)).all())
    assert heatmap_score(-torch.ones(1, 1, 2, 2)).item() == -1.0


def test_prototypes_match_brute_force_and_released_order() -> None:
    gen = torch.Generator().manual_seed(0)
    bank, bank_preds = torch.randn(300, 16, generator=gen), torch.randint(0, 5, (300,), generator=gen)
    query, query_preds = torch.randn(40, 16, generator=gen), torch.randint(0, 5, (40,), generator=gen)
    proto = class_prototypes(bank, bank_preds, query, query_preds)
    for k in range(len(query)):
        dist = ((bank - query[k]) ** 2).sum(1).masked_fill(bank_preds != query_preds[k], float("inf"))
        assert int(proto[k]) == int(dist.argmin())
        assert int(bank_preds[proto[k]]) == int(query_preds[k])
    # the released loop: class by class, outliers of that class in position order; outlier k takes entry k
    released = [int(proto[j]) for cls in range(5) for j in range(len(query)) if int(query_preds[j]) == cls]
    assert released_pairing(proto, query_preds).tolist() == released
    assert (released_pairing(proto, query_preds) != proto).float().mean() > 0.5


def test_builder_reproduces_the_released_decoder_table() -> None:
    table = {
        (512, 32, 100, None): (100, (512, 256, 128, 64)),  # ResNet-18 CIFAR-10
        (512, 32, None, None): (512, (512, 256, 128, 64)),  # ResNet-18 CIFAR-100
        (128, 32, None, None): (128, (256, 128, 64, 32)),  # WRN-40-2 CIFAR-10/100
        (2048, 64, None, None): (512, (2048, 1024, 512, 256, 128)),  # ResNet-50 Tiny ImageNet
        (64, 8, None, None): (64, (64, 32)),  # digits plan of docs/methods/heatmap.md (8 px)
    }
    for (dim, size, latent, width), (d0, channels) in table.items():
        plan = decoder_plan(dim, size, 3, latent, width)
        assert (plan.latent, plan.channels, plan.start) == (d0, channels, 4)
    decoder = HeatmapDecoder(512, 10, decoder_plan(512, 32, 3, 100))
    assert [m.out_channels for m in decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)] == [
        512,
        256,
        128,
        64,
        3,
    ]
    assert all(m.bias is None for m in decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d))


# (data, backbone) -> the released decoder's d0 and up-block widths (docs/methods/heatmap.md table); the WRN-40-2
# `make reproduce-heatmap` sweeps is the paper's (wrn40_2_heatmap, meliketoy's layout)
RELEASED_PLANS = {
    ("cifar10", "resnet18_32x32"): (100, (512, 256, 128, 64)),
    ("cifar100", "resnet18_32x32"): (512, (512, 256, 128, 64)),
    ("cifar10", "wrn40_2_heatmap"): (128, (256, 128, 64, 32)),
    ("cifar100", "wrn40_2_heatmap"): (128, (256, 128, 64, 32)),
}


@pytest.mark.parametrize(("data", "backbone"), sorted(RELEASED_PLANS))
def test_reproduce_preset_follows_the_paper_recipe(tmp_path: Path, data: str, backbone: str) -> None:
    """`make reproduce-heatmap`'s decoder stage (experiment=heatmap): 10,000 outliers (not the whole 300K pool), no
    augmentation (the released decoder training has none), and the released decoder plan for every (data,
    backbone) the target sweeps (d0 = 100 for ResNet-18 on CIFAR-10)."""
    cfg = compose_config(tmp_path, ["experiment=heatmap", f"data={data}", f"backbone={backbone}"])
    assert cfg.method.num_ood == 10000
    assert cfg.data.benchmark.augment is False
    dim = instantiate(cfg.backbone, num_classes=10).feature_dim
    plan = decoder_plan(dim, cfg.method.input_size, 3, cfg.method.latent, cfg.method.width)
    assert (plan.latent, plan.channels) == RELEASED_PLANS[(data, backbone)]


INPUTS = {"small_cnn": (1, 16), "resnet50": (3, 224)}  # every other backbone config is a 32-px CIFAR network


@pytest.mark.parametrize("config", sorted(p.stem for p in (CONFIG_DIR / "backbone").glob("*.yaml")))
def test_decoder_output_has_the_input_shape(config: str) -> None:
    channels, size = INPUTS.get(config, (3, 32))
    node = OmegaConf.load(CONFIG_DIR / "backbone" / f"{config}.yaml")
    if config == "module":  # `backbone=module` wraps a class the user names
        node.target = "torchvision.models.resnet18"
    backbone = instantiate(node, num_classes=10, in_channels=channels)
    # the shape depends on the feature dim and the input size only: a narrow decoder keeps the 224-px case quick
    plan = decoder_plan(backbone.feature_dim, size, channels, width=64)
    decoder = HeatmapDecoder(backbone.feature_dim, 10, plan).eval()
    with torch.no_grad():
        heat = decoder(torch.rand(2, backbone.feature_dim), torch.tensor([0, 9]))
    assert heat.shape == (2, channels, size, size) and plan.output_size == size
    assert bool((heat.abs() <= 1).all())


def _method(tmp_path: Path, overrides: list[str]):
    cfg = compose_config(tmp_path, ["method=heatmap", *overrides])
    backbone = instantiate(cfg.backbone, num_classes=6, in_channels=1)
    return instantiate(cfg.method, backbone=backbone)


def test_feature_scaling(tmp_path: Path) -> None:
    method = _method(tmp_path, [])
    method.feature_range.copy_(torch.tensor([-2.0, 6.0]))
    feats = torch.tensor([[-2.0, 6.0, 2.0], [0.0, 4.0, 6.0]])
    torch.testing.assert_close(
        method.scale_features(feats), torch.tensor([[0.0, 1.0, 0.5], [0.25, 0.75, 1.0]])
    )
    method.feature_norm = "as_released"
    torch.testing.assert_close(method.scale_features(feats), torch.tensor([[0.0, 1.0, 0.5], [0.0, 4.0, 6.0]]))
    assert method.frozen == ("backbone",)


@pytest.mark.parametrize(("max_epochs", "refused"), [(2, True), (3, False)])
def test_a_ce_phase_as_long_as_the_run_is_refused_as_the_run_is_built(tmp_path: Path, max_epochs: int,
                                                                      refused: bool) -> None:
    """`method.classifier_epochs=2 trainer.max_epochs=2` trained the classifier for the whole run and scored the
    untrained decoder's heatmaps as the method's results, silently; one epoch more leaves the decoder one. Refused by
    `ood.train.build` from the method's `first_complete_epoch`, before the trainer exists."""
    from ood.errors import ConfigError
    from ood.train import build

    cfg = compose_config(tmp_path, ["method=heatmap", "method.classifier_epochs=2", "method.init.ckpt=null",
                                    f"trainer.max_epochs={max_epochs}", "logger=none"])
    if refused:
        with pytest.raises(ConfigError, match=r"^heatmap trains only a part of itself before epoch 2 \(0-based; "
                                              r"heatmap's method.classifier_epochs\), and trainer.max_epochs=2 ends the "
                                              r"run there, the rest untrained: raise trainer.max_epochs above 2$"):
            build(cfg)
    else:
        assert build(cfg)[0].first_complete_epoch == 2


def test_bad_flag_names_the_choices(tmp_path: Path) -> None:
    from ood.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^method.pairing='released'; choices: \['intended', 'as_released'\]$"):
        _method(tmp_path, ["method.pairing=released"])


def test_image_side_follows_the_data_or_is_one_line(tmp_path: Path, ce_checkpoint: Path) -> None:
    """data=folder's data.image_size sizes the decoder (it fell back to 32 and failed at the first decoder step on
    16 px folders); a decoder side other than the data's is refused in prepare, before any training."""
    from ood.errors import ConfigError

    folder = compose_config(tmp_path, ["method=heatmap", "data=folder", "data.root=x", "data.image_size=16"])
    assert folder.method.input_size == 16
    assert compose_config(tmp_path, ["method=heatmap", "data=folder", "data.root=x"]).method.input_size is None
    with pytest.raises(ConfigError, match=r"^method=heatmap builds its decoder for one image side: set data.image_size"):
        _method(tmp_path, ["method.input_size=null"])
    cfg = compose_config(tmp_path, ["experiment=digits_heatmap", f"method.init.ckpt={ce_checkpoint}", "method.input_size=32"])
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone, num_classes=6, in_channels=1))
    with pytest.raises(ConfigError, match=r"draws 32 px heatmaps but the data's images are 16 px: set method.input_size=16$"):
        method.prepare(instantiate(cfg.data, seed=0).fit_data())


def test_missing_classifier_source_and_outliers_are_named_in_one_line(tmp_path: Path) -> None:
    """Both requirements fail at once (no classifier source, no outlier set): one line names both, so a folder
    user learns them in one failed run, not two."""
    from ood.errors import ConfigError

    cfg = compose_config(tmp_path, ["method=heatmap", "data.benchmark.outliers=none"])
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone, num_classes=6, in_channels=1))
    with pytest.raises(ConfigError, match=r"^method=heatmap needs exactly one classifier source: .*; and method heatmap "
                       r"trains on outliers, but benchmark digits has none \(data.benchmark.outliers=none\)"):
        method.prepare(instantiate(cfg.data, seed=0).fit_data())


def test_prepare_without_a_trainer_builds_the_pool(tmp_path: Path, ce_checkpoint: Path) -> None:
    """`prepare(FitData)` alone: the pool is `num_ood` outliers drawn by the seed, each paired with the ID training
    image of its predicted class nearest in feature space (checked by brute force), the feature range is that of
    the ID-train features, `fitted()` names the outlier set, and the global RNG is untouched."""
    cfg = compose_config(tmp_path, ["experiment=digits_heatmap", f"method.init.ckpt={ce_checkpoint}", "method.num_ood=12"])
    datamodule = instantiate(cfg.data, seed=3)
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone, num_classes=6, in_channels=1))
    method.apply_init()
    data = datamodule.fit_data()
    torch.manual_seed(1)
    method.prepare(data)
    drawn = torch.rand(2)
    torch.manual_seed(1)
    assert torch.equal(drawn, torch.rand(2))
    train, outliers = data.datasets["train"], data.datasets["outliers"]
    x_train = torch.stack([train[i][0] for i in range(len(train))])
    with torch.no_grad():
        out = method.backbone.eval().run(x_train)
    assert method.feature_range.tolist() == pytest.approx([out.features.min().item(), out.features.max().item()])
    pool = torch.randperm(len(outliers), generator=torch.Generator().manual_seed(3))[:12].sort().values
    assert method.fitted() == {"outliers": f"china_patches: 12 of {len(outliers)}"}
    for k in (0, 7):
        x = outliers[int(pool[k])][0]
        assert torch.equal(method._pool_x[k], x)
        with torch.no_grad():
            q = method.backbone.run(x[None])
        same = torch.nonzero(out.logits.argmax(1) == q.logits.argmax(1))[:, 0]
        nearest = same[(out.features[same] - q.features).norm(dim=1).argmin()]
        assert torch.equal(method._pool_t[k], x_train[nearest])


def test_ood_subset_is_a_data_option_seen_by_every_scorer(tmp_path: Path) -> None:
    """`data.ood_subset=first_fifth` cuts every test OOD set to its first len(ID test) // 5 samples in the loaders
    themselves (ID splits and validation OOD untouched); a bad value names the choices."""
    from ood.errors import ConfigError

    full = instantiate(compose_config(tmp_path, []).data, seed=0)
    cut = instantiate(compose_config(tmp_path, ["data.ood_subset=first_fifth"]).data, seed=0)
    limit = len(full.test_dataloader()[2].dataset) // 5
    for split, a, b in zip(full.eval_splits, full.test_dataloader(), cut.test_dataloader()):
        n = min(limit, len(a.dataset)) if split.role == "ood" else len(a.dataset)
        assert len(b.dataset) == n, split.name
        assert torch.equal(b.dataset[n - 1][0], a.dataset[n - 1][0])
    with pytest.raises(ConfigError, match="first_fifth"):
        instantiate(compose_config(tmp_path, ["data.ood_subset=half"]).data, seed=0)


@pytest.fixture(scope="module")
def heatmap_run(ce_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """One seeded digits heatmap run from the shared CE checkpoint (6 decoder epochs of 20 steps, lr 1e-3), keeping the method, the
    classifier state before training and every loss call's (inputs, targets, batch size)."""
    import ood.methods.heatmap as heatmap_module
    from ood.train import build

    out = tmp_path_factory.mktemp("heatmap")
    cfg = compose_config(
        out,
        [
            "experiment=digits_heatmap",
            f"method.init.ckpt={ce_checkpoint}",
            "trainer.max_epochs=6",
            "data.batch_size=32",
            "method.optimizer.lr=1e-3",
            "trainer.enable_progress_bar=false",
            "logger=none",
            "detectors.names=[msp,energy]",
            "method.n_images=2",  # rows of its diagnostic grids (default 8): the grid checks hold at any count
            NO_FIGURES,  # no test here reads the ROC figures
        ],
    )
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    method, datamodule, trainer, evaluation = build(cfg)
    method.apply_init()
    before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    calls = []
    original = heatmap_module.heatmap_loss

    def spy(heat, inputs, targets, alpha=5.0):
        calls.append((inputs.detach().clone(), targets.detach().clone()))
        return original(heat, inputs, targets, alpha)

    heatmap_module.heatmap_loss = spy
    try:
        trainer.fit(method, datamodule=datamodule)
    finally:
        heatmap_module.heatmap_loss = original
    trainer.test(method, datamodule=datamodule, verbose=False)
    return out, method, before, calls, evaluation.rows


@pytest.mark.slow
def test_digits_run_frozen_classifier_and_floor(heatmap_run) -> None:
    out, method, before, calls, rows = heatmap_run
    after = method.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "classifier weights or BN buffers changed"
    assert not any(p.requires_grad for p in method.backbone.parameters())
    n_id = (
        32  # data.batch_size: the first n rows of every full (ID + outlier) training loss call are ID images
    )
    calls = [(inputs, targets) for inputs, targets in calls if len(inputs) > n_id]  # not the logged parts
    assert len(calls) == 6 * 20
    assert all(
        torch.equal(targets[:n_id] - inputs[:n_id], torch.zeros_like(inputs[:n_id]))
        for inputs, targets in calls
    )
    assert all(bool((inputs.abs() <= 1 + 1e-5).all()) for inputs, _ in calls)  # the method's [-1, 1] space
    heat = {r["ood_dataset"]: r["auroc"] for r in rows if r["detector"] == "heatmap"}
    far = {k: v for k, v in heat.items() if k != "digits_6_9"}
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    baselines = {
        det: mean({k: r["auroc"] for k, r in rows_by(rows, det).items() if k in far})
        for det in ("msp", "energy")
    }
    stats = method.diagnostics()
    print(
        f"heatmap far AUROC {mean(far):.4f} vs {baselines}; mean max_c|M|: "
        + ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in stats.items() if k.startswith("mean_abs"))
    )
    assert mean(far) >= 0.95 and mean(far) > max(baselines.values())
    assert stats["mean_abs_heatmap/test"] < 0.5 * min(stats[f"mean_abs_heatmap/{k}"] for k in far)


@pytest.mark.slow
def test_heatmap_grids_and_cli(
    heatmap_run, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from PIL import Image

    from ood.heatmap_cli import load_method, main

    out, method, _, _, _ = heatmap_run
    grids = {k: v for k, v in method.diagnostics().items() if k.startswith("heatmaps/")}
    assert set(grids) == {
        f"heatmaps/{s}" for s in ("test", "digits_6_9", "flower_patches", "gaussian_noise", "uniform_noise")
    }
    for grid in grids.values():
        assert grid.dtype.name == "uint8" and grid.shape == (
            round(100 * (1.35 * method.n_images + 0.5)),
            420,
            3,
        )
        assert grid.std() > 10  # a drawn figure, not a blank canvas
    folder = tmp_path / "mine"
    folder.mkdir()
    Image.fromarray(np.full((40, 30), 255, np.uint8)).save(folder / "white.png")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / "black.jpg")
    main([f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", f"image={folder}", f"out={tmp_path / 'maps'}"])
    written = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert written == ["black_heatmap.png", "white_heatmap.png"]
    assert Image.open(tmp_path / "maps" / "white_heatmap.png").size == (420, round(100 * 1.85))
    with pytest.raises(SystemExit):
        main([f"ckpt_path={out}", "image=/nonexistent.png"])
    (folder / "broken.png").write_bytes(b"not a png")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([f"ckpt_path={out}", f"image={folder / 'broken.png'}", f"out={tmp_path / 'maps'}"])
    assert capsys.readouterr().err.startswith(f"error: unreadable image {folder / 'broken.png'}: UnidentifiedImageError")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / "white.jpg")  # two images of one stem
    (folder / "broken.png").unlink()
    main([f"ckpt_path={out}", f"image={folder}", f"out={tmp_path / 'stems'}"])
    assert sorted(p.name for p in (tmp_path / "stems").iterdir()) == [
        "black_heatmap.png", "white.jpg_heatmap.png", "white.png_heatmap.png"
    ]
    from ood import heatmap_cli  # a folder goes through in batches: the same scores and classes as one pass

    files, (loaded, _, _) = heatmap_cli.image_files(folder), load_method(out)
    whole = [(score, pred) for _, score, pred in heatmap_cli.write_heatmaps(loaded, files, tmp_path / "whole")]
    monkeypatch.setattr(heatmap_cli, "BATCH", 2)
    batched = [(score, pred) for _, score, pred in heatmap_cli.write_heatmaps(loaded, files, tmp_path / "batched")]
    assert len(files) == 3 and [pred for _, pred in batched] == [pred for _, pred in whole]
    assert [score for score, _ in batched] == pytest.approx([score for score, _ in whole], abs=1e-6)
    # a data=folder run (no data.benchmark in its config) rebuilds from its weights alone, without its data
    copy = tmp_path / "folder_run"
    shutil.copytree(out / "checkpoints", copy / "checkpoints")
    cfg = OmegaConf.load(out / "config.yaml")
    cfg.data = {"_target_": "ood.data.folder.folder_datamodule", "root": "/nowhere", "image_size": 16}
    OmegaConf.save(cfg, copy / "config.yaml")
    rebuilt, _, _ = load_method(copy)
    assert all(torch.equal(v, method.state_dict()[k]) for k, v in rebuilt.state_dict().items())
    # a heatmap written in place was left half written under its name when the writer died in it: now atomically
    save = Image.Image.save

    def dies_halfway(image: Image.Image, fp: Path, *args: object, **kwargs: object) -> None:
        save(image, fp, *args, **kwargs)
        Path(fp).write_bytes(Path(fp).read_bytes()[:40])
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        heatmap_cli.write_heatmaps(loaded, files, tmp_path / "killed")
    assert list((tmp_path / "killed").iterdir()) == []


def test_fitted_names_the_outliers_before_the_pool_is_built(tmp_path: Path) -> None:
    """With a CE phase first the pool is built at the decoder's first epoch, so a run resumed from its last epoch's
    checkpoint (killed in its evaluation) never builds it: `fitted()` still names the outliers, as the uninterrupted
    run's rows do (they lacked `method_params.fitted`, so the resumed results.jsonl differed)."""
    cfg = compose_config(tmp_path, ["experiment=digits_heatmap", "method.classifier_epochs=1", "method.num_ood=12"])
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone, num_classes=6, in_channels=1))
    data = instantiate(cfg.data, seed=0).fit_data()
    method.prepare(data)
    assert method._pool_x is None
    assert method.fitted() == {"outliers": f"china_patches: 12 of {len(data.datasets['outliers'])}"}


@pytest.mark.slow
def test_without_checkpoint_trains_ce_then_freezes(tmp_path: Path) -> None:
    """No `init.ckpt`: 4 CE epochs, then the classifier is frozen for the 2 decoder epochs (one fit)."""
    from lightning import Callback

    from ood.train import build

    snapshots = {}

    class Snapshot(Callback):
        def on_train_epoch_start(self, trainer, module) -> None:
            snapshots[trainer.current_epoch] = {k: v.clone() for k, v in module.backbone.state_dict().items()}

    cfg = compose_config(
        tmp_path,
        [
            "experiment=digits_heatmap",
            "method.classifier_epochs=4",
            "trainer.max_epochs=6",
            "data.batch_size=64",
            "trainer.enable_progress_bar=false",
            "logger=none",
            "detectors.names=[msp]",
            NO_FIGURES,  # its checks read the weights and the rows
        ],
    )
    method, datamodule, trainer, evaluation = build(cfg)
    method.apply_init()
    trainer.callbacks.append(Snapshot())
    trainer.fit(method, datamodule=datamodule)
    final = method.backbone.state_dict()
    assert not all(torch.equal(snapshots[0][k], snapshots[4][k]) for k in final)  # CE trained the classifier
    assert all(torch.equal(snapshots[4][k], final[k]) for k in final)  # then it stayed bit-identical
    trainer.test(method, datamodule=datamodule, verbose=False)
    assert evaluation.rows[0]["id_acc"] >= 0.8
    assert {r["detector"] for r in evaluation.rows} == {"heatmap", "msp"}


def test_released_feature_norm_uses_the_released_range_not_the_rows_own(tmp_path: Path) -> None:
    """feature_norm=as_released, transcribed from the released `get_norm_values` / `learn_prototype` (fw_layers = 1):
    the range is min(0, .) / max(0, .) over zs[0], the first row of each 200-image batch, and only zs[0] of a batch
    is scaled, with that range (it was scaled with its own min and max)."""
    method = _method(tmp_path, ["method.feature_norm=as_released"])
    method.feature_range.copy_(torch.tensor([0.0, 8.0]))
    batch = torch.tensor([[2.0, 4.0, 6.0], [1.0, 2.0, 3.0]])
    torch.testing.assert_close(method.scale_features(batch), torch.tensor([[0.25, 0.5, 0.75], [1.0, 2.0, 3.0]]))
    from ood.methods.heatmap import released_feature_range

    gen = torch.Generator().manual_seed(0)
    feats = torch.rand(450, 4, generator=gen) * 3 + 0.5  # 3 released batches: 200, 200, 50
    min_val, max_val = 0.0, 0.0
    for start in range(0, len(feats), 200):
        zs = feats[start : start + 200].numpy()
        min_val, max_val = min(min_val, zs[0].min()), max(max_val, zs[0].max())
    torch.testing.assert_close(released_feature_range(feats), torch.tensor([min_val, max_val]))
    assert max_val < feats.max().item()  # not the range of every row


def test_the_decoder_schedule_is_picked_from_the_scheduler_group_and_refused_beside_a_ce_phase(tmp_path: Path) -> None:
    """`method=heatmap method/scheduler=openood` failed to compose ("No match in the defaults list"); now it anneals
    the decoder per iteration (no schedule by default, the paper's). With a CE phase the decoder's scheduler was
    silently never built (only `classifier_scheduler` is stepped): now one line naming the fix."""
    from ood.errors import ConfigError

    cfg = compose_config(tmp_path, ["experiment=digits_heatmap", "method/scheduler=openood"])
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone, num_classes=6, in_channels=1))
    config = method.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "step"
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.LambdaLR)
    assert compose_config(tmp_path, ["experiment=digits_heatmap"]).method.scheduler is None
    cfg = compose_config(tmp_path, ["experiment=digits_heatmap", "method/scheduler=cosine", "method.classifier_epochs=1"])
    with pytest.raises(ConfigError, match=r"^method.scheduler: heatmap with a CE phase \(method.classifier_epochs=1\) "
                                          r"schedules only the classifier .*: set method.scheduler=null, or"):
        instantiate(cfg.method, backbone=instantiate(cfg.backbone, num_classes=6, in_channels=1))
