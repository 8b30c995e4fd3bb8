"""``accelerate launch`` with one line per failure, for runs on several processes or machines:

    python -m mutor_vision.launch [accelerate launch's options] train_c2i.py --config ... [--resume auto]

accelerate launch (torchrun's agent underneath) answers a rank that stopped with an error of its own
— a traceback and exit code 1, the code the README keeps for a bug — after the rank's own one-line
message. This launcher keeps the rank's message and its exit code (2-6 and 130, ``mutor_vision/cli.py``)
and adds nothing; a rank that died without a word (killed by a signal: the out-of-memory killer, a
node going down) becomes one line naming it, exit 6, as does the loss of the first machine, whose
store every agent meets through. All else is accelerate launch's own, options included.

Two changes to torch's agent, so no machine waits long for a dead one and the line stays one line:
its log lines (which repeat what a rank said, with tracebacks) and torch's C++ warnings (the agent's
and the ranks', unless ``TORCH_CPP_LOG_LEVEL`` is set) are silenced; and after its ranks succeeded,
an agent waits at most ``EXIT_BARRIER_S`` for the other machines' agents (torch waits 300 s, for
ranks that end at different times: ours end together, ``run_command`` in ``mutor_vision/cli.py``),
then exits 0 — its work is done.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

# torch's C++ warnings print a C++ stack at every use of a store whose machine is gone (the agent's
# and each rank's): ERROR hides them unless the caller chose a level. Set before torch is imported,
# which reads it once; the ranks inherit it.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

from mutor_vision.cli import (  # imports torch
    EXIT_BUG,
    EXIT_CONFIG,
    EXIT_DIVERGED,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_PEER_LOST,
    EXIT_STORAGE,
    LOST_PEER_HINT,
)
from mutor_vision.errors import first_line

# the codes whose rank printed its own one line (cli.py)
DOCUMENTED = {EXIT_CONFIG, EXIT_DIVERGED, EXIT_INPUT, EXIT_STORAGE, EXIT_PEER_LOST, EXIT_INTERRUPTED}
EXIT_BARRIER_S = 20  # seconds an agent whose ranks succeeded waits for the other machines' agents


def failure_code(failures: dict, script: str) -> int:
    """The launcher's exit code for the ranks that failed (rank -> torch's ``ProcessFailure``), and at
    most one line of its own: nothing when a rank already said why (a documented code) or showed its
    traceback (a bug, 1); one line when a rank died without a word (a signal)."""
    codes = [f.exitcode for f in failures.values()]
    documented = [code for code in codes if code in DOCUMENTED]
    if documented:
        return documented[0]
    for rank, failure in sorted(failures.items()):
        if failure.exitcode < 0:  # killed by a signal: nobody said anything
            name = signal.Signals(-failure.exitcode).name
            stopped = f"rank {rank} (pid {failure.pid}) was killed ({name}); this machine stopped"
            print(f"{script}: {stopped}: {LOST_PEER_HINT}", file=sys.stderr)
            return EXIT_PEER_LOST
    return EXIT_BUG


def quiet_agent() -> None:
    """Silence torch's agent and shorten its exit barrier (see the module doc)."""
    import torch.distributed.launcher.api as launcher_api
    import torch.distributed.run  # noqa: F401  (imports every logger below, so each is set here)

    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("torch.distributed") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.CRITICAL)  # torch sets each one's level itself: the parent's is not used
    agent = launcher_api.LocalElasticAgent

    class QuickExitAgent(agent):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._exit_barrier_timeout = EXIT_BARRIER_S

    launcher_api.LocalElasticAgent = QuickExitAgent  # launch_agent builds its agent by this module name


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser  # lazy: a slow import
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    script = args.training_script
    quiet_agent()
    try:
        launch_command(args)
    except ChildFailedError as error:
        return failure_code(error.failures, script)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as error:  # the agent's own: the rendezvous store on the first machine is gone
        print(
            f"{script}: lost the job's rendezvous ({first_line(error)}); this machine stopped: {LOST_PEER_HINT}",
            file=sys.stderr,
        )
        return EXIT_PEER_LOST
    return 0


if __name__ == "__main__":
    sys.exit(main())
