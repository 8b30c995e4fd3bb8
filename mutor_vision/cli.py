"""What every command line here shares: one error style and one set of exit codes.

Exit codes of ``train_c2i.py``, ``train_sft.py``, ``eval/fid.py``, ``eval/gsm8k.py`` and
``tokenizer/encode_imagenet.py``:

====  ======================================================================================
0     done; a training run stopped cleanly by SIGTERM/SIGINT also exits 0 after saving (the
      log says "terminated"; continue with ``--resume auto``)
1     an unexpected error: a bug, reported with its traceback
2     a bad command line or config: an unknown key, a value out of range, a ``--resume`` that
      does not match the run (the message names the key)
3     training diverged (NaN/inf loss or gradient); the message names the last good checkpoint
4     bad input: data, shards, checkpoints or weights files missing, corrupt, or not matching
      the model (the message names the file)
====  ======================================================================================

Errors of kinds 2–4 print one line, ``<command>: <what> (<where>)``, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from mutor_vision.errors import ConfigError, InputError, TrainingDiverged

EXIT_OK, EXIT_BUG, EXIT_CONFIG, EXIT_DIVERGED, EXIT_INPUT = 0, 1, 2, 3, 4
EXIT_CODES = (
    "exit codes: 0 done (also after a clean stop on SIGTERM/SIGINT: continue with --resume auto); "
    "1 a bug (with its traceback); 2 a bad command line or config; 3 training diverged (NaN/inf); "
    "4 bad input data or checkpoint. Errors 2-4 print one line naming the key or the file."
)


def run_command(name: str, body: Callable[[], Any]) -> int:
    """Run ``body`` and map the project's errors to one line on stderr and an exit code."""
    try:
        body()
    except ConfigError as error:
        _say(name, f"config error: {error}")
        return EXIT_CONFIG
    except TrainingDiverged as error:
        _say(name, str(error))
        return EXIT_DIVERGED
    except (InputError, FileNotFoundError) as error:
        _say(name, str(error))
        return EXIT_INPUT
    return EXIT_OK


def _say(name: str, message: str) -> None:
    print(f"{name}: {message}", file=sys.stderr)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def train_main(doc: str, config_cls: type, train_fn: Callable[..., Any], argv: list[str] | None, name: str) -> int:
    """The command line of ``train_c2i.py`` and ``train_sft.py``: --config, --resume, key=value overrides."""
    from mutor_vision.config import load_yaml

    parser = argparse.ArgumentParser(
        prog=f"{name}.py", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES
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
    parser.add_argument("overrides", nargs="*", help="key=value, dotted keys into the config")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the flags
    setup_logging()
    allow = [key for item in args.allow_change for key in item.split(",") if key]
    log = logging.getLogger(name)

    def body() -> None:
        config = load_yaml(config_cls, args.config, args.overrides)
        if args.print_config:
            import yaml

            from mutor_vision.config import to_dict

            print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
            return
        result = train_fn(config, resume=args.resume, allow_change=allow)
        if result.nothing_to_do:
            log.info(
                "already completed at step %d (checkpoint: %s); nothing to do (to train further: raise steps "
                "and add --allow-change steps)",
                result.step,
                result.checkpoint,
            )
        else:
            log.info("%s at step %d (checkpoint: %s)", result.reason, result.step, result.checkpoint)

    return run_command(name, body)
