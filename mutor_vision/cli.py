"""What every command line here shares: one error style and one set of exit codes.

Exit codes of ``train_c2i.py``, ``train_sft.py``, ``eval/fid.py``, ``eval/gsm8k.py`` and
``tokenizer/encode_imagenet.py``:

====  ======================================================================================
0     done; a training run stopped cleanly by SIGTERM/SIGINT also exits 0 after saving (the
      log says "terminated"; continue with ``--resume auto``)
1     an unexpected error: a bug, reported with its traceback
2     a bad command line or config: an unknown key, a value out of range, a ``--resume`` that
      does not match the run (the message names the key), an output folder in use by another
      run (the message names it; ``--force`` takes it over)
3     training diverged (NaN/inf loss or gradient); the message names the last good checkpoint
4     bad input: data, shards, checkpoints or weights files missing, corrupt, or not matching
      the model (the message names the file)
5     a storage fault: a write failed for lack of room or a failing disk (ENOSPC, EFBIG under a
      file size limit, EDQUOT, EIO); the message names the folder and the OS error (training: the
      newest complete checkpoint and the command that resumes); the partial output is removed
6     another rank, or its machine, was lost (killed, crashed, cut off) in a multi-process run:
      every rank stops within seconds; the same command run again on every machine goes on
      (training: with ``--resume auto``, which the message prints)
====  ======================================================================================

Errors of kinds 2–6 print one line, ``<command>: <what> (<where>)``, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import yaml

from mutor_vision.config import load_yaml, to_dict
from mutor_vision.errors import ConfigError, InputError, StorageError, TrainingDiverged
from mutor_vision.files import storage_error
from mutor_vision.locks import LEASE_S
from mutor_vision.peers import announce_failure, peers
from mutor_vision.processes import lost_peer

EXIT_OK, EXIT_BUG, EXIT_CONFIG, EXIT_DIVERGED, EXIT_INPUT, EXIT_STORAGE, EXIT_PEER_LOST = 0, 1, 2, 3, 4, 5, 6
EXIT_INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C (128 + SIGINT)
EXIT_CODES = (
    "exit codes: 0 done (also after a clean stop on SIGTERM/SIGINT: continue with --resume auto); "
    "1 a bug (with its traceback); 2 a bad command line or config; 3 training diverged (NaN/inf); "
    "4 bad input data or checkpoint; 5 a storage fault (disk full, file size limit, I/O error: make room, "
    "then the same command resumes); 6 another rank or machine was lost (run the command the message prints on "
    "every machine). Errors 2-6 print one line naming the key, the file or the folder."
)
TOOL_EXIT_CODES = (  # the image commands that do not train: eval/fid.py, sample_c2i.py, export_c2i.py
    "exit codes: 0 done; 1 a bug (with its traceback); 2 a bad command line, or --out in use by another run "
    "or made with other settings; 4 bad or missing input (checkpoint, tokenizer, reference, weights); 5 a "
    "storage fault (disk full, file size limit, I/O error: make room, then the same command resumes); 6 another "
    "rank or machine was lost (the same command on every machine goes on); 130 Ctrl-C (the same command resumes). "
    "Errors 2, 4, 5 and 6 print one line naming the flag, the file or the folder."
)
ENCODE_EXIT_CODES = (  # tokenizer/encode_imagenet.py
    "exit codes: 0 done; 1 a bug (with its traceback); 2 a bad command line, or --out in use by another run "
    "or made with other settings; 4 bad or missing input (the images, the tokenizer file); 5 a storage fault "
    "(disk full, file size limit, I/O error: make room, then the same command resumes); 6 another rank or "
    "machine was lost (the same command on every machine goes on); 130 Ctrl-C (the same command resumes). "
    "Errors 2, 4, 5 and 6 print one line naming the flag, the file or the folder."
)
# The output folder is held by one run at a time (mutor_vision/locks.py); --force overrides that.
FORCE_HELP = (
    "take {what} over from another run that holds it. Without it a second run on the same folder stops "
    "(exit 2) naming the first. A run that died is recognised without --force (on the same machine: its pid is "
    f"gone; on another: its lease was not renewed for {LEASE_S / 60:g} minutes): use it only for a run known "
    "to be gone sooner"
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every command's ``--help``: the description as written, and each option's default after its help."""


LOST_PEER_HINT = "run the same command again on every machine to go on"


