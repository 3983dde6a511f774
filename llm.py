"""`python llm.py`: the LLMWS chat client (REPL, or one prompt with --prompt).

Also the library's import path from the repository root::

    from llm import LLMWSEnhancedClient

Run with a Python that lacks the client's packages (a fresh shell's `python`, not the
project's `.venv`), the script starts itself again under `.venv/bin/python` when
`make run` or `make setup` made one.
"""

import os
import sys
from pathlib import Path

_VENV_PYTHON = Path(__file__).resolve().parent / ".venv" / "bin" / "python"

try:
    import websockets  # noqa: F401  (the one package the client needs)
except ImportError:
    if (
        __name__ == "__main__"
        and _VENV_PYTHON.exists()
        and Path(sys.prefix).resolve() != _VENV_PYTHON.parent.parent.resolve()
    ):
        os.execv(str(_VENV_PYTHON), [str(_VENV_PYTHON), __file__, *sys.argv[1:]])
    raise ImportError(
        "llm.py needs the project's packages: run `make setup` (or `make run`), then use "
        f"{_VENV_PYTHON} or this script again"
    ) from None

from llmws_core.client.client import *  # noqa: E402, F403
from llmws_core.client.client import LLMWSClientError, LLMWSEnhancedClient  # noqa: E402, F401

if __name__ == "__main__":
    from llmws_core.client.repl import main

    sys.exit(main())
