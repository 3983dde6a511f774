"""Start the LLMWS daemon: `python llmws.py [--config config.json] [--port 8765] ...`."""

from llmws_core.daemon import main

if __name__ == "__main__":
    main()
