"""Console-script entry points that exit without the interpreter's teardown.

`coordinator`, `worker` and `geotrain` run click's main(), flush logs and stdio, then `os._exit`
with main's status. gRPC keeps C-core threads (server pollers, channels to departed peers) and
torch keeps thread pools; destroying them during interpreter teardown occasionally hangs the
process after a clean run (seen: a coordinator that had printed "run finished" never exited under
CPU load) or aborts it with SIGABRT. Everything a run must leave behind (checkpoint, summary.json,
logs) is written before main() returns, so skipping the teardown loses nothing. Tests that call
main() in-process keep the normal exit.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable


def exit_code_of(exc: SystemExit) -> int:
    """The status the interpreter would exit with for `exc` (printing a string message, as it would)."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1


def run_then_exit(main: Callable[[], object]) -> None:
    """Call `main` (a click command: it ends with SystemExit), flush, and `os._exit` its status.
    Any other exception is printed with its traceback and exits 1."""
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exit_code_of(exc)
    except BaseException:  # noqa: BLE001 - printed in full, then the process exits 1
        import traceback

        traceback.print_exc()
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
