"""How commands report a user's mistake: one line ``hybridfast: error: ...`` and exit status 2
(``--debug`` adds the traceback); Ctrl-C prints what it interrupted and exits 130."""
from __future__ import annotations

import argparse
import sys
import traceback
from contextlib import contextmanager

__all__ = ["UserError", "ArgumentParser", "reported"]


class UserError(Exception):
    """A mistake in a command's arguments or inputs, reported as one line (exit status 2)."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line ``hybridfast: error: ...`` (exit status 2)."""

    def error(self, message):
        self.exit(2, f"hybridfast: error: {self.prog}: {message} (see --help)\n")


@contextmanager
def reported(debug: bool, resume: str | None = None):
    """Turn a :class:`UserError` into one line on stderr and exit 2, and Ctrl-C into a line (the
    interrupt's message, then ``resume with: <resume>``) and exit 130; ``debug`` prints the
    traceback first."""
    try:
        yield
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"hybridfast: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:
        if debug:
            traceback.print_exc()
        hint = f"; resume with: {resume}" if resume else ""
        print(f"hybridfast: interrupted: {e or 'before any problem was evaluated'}{hint}", file=sys.stderr)
        raise SystemExit(130) from None
