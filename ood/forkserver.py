"""The fork server that starts `trainer=ddp_cpu`'s ranks (`start_method=forkserver`) imports this module first
(`ood.strategies.FORKSERVER_PRELOAD`); anywhere else importing it does nothing.

In the server: SIGTERM is ignored. A scheduler's time limit signals every process of the job; a server killed with
them closes the pipes through which the main process learns its ranks' exit status, so the main process would read
status 255 (a crash) for ranks that are still stopping in step with each other (`ood.strategies`). The server exits
when the main process does, as Python's fork server always does.

In each rank it forks (not in the processes a rank forks in turn): SIGTERM's default action again, right after the fork, as in a spawned rank (Python's fork server
resets SIGINT and SIGCHLD only), until the rank installs ood's handler. SIGINT and SIGTERM are also blocked in the
server (where they are ignored) and unblocked in each rank right after that, SIGINT's default action set as well
until Python's fork server puts back the rank's `KeyboardInterrupt`: the main process passes either signal on as soon
as it has a rank's pid, which the server sends as it forks, and one that reached the rank before it stopped ignoring
it was lost (the rank ran its whole stage; after SIGINT it was killed `RANK_STOP_TIMEOUT` later). Blocked, the signal
waits for the rank. And no "'ood.train' found in sys.modules"
RuntimeWarning: a rank runs the main process's main module again as `__mp_main__`, as a spawned rank does, and one
started with `python -m` that the server preloaded (`python -m ood.train`) is already imported there; runpy warned of
it on the console twice per stage (once per rank), where a spawned rank, which had not imported it, said nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings


def _in_fork_server() -> bool:
    return any("multiprocessing.forkserver import main" in arg for arg in sys.orig_argv)


#: the signals the main process passes on to its ranks: blocked in the server, for a rank to receive once forked
PASSED_ON = {signal.SIGINT, signal.SIGTERM}


_forked = False  # in a rank: it was forked by the server (the after-fork hook stays registered in the rank)


def _rank_signals() -> None:
    """A forked rank's first code: SIGINT and SIGTERM's default actions, then unblocked (one already sent acts now).
    Not in a process the rank forks in turn (a DataLoader worker): that one keeps the rank's handlers, as a spawned
    rank's does (a worker killed by Ctrl-C or SIGTERM failed the rank: "DataLoader worker exited unexpectedly")."""
    global _forked
    if _forked:
        return
    _forked = True
    for signum in PASSED_ON:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PASSED_ON)


if _in_fork_server():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, PASSED_ON)
    os.register_at_fork(after_in_child=_rank_signals)
    warnings.filterwarnings("ignore", r"'[\w.]+' found in sys.modules after import of package", RuntimeWarning, "runpy")
