"""`ood-report PATH [PATH ...]`: the comparison table over runs and sweeps.

Reads every `results.jsonl` below the given folders (`reading`), groups rows by configuration, each run's identity
from its `identity.json` (method, detector, backbone, ID dataset, and every hyper-parameter that varies between the
runs), and reports per OOD set and per near/far group the mean ± std over seeds (`aggregation`). An `ood-eval` of a
checkpoint already in the report counts once. It prints and writes `report.md`, `report.csv` and `report.tex`
(booktabs) (`rendering`), `figures/` (ROC curves per OOD set, score histograms, near/far AUROC bars; `figures`),
published reference numbers as `ref:` columns (`references`), and names the jobs of a sweep that failed.
The command line is `ood.report.command`.
"""

from ood.report.command import main

__all__ = ["main"]
