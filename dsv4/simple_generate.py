"""Stateless token-by-token generation (re-runs the full forward each step).

A placeholder for the engine: correct by construction (it only uses the full-sequence forward), slow for long
outputs. Sampling follows the reference: logits / T, softmax, exponential race; T = 0 is greedy.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 seed: int | None = None, stop_ids: tuple[int, ...] = (1,)) -> Iterator[int]:
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else seed)
    for _ in range(max_new_tokens):
        logits = model(ids, last_only=True)[0, -1]
        if temperature <= 0:
            token = int(logits.argmax())
        else:
            probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
            noise = torch.empty_like(probs).exponential_(1, generator=gen)
            token = int((probs / noise).argmax())
        yield token
        if token in stop_ids:
            return
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)


def stream_text(tokenizer, token_iter: Iterator[int]) -> Iterator[str]:
    """Text pieces as tokens arrive; a piece is held back while it ends in an incomplete UTF-8 sequence."""
    ids, emitted = [], ""
    for token in token_iter:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            continue
        yield text[len(emitted):]
        emitted = text
