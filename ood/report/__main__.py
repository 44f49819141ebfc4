"""`python -m ood.report` = `ood-report`."""

from ood.report.command import main

main()
