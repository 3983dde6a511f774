"""What scripts and shell aliases written for the original LLMWS client keep doing: its
constructor arguments, its command-line flags, and `python llm.py` from a fresh shell."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llm import LLMWSEnhancedClient

from ..conftest import REPO, scaled

VENV_PYTHON = REPO / ".venv" / "bin" / "python"


async def test_original_constructor_arguments(shared_daemon) -> None:
    """`LLMWSEnhancedClient(host=..., port=...)` and `LLMWSEnhancedClient("host", port)` connect and chat."""
    for client in (
        LLMWSEnhancedClient(host="127.0.0.1", port=shared_daemon.ws_port),
        LLMWSEnhancedClient("127.0.0.1", shared_daemon.ws_port),
    ):
        assert client.url == shared_daemon.ws_url
        await client.connect()
        text = await client.inference("Say hi.", system="", temperature=0, max_new_tokens=6)
        assert text.strip()
        await client.disconnect(send_ack=True)


def test_original_flags_one_shot(shared_daemon) -> None:
    """`llm.py --host --port -p -s --temperature --top-p --top-k --max-tokens` prints a reply."""
    result = subprocess.run(
        [
            sys.executable,
            "llm.py",
            "--host",
            "127.0.0.1",
            "--port",
            str(shared_daemon.ws_port),
            "-p",
            "Name a fruit.",
            "-s",
            "Answer in one word.",
            "--temperature",
            "0",
            "--top-p",
            "0.9",
            "--top-k",
            "40",
            "--max-tokens",
            "8",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=scaled(120),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_image_flag_reaches_the_daemon_and_is_refused_by_a_text_model(shared_daemon, tmp_path: Path) -> None:
    """`--image` sends the picture; the text-only model's refusal is one line and a non-zero exit."""
    image = tmp_path / "dot.png"
    image.write_bytes(
        bytes.fromhex(
            "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
            "1f15c4890000000d4944415478da63f8cfc0f01f0005000201a5f5e6a40000000049454e44ae426082"
        )
    )
    result = subprocess.run(
        [sys.executable, "llm.py", "--port", str(shared_daemon.ws_port), "-p", "What is this?", "--image", str(image)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=scaled(120),
    )
    assert result.returncode == 1, result
    assert "[unsupported]" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(not VENV_PYTHON.exists(), reason="needs the project's .venv (make setup)")
def test_python_llm_py_from_a_fresh_shell(shared_daemon) -> None:
    """The README's `python llm.py --prompt` works with the Python the venv was made from."""
    base = Path(sys.base_prefix) / "bin" / "python3"
    result = subprocess.run(
        [str(base), "llm.py", "--port", str(shared_daemon.ws_port), "--prompt", "Say hi.", "--max-tokens", "6"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=scaled(120),
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
