"""`python llm.py`: the LLMWS chat client (REPL, or one prompt with --prompt).

Also the library's import path from the repository root::

    from llm import LLMWSEnhancedClient
"""

from llmws_core.client.client import *  # noqa: F403
from llmws_core.client.client import LLMWSClientError, LLMWSEnhancedClient  # noqa: F401

if __name__ == "__main__":
    import sys

    from llmws_core.client.repl import main

    sys.exit(main())
