"""The DeepSeek-V4 chat format: prompt encoding, reply parsing and a streaming reply parser (spec §6).

Equivalent to DeepSeek's `encoding/encoding_dsv4.py` (`encode_messages`, `parse_message_from_completion_text`),
checked byte-exactly against its official test vectors.
"""

from dsv4.chat.encoding import encode_messages
from dsv4.chat.parsing import parse_completion
from dsv4.chat.stream import Event, StreamParser

__all__ = ["Event", "StreamParser", "encode_messages", "parse_completion"]
