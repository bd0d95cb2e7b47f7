"""Where the tests find DeepSeek's official reference data (a copy of `../shared/reference`, see its README)."""

from pathlib import Path

REFERENCE = Path(__file__).resolve().parent / "reference"
OFFICIAL_TINY = REFERENCE / "official-tiny-case"
CHAT_VECTORS = REFERENCE / "chat-encoding"
