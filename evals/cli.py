"""One command-line grammar for every evaluation tool (``evals.generate``, ``evals.geneval``, ``evals.dpg_refined``,
``evals.genai_bench``, ``evals.audit``): the shared flags are defined here, once.

- judge: ``--judge NAME`` (the real judge by default; toy judges ``shapes`` / ``oracle`` only when asked for),
  ``--judge-model`` (hub id or local path), ``--judge-url`` (an OpenAI-compatible API base),
  ``--judge-api-key-env``;
- placement: ``--device``, ``--dtype``, ``--device-map`` (``evals.runtime``);
- run: ``--batch-size``, ``--seed``, ``--n-resamples``, ``--out``.

Every parser shows its defaults in ``--help``. Input errors end the program with ONE line ``error: ...`` on
stderr and exit status 2 (argparse's own errors too), before any model is loaded (errors from torch,
transformers or your generator keep their traceback; ``--debug`` keeps ours too): each tool checks its inputs
first, then builds its judge. ``--device`` (``device_arg``) and ``--out`` (``out_folder``) are checked by the
parser itself, and a mistyped flag is named (with the closest real one) even when it leaves a required flag
unset. Old flag names stay accepted as aliases (hidden from ``--help``; using one prints a
one-line note naming the new flag).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from common.cli import fail

DTYPE_CHOICES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")


class InputError(ValueError):
    """A problem with what the user passed (a flag, a file, a folder): reported as one ``error:`` line, exit 2."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after every help text that has one (not for flags without a default value, whose help says
    what happens instead); the description keeps its line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == []:
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (``error: ...``, exit 2) and whose help shows the
    defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)
        # read (and removed from the command line) by ``entry``; declared here so that --help lists it
        self.add_argument(DEBUG_FLAG, action="store_true", help="keep the full traceback of every error")

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        # kept for ``error``: a typo'd flag is reported by name, not as the required flag it failed to set
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self._unrecognized(extras) or f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def _option_strings(self) -> list[str]:
        """Every flag of this parser and of its subcommands (for "did you mean")."""
        names = list(self._option_string_actions)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    names += list(sub._option_string_actions)
        return names

    def _unrecognized(self, tokens: Sequence[str]) -> str | None:
        """``unrecognized argument --limt (did you mean --limit?)`` for the first token of ``tokens`` that looks
        like a flag this parser does not know (None when there is none)."""
        for token in tokens:
            parsed = self._parse_optional(token) if token.startswith("-") and token != "--" else None
            if parsed is None or parsed[0] is not None:
                continue  # a value, a negative number, or a flag of this parser
            flag = token.split("=", 1)[0]
            close = difflib.get_close_matches(flag, self._option_strings(), n=1, cutoff=0.6)
            return f"unrecognized argument {flag}" + (f" (did you mean {close[0]}?)" if close else "")
        return None

    def error(self, message: str) -> NoReturn:
        if message.startswith("the following arguments are required") or message.startswith("one of the arguments"):
            # argparse checks required flags before it reports unknown ones: a typo like --limt would otherwise
            # be reported as the required flag it never set
            message = self._unrecognized(getattr(self, "_argv", [])) or message
        fail(f"{message} (see {self.prog} --help)")


_ROOT = Path(__file__).resolve().parents[1]
_OWN_PACKAGES = frozenset({"common", "world", "models", "evals", "experiments", "analysis"})
DEBUG_FLAG = "--debug"


def raised_here(err: BaseException) -> bool:
    """Whether ``err`` was raised by this harness's own code (the innermost frame of its traceback lies in one of
    its packages): our checks of the user's input and of a judge's answers. An error raised inside torch,
    transformers or the user's own generator is not, and keeps its traceback."""
    tb, filename = err.__traceback__, None
    while tb is not None:
        filename, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    if filename is None:
        return False
    try:
        rel = Path(filename).resolve().relative_to(_ROOT)
    except ValueError:
        return False
    return len(rel.parts) > 1 and rel.parts[0] in _OWN_PACKAGES


