"""The ``metamixer-fast`` command: ``train``, ``plot``, ``study``, ``info``."""

from __future__ import annotations

import inspect
import re
import sys

USAGE = """usage: metamixer-fast COMMAND [options]

commands:
  train   train K peers with online distillation and MetaMixer (see `metamixer-fast train --help`)
  plot    write PNG curves of a run: metamixer-fast plot RUN_DIR
  study   run a resumable grid of methods x seeds and summarise it: metamixer-fast study STUDY.toml
  info    versions, what was built, and the kernel backend per device
"""


_ROLE = re.compile(r":[a-z]+:`~?([^`]*)`")  # :func:`name`, :class:`~pkg.Name`


def plain_text(doc: str) -> str:
    """A docstring as a command's ``--help`` description: argparse prints it as it is, so the
    reStructuredText markup the docstrings use for Sphinx (``code``, roles, the '::' that opens a
    literal block) is taken out. Print it with ``argparse.RawDescriptionHelpFormatter`` to keep
    its line breaks (examples, TOML)."""
    text = _ROLE.sub(r"\1", doc).replace("``", "")
    return re.sub(r"::$", ":", inspect.cleandoc(text), flags=re.MULTILINE)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        return _run(command, rest)
    except KeyboardInterrupt:  # train and study say what is saved; here: an import, plot, info
        print(f"metamixer-fast {command}: interrupted", file=sys.stderr)
        return 130


def _run(command: str, rest: list[str]) -> int:
    if command == "train":
        from . import process_group, train
        rc = train.main(rest)
        if process_group.started:  # a torchrun worker: see process_group.exit_process
            process_group.exit_process(rc)
        return rc
    if command == "plot":
        from .plot import main as plot_main
        return plot_main(rest)
    if command == "study":
        from .study import main as study_main
        return study_main(rest)
    if command == "info":
        from .info import main as info_main
        return info_main(rest)
    print(f"metamixer-fast: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
