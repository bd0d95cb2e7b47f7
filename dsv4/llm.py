"""`dsv4.LLM`: offline batched generation and chat (names follow vLLM's `LLM`)."""

from __future__ import annotations

import dataclasses
import itertools
import os
import warnings
import weakref
from collections.abc import Iterator, Sequence

from tqdm.auto import tqdm

from dsv4.chat import encode_messages, parse_completion
from dsv4.engine.config import EngineConfig
from dsv4.engine.engine import Engine
from dsv4.engine.outputs import RequestOutput
from dsv4.engine.sampling import SamplingParams

_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}


class LLM:
    """`LLM(model=None | directory | "owner/name", **engine_options)`; None = the built-in tiny model.

    Engine options are the fields of `EngineConfig`: device, dtype, quant_emulation, max_model_len,
    max_num_seqs, max_num_batched_tokens, page_size, num_pages, memory_fraction, cpu_cache_gib,
    enable_prefix_caching (default True; docs/prefix_caching.md), max_prefix_snapshots,
    tensor_parallel_size (> 1: the model is sharded over that many processes, spawned here or started by torchrun;
    see docs/parallel.md; `close()` releases them), num_speculative_tokens (> 0: MTP speculative decoding,
    engine/speculative.py; single-rank only).
    """

    def __init__(self, model: str | os.PathLike | None = None, revision: str | None = None,
                 download_dir: str | None = None, progress: bool = False, **engine_options):
        unknown = sorted(set(engine_options) - _ENGINE_FIELDS)
        if unknown:
            raise TypeError(f"unknown engine options {unknown}; valid: {sorted(_ENGINE_FIELDS)}")
        from dsv4.checkpoint.hub import resolve_model
        from dsv4.checkpoint.reader import checkpoint_tokenizer

        self.econf = EngineConfig(**engine_options)
        self.path = resolve_model(model, revision, download_dir)
        self.is_builtin = model is None
        self.model = self._load(progress)
        self.tokenizer = checkpoint_tokenizer(self.path)
        if self.tokenizer.get_vocab_size() > self.model.cfg.vocab_size:
            warnings.warn(f"the tokenizer has {self.tokenizer.get_vocab_size()} ids but the model only "
                          f"{self.model.cfg.vocab_size}: text prompts may be rejected", stacklevel=2)
        self.engine = Engine(self.model, self.tokenizer, self.econf)
        self._ids = itertools.count()

    def _load(self, progress: bool):
        from dsv4.dist.context import torchrun_world
        from dsv4.loader import load_model

        econf = self.econf
        args = dict(device=econf.device, dtype=econf.torch_dtype(), quant_emulation=econf.quant_emulation)
        if econf.tensor_parallel_size == 1 and torchrun_world() == 1:
            return load_model(self.path, progress=progress, **args)
        from dsv4.dist.launch import start_model

        driver = start_model(self.path, tp_size=econf.tensor_parallel_size, progress=progress, **args)
        self._release = weakref.finalize(self, driver.close)      # also at interpreter exit
        return driver

    def close(self) -> None:
        """Release the tensor-parallel follower processes (no-op for a single-process model)."""
        release = getattr(self, "_release", None)
        if release is not None:
            release()

    def encode(self, text: str) -> list[int]:
        from dsv4.tokenizer import encode_prompt

        return encode_prompt(self.tokenizer, text, self.model.cfg.bos_token_id)

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """One `RequestOutput` per prompt (text prompts get exactly one BOS; id lists are used as given)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        outputs = [self._add(p, sp) for p, sp in zip(prompts, params, strict=True)]
        with tqdm(total=len(outputs), desc="generating", disable=not use_tqdm) as bar:
            self.engine.generate_all(progress=lambda _: bar.update())
        return outputs

    def stream(self, prompt: str | Sequence[int], sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one completion as they are generated (valid UTF-8 pieces, stop strings withheld).
        The finished `RequestOutput` is the generator's return value. Closing the generator aborts the request."""
        out = self._add(prompt, sampling_params or SamplingParams())
        sent = 0
        try:
            while not out.finished:
                self.engine.step()
                if len(out.text) > sent:
                    yield out.text[sent:]
                    sent = len(out.text)
        finally:
            if not out.finished:
                self.engine.abort(out.request_id)
        return out

    def _add(self, prompt, params: SamplingParams) -> RequestOutput:
        text = prompt if isinstance(prompt, str) else None
        ids = self.encode(prompt) if text is not None else [int(t) for t in prompt]
        return self.engine.add_request(f"req-{next(self._ids)}", ids, params, prompt=text)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             thinking_mode: str = "chat", drop_thinking: bool = True, reasoning_effort: str | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Chat completions in DeepSeek-V4's format; each output's `.message` holds the parsed reply."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [encode_messages(m, thinking_mode=thinking_mode, drop_thinking=drop_thinking,
                                   reasoning_effort=reasoning_effort) for m in conversations]
        outputs = self.generate(prompts, sampling_params, use_tqdm)
        for out in outputs:
            out.message = parse_chat_reply(out.text, thinking_mode)
        return outputs


def parse_chat_reply(text: str, thinking_mode: str) -> dict:
    """The parsed reply; text the format cannot parse (e.g. an untrained model's) comes back as plain content."""
    try:
        return parse_completion(text, thinking_mode)
    except ValueError as e:
        return {"role": "assistant", "reasoning_content": None, "content": text, "tool_calls": [],
                "parse_error": str(e)}
