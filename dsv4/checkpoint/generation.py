"""A checkpoint's `generation_config.json` as the server's sampling defaults (what a request leaves out).

DeepSeek's V4 checkpoints ship one (`do_sample true, temperature 1.0, top_p 1.0`: the defaults the server had
anyway); the built-in model's says `do_sample false`: sampled at temperature 1, a 36M-parameter model writes
noise (`lambhhhhhhh3h(pc)`), greedily it writes code-shaped text, as `dsv4 chat` does with it. vLLM serves
a model's generation config the same way. Only the keys present are taken; a request's own values always win.
HF semantics: `do_sample: false` is greedy whatever the other keys say; `top_k: 0` is no top-k (ours: -1).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

FILE = "generation_config.json"
KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_defaults(model_dir: str | Path) -> dict[str, float | int]:
    """{sampling field: value} from `model_dir/generation_config.json`; {} without the file. A value of the wrong
    type or out of its range is a ValueError naming the file and the key (the server must not start on it)."""
    path = Path(model_dir) / FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    sample = raw.get("do_sample", True)
    if not isinstance(sample, bool):
        raise ValueError(f"{path}: do_sample must be true or false, got {sample!r}")
    if not sample:
        return {"temperature": 0.0}
    out: dict[str, float | int] = {}
    for key in KEYS:
        if key not in raw or raw[key] is None:
            continue
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{path}: {key} must be a finite number, got {value!r}")
        out[key] = _checked(path, key, value)
    return out


# key: (low, high, whether low itself is allowed); high always is
RANGES = {"temperature": (0.0, math.inf, True), "top_p": (0.0, 1.0, False), "min_p": (0.0, 1.0, True),
          "repetition_penalty": (0.0, math.inf, False)}


def _checked(path: Path, key: str, value: float) -> float | int:
    if key == "top_k":
        if value != int(value) or value < 0:
            raise ValueError(f"{path}: top_k must be a whole number >= 0 (0: none), got {value!r}")
        return int(value) or -1
    low, high, closed = RANGES[key]
    if not ((low <= value if closed else low < value) and value <= high):
        raise ValueError(f"{path}: {key} = {value!r} is outside its range {'[' if closed else '('}{low}, {high}]")
    return float(value)