def entry(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a CLI ``main(argv)``: input errors the harness raises itself (``ValueError``, ``FileNotFoundError``,
    ``KeyError``) become one ``error:`` line with exit 2, a failing judge endpoint (``RuntimeError``) one line with
    exit 1. Errors raised elsewhere (torch, transformers, your generator: a CUDA OOM, a ``KeyError`` in your
    sampler) keep their full traceback, and ``--debug`` anywhere on the command line keeps every traceback."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None, *args: Any, **kwargs: Any) -> Any:
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = DEBUG_FLAG in argv
        argv = [a for a in argv if a != DEBUG_FLAG]
        try:
            return main(argv, *args, **kwargs)
        except (ValueError, FileNotFoundError, KeyError) as err:
            if debug or not raised_here(err):
                raise
            fail(err.args[0] if isinstance(err, KeyError) and err.args else err)
        except RuntimeError as err:
            if debug or not raised_here(err):
                raise
            fail(err, status=1)

    return wrapped


class _Alias(argparse.Action):
    """An old flag name: stores into the new flag's destination and says so on stderr."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str = "", **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"note: {option_string} is an old name of {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def alias(parser: argparse.ArgumentParser, old: str, new: str, type: Callable[[str], Any] | None = None,
          choices: Sequence[Any] | None = None) -> None:
    """Accept ``old`` as a hidden alias of the flag ``new`` (same value type and choices)."""
    dest = new.lstrip("-").replace("-", "_")
    parser.add_argument(old, dest=dest, action=_Alias, new=new, type=type, choices=choices,
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def device_arg(text: str) -> str:
    """argparse type of ``--device``: ``auto`` or a device this machine has (``evals.runtime.check_device``)."""
    from evals.runtime import check_device

    try:
        return check_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def out_folder(text: str) -> Path:
    """argparse type of ``--out``: a folder (it may not exist yet), never an existing file, so a run that would
    fail writing its results fails before it starts."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder")
    return path


def add_judge(parser: argparse.ArgumentParser, choices: Sequence[str], default: str, help: str,
              model_help: str = "the judge's weights: hub id or local folder (default: the judge's own)",
              url: bool = True) -> None:
    """``--judge`` (+ ``--judge-model``, and with ``url`` ``--judge-url`` / ``--judge-api-key-env``)."""
    parser.add_argument("--judge", default=default, choices=list(choices), help=help)
    parser.add_argument("--judge-model", default=None, help=model_help)
    if url:
        add_judge_endpoint(parser)


def add_judge_endpoint(parser: argparse.ArgumentParser,
                       help: str = "API base of an OpenAI-compatible server for --judge openai, e.g. "
                                   "http://localhost:8000/v1") -> None:
    """``--judge-url`` and ``--judge-api-key-env``: an OpenAI-compatible judge server."""
    parser.add_argument("--judge-url", default=None, help=help)
    parser.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                        help="environment variable holding the endpoint's API key")


def add_placement(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--dtype``, ``--device-map``: where and in what precision models are loaded."""
    parser.add_argument("--device", default="auto", type=device_arg,
                        help="cpu, cuda, cuda:1, ...; auto = cuda when available (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="weights' dtype; auto = bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--device-map", default=None,
                        help="spread a big model over the visible GPUs (and CPU) with accelerate: auto, balanced, "
                             "sequential; default: the whole model on --device")


def add_batch_size(parser: argparse.ArgumentParser, default: int | None, help: str = "images per model call") -> None:
    parser.add_argument("--batch-size", type=positive_int, default=default, help=help)


def add_seed(parser: argparse.ArgumentParser, default: int, help: str) -> None:
    parser.add_argument("--seed", type=int, default=default, help=help)


def add_n_resamples(parser: argparse.ArgumentParser, default: int = 1000) -> None:
    parser.add_argument("--n-resamples", type=positive_int, default=default,
                        help="bootstrap resamples of the 95%% confidence intervals")


PROMPT_FILE = "--prompt-file"  # every scorer's prompt set flag (old names stay as aliases: --metadata, ...)


def add_out(parser: argparse.ArgumentParser, help: str, required: bool = True) -> None:
    parser.add_argument("--out", required=required, type=out_folder, help=help)