def run_command(
    name: str,
    body: Callable[[], Any],
    storage_hint: str | None = None,
    interrupt_hint: str | None = None,
    lost_peer_hint: str = LOST_PEER_HINT,
) -> int:
    """Run ``body`` and map the project's errors to one line on stderr and an exit code.

    ``storage_hint`` ends the line of a storage fault: what was kept and how to go on.
    ``interrupt_hint`` turns Ctrl-C into one line ending with it and exit 130 (None: it propagates).
    ``lost_peer_hint`` ends the line of a lost rank or machine (exit 6): how to go on.
    """
    ignore_file_size_signal()
    try:
        body()
        # Every rank ends here together: the others wait, while rank 0 lives, for its last work (the
        # metrics, a manifest), so a machine lost meanwhile stops them in one line, not in torch's agent.
        peers().wait("end")
    except KeyboardInterrupt:
        if interrupt_hint is None:
            raise
        _say(name, f"interrupted (Ctrl-C); {interrupt_hint}")
        return EXIT_INTERRUPTED
    except ConfigError as error:
        _say(name, f"config error: {error}")
        return EXIT_CONFIG
    except TrainingDiverged as error:
        _say(name, str(error))
        return EXIT_DIVERGED
    except (InputError, FileNotFoundError) as error:
        _say(name, str(error))
        return EXIT_INPUT
    except Exception as error:  # a write no owner of a format wrapped (a JSON record, a log): still exit 5
        lost = lost_peer(error)
        if lost is not None:
            _say(name, f"lost another rank ({lost}); this machine stopped: {lost_peer_hint}", announce=False)
            return EXIT_PEER_LOST
        fault = error if isinstance(error, StorageError) else storage_error(error, _folder_of(error), "storage fault")
        if fault is None:
            announce_failure("a bug (its traceback is in this rank's log)")
            raise
        _say(name, f"{fault}; {storage_hint}" if storage_hint else str(fault))
        return EXIT_STORAGE
    return EXIT_OK


def ignore_file_size_signal() -> None:
    """Past a file size limit (``ulimit -f``) the kernel sends SIGXFSZ, whose default kills the process
    without a word; ignored, the write fails with EFBIG instead and is reported (exit 5)."""
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # only the main thread may set a handler


def _folder_of(error: BaseException) -> str | None:
    filename = getattr(error, "filename", None)
    return os.path.dirname(os.path.abspath(filename)) if isinstance(filename, str) else None


def _say(name: str, message: str, announce: bool = True) -> None:
    print(f"{name}: {message}", file=sys.stderr)
    if announce:  # the other ranks stop at once, saying why, instead of waiting for this one's silence
        announce_failure(message)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def train_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The command line of ``train_c2i.py`` and ``train_sft.py``: --config, --resume, key=value overrides."""
    parser = argparse.ArgumentParser(
        prog=f"{name}.py", description=doc, formatter_class=HelpFormatter, epilog=EXIT_CODES
    )
    parser.add_argument("--config", required=True, help="a YAML config file (docs/configs.md lists every key)")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the config as loaded (file + overrides, defaults filled) and exit",
    )
    parser.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in out_dir) or a path")
    parser.add_argument(
        "--allow-change",
        action="append",
        default=[],
        metavar="KEY[,KEY]",
        help="config keys (or key prefixes) that may differ from the checkpoint's on --resume, e.g. steps",
    )
    parser.add_argument("--force", action="store_true", help=FORCE_HELP.format(what="out_dir"))
    parser.add_argument("overrides", nargs="*", help="key=value, dotted keys into the config")
    return parser


def train_main(doc: str, config_cls: type, train_fn: Callable[..., Any], argv: list[str] | None, name: str) -> int:
    """Run ``train_c2i.py`` or ``train_sft.py``'s command line (:func:`train_parser`)."""
    args = train_parser(doc, name).parse_intermixed_args(argv)  # overrides may come before and after the flags
    setup_logging()
    allow = [key for item in args.allow_change for key in item.split(",") if key]
    log = logging.getLogger(name)

    def body() -> None:
        config = load_yaml(config_cls, args.config, args.overrides)
        if args.print_config:
            print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
            return
        result = train_fn(config, resume=args.resume, allow_change=allow, force=args.force)
        if result.nothing_to_do:
            log.info(
                "already completed at step %d (checkpoint: %s); nothing to do (to train further: raise steps "
                "and add --allow-change steps)",
                result.step,
                result.checkpoint,
            )
        else:
            log.info("%s at step %d (checkpoint: %s)", result.reason, result.step, result.checkpoint)

    resume = resume_command(name, argv)
    return run_command(
        name, body, storage_hint=f"make room, then resume: {resume}", lost_peer_hint=f"on every machine, run: {resume}"
    )


def resume_command(name: str, argv: list[str] | None) -> str:
    """This command line with ``--resume auto`` (any other ``--resume`` dropped), as a shell line to paste."""
    args, kept = list(sys.argv[1:] if argv is None else argv), []
    while args:
        arg = args.pop(0)
        if arg == "--resume":
            args = args[1:]
        elif not arg.startswith("--resume="):
            kept.append(arg)
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = "python" if ranks == 1 else f"[the same launcher and options: {ranks} processes]"
    return f"{launcher} {shlex.join([f'{name}.py', *kept, '--resume', 'auto'])}"
