"""The test session's parse-once `OmegaConf.load` (`conftest.py`): Hydra's composes go through it, and it is invisible
(an edited config file is seen, a parse error still names its file, no caller alters what another gets). The tests
that write files put `tmp_path` among its cached `CONFIG_TREES`."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import conftest
import hydra
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from ood import CONFIG_DIR


def compose_app(config_dir: Path, name: str = "train", overrides: tuple[str, ...] = ()) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name=name, overrides=list(overrides))
    GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg)


def test_a_second_compose_parses_no_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pins the Hydra internals the saving relies on: its file (`ood/conf`) and package (`hydra.conf`) config sources
    read through `OmegaConf.load`. If a Hydra release parses some other way, this fails."""
    first = compose_app(CONFIG_DIR, overrides=("data=cifar10",))
    for path in (CONFIG_DIR / "data" / "cifar10.yaml", Path(hydra.__file__).parent / "conf/hydra/output/default.yaml"):
        assert path.read_text(encoding="utf-8") in conftest.PARSED, path
    parsed = []
    real = yaml.load
    monkeypatch.setattr(yaml, "load", lambda stream, Loader: parsed.append(getattr(stream, "name", stream)) or real(stream, Loader))
    assert compose_app(CONFIG_DIR, overrides=("data=cifar10",)) == first
    assert parsed == []


@pytest.fixture
def cached_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`tmp_path`, its YAML files parsed once like `ood/conf`'s."""
    monkeypatch.setattr(conftest, "CONFIG_TREES", (*conftest.CONFIG_TREES, os.path.join(os.path.realpath(tmp_path), "")))
    return tmp_path


def test_an_edited_config_file_is_seen_at_the_next_compose(cached_tmp: Path) -> None:
    """A config dir rewritten between composes, same size and same mtime: the new values are composed."""
    conf = cached_tmp / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "app.yaml").write_text("defaults:\n  - model: small\n  - _self_\nlr: 0.1\n")
    (conf / "model" / "small.yaml").write_text("width: 16\n")
    assert compose_app(conf, "app") == {"model": {"width": 16}, "lr": 0.1}
    stat = (conf / "app.yaml").stat()
    (conf / "app.yaml").write_text("defaults:\n  - model: small\n  - _self_\nlr: 0.2\n")
    (conf / "model" / "small.yaml").write_text("width: 32\n")
    os.utime(conf / "app.yaml", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert compose_app(conf, "app") == {"model": {"width": 32}, "lr": 0.2}


def test_a_changed_loaded_config_leaves_the_next_load_alone(cached_tmp: Path) -> None:
    path = cached_tmp / "a.yaml"
    path.write_text("x: 1\nnested: {y: [1, 2]}\n")
    first = OmegaConf.load(str(path))
    first.x = 5
    first.nested.y.append(3)
    assert OmegaConf.to_container(OmegaConf.load(path)) == {"x": 1, "nested": {"y": [1, 2]}}
    assert conftest.PARSED[path.read_text()] is not OmegaConf.load(path)


def test_a_parse_error_names_its_file_and_is_not_kept(cached_tmp: Path) -> None:
    path = cached_tmp / "bad.yaml"
    path.write_text("x: [1\n")
    with pytest.raises(yaml.YAMLError, match=re.escape(str(path))):
        OmegaConf.load(path)
    path.write_text("x: [2]\n")
    assert OmegaConf.to_container(OmegaConf.load(path)) == {"x": [2]}


def test_every_kept_config_is_omegaconf_s_own_parse() -> None:
    """What the cache hands out after a `train` compose (and whatever earlier tests put there) equals a fresh parse."""
    compose_app(CONFIG_DIR)
    assert (CONFIG_DIR / "train.yaml").read_text(encoding="utf-8") in conftest.PARSED
    for text, config in conftest.PARSED.items():
        assert OmegaConf.to_container(conftest.PARSE(io.StringIO(text))) == OmegaConf.to_container(config), text


def test_a_run_s_written_yaml_is_not_kept(tmp_path: Path) -> None:
    """Files outside `CONFIG_TREES` (a run's config.yaml, unique to it) are parsed every time and kept nowhere."""
    path = tmp_path / "config.yaml"
    path.write_text("seed: 123457\n")
    assert OmegaConf.load(path).seed == 123457
    assert path.read_text() not in conftest.PARSED
