"""How the training commands end: a configuration or missing-file error is one line, not a traceback."""

import sys
from collections.abc import Callable

from franca.utils.config_schema import ConfigError

# The errors a user fixes from their command line: each names the key, the value and the fix.
USER_ERRORS = (ConfigError, FileNotFoundError)


def run_command(main: Callable[[], object]) -> None:
    """Run ``main`` and exit: 0 when it returns a result, 1 when it returns None, and 2 with ``error: <message>`` on
    stderr for a :data:`USER_ERRORS` (the traceback says nothing the message does not)."""
    try:
        result = main()
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    raise SystemExit(0 if result is not None else 1)
