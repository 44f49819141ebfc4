"""`ood-heatmap`'s command line (`ood.heatmap_cli`): what it answers before it loads a checkpoint."""

from __future__ import annotations

import pytest

from ood import heatmap_cli


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_usage_and_exits_cleanly(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`ood-heatmap --help` was refused as an unexpected argument (exit 1), where ood-train and ood-eval open
    their help with what to type: it prints the usage, the keys and the default `out`."""
    heatmap_cli.main([flag])
    printed = capsys.readouterr().out
    assert printed.startswith("`ood-heatmap ckpt_path=RUN/checkpoints/last.ckpt image=PATH [out=DIR]`")
    assert "`out`\ndefaults to `heatmaps/` in the current folder" in printed


def test_an_unknown_argument_is_still_refused_naming_the_keys(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        heatmap_cli.main(["--verbose"])
    assert exit_.value.code == 1
    assert capsys.readouterr().err == (
        "error: ood-heatmap: unexpected argument '--verbose'; use key=value with keys ['ckpt_path', 'image', 'out']\n"
    )
