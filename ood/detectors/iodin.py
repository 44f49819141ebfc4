"""i-ODIN: ODIN whose input perturbation touches one input element per sample, as OpenOOD's `iodin`
postprocessor (`openood/postprocessors/iodin_postprocessor.py`; "i-ODIN", arXiv 2411.10794).

score(x) = max_c log softmax(f(x_tilde) / T)_c, x_tilde = x - noise * m * sign(grad_x CE(f(x) / T, yhat)) / sigma_ch,
m the one-hot mask of the input element with the largest |grad| (per sample, over channels and pixels). Everything
else (grid, temperature, `input_std`, shared passes across the grid) is ODIN's (`ood.detectors.odin`).
Deviations: as ODIN (max log-softmax in float64 instead of max softmax: monotone); ties of |grad| go to the first
element in memory order (torch.argmax, as OpenOOD).
"""

from __future__ import annotations

import torch

from ood.detectors.odin import ODIN


class IODIN(ODIN):
    """ODIN with the perturbation restricted to the input element of largest gradient magnitude."""

    name = "iodin"
    #: the extra network passes would slow the default run: `detectors=full` runs it, `all` does not
    full_only = True

    def input_step(self, grad: torch.Tensor) -> torch.Tensor:
        flat = grad.flatten(1)
        mask = torch.zeros_like(flat).scatter_(1, flat.abs().argmax(1, keepdim=True), 1.0).view_as(grad)
        return super().input_step(grad) * mask
