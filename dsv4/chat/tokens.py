"""Special-token texts and fixed prompt paragraphs of the DeepSeek-V4 chat format (spec §6).

Every string here must match DeepSeek's `encoding/encoding_dsv4.py` byte for byte: the model was trained on them.
NOTE: the reasoning-effort paragraph is the one of the original V4 release ("max" → this text, "high"/None →
nothing); later refreshed checkpoints reshuffled the tiers, which this module does not model.
"""

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"

# Quick-instruction tasks (a message's `task` field) and the token each appends.
TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}

REASONING_EFFORTS = (None, "high", "max")
REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause,"
    " rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered"
    " alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"

# Tokens that may never appear inside parsed reasoning or content.
FORBIDDEN_IN_TEXT = (BOS, EOS, THINK_START, THINK_END, DSML)
