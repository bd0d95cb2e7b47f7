"""`dsv4.LLM`: offline batched generation and chat (names follow vLLM's `LLM`)."""

from __future__ import annotations

import dataclasses
import itertools
import numbers
import os
import warnings
import weakref
from collections.abc import Iterator, Sequence

from tqdm.auto import tqdm

from dsv4.chat import encode_messages, parse_completion
from dsv4.chat.tokens import EOS
from dsv4.engine.config import EngineConfig
from dsv4.engine.engine import Engine
from dsv4.engine.outputs import RequestOutput
from dsv4.engine.sampling import SamplingParams

_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}


class LLM:
    """`LLM(model=None | directory | "owner/name", **engine_options)`; None = the built-in tiny model.

    model: None (the built-in tiny model, `docs/builtin_model.md`), a local checkpoint directory in the official
    format, or a Hugging Face Hub id, downloaded (at `revision`, into `download_dir`) on first use.
    progress: show progress bars while loading.

    Engine options are the fields of `EngineConfig`: device ("cpu" by default, also when CUDA is available, unlike
    the CLI: pass device="cuda"), dtype (a floating torch dtype, its name, or "auto"/None: bf16 on CUDA, fp32 on
    CPU), quant_emulation, max_model_len, max_num_seqs, max_num_batched_tokens, page_size, num_pages,
    memory_fraction, cpu_cache_gib, enable_prefix_caching (default True; docs/prefix_caching.md),
    max_prefix_snapshots, tensor_parallel_size (> 1: the model is sharded over that many processes, spawned here or
    started by torchrun; see docs/parallel.md; `close()` releases them), num_speculative_tokens (> 0: MTP
    speculative decoding, engine/speculative.py; single-rank only).

    Then `generate` (completions of text or token-id prompts), `chat` (DeepSeek-V4's chat format) and `stream`
    (one completion's text as it is generated). Bad arguments raise TypeError / ValueError naming them; a request
    the engine cannot serve (prompt too long, ids outside the vocabulary) raises `RequestError` (a ValueError).
    """

    # Keyword-only after `model`: LLM(path, "cuda") would have passed "cuda" as the Hub revision, unnoticed.
    def __init__(self, model: str | os.PathLike | None = None, *, revision: str | None = None,
                 download_dir: str | None = None, progress: bool = False, **engine_options):
        unknown = sorted(set(engine_options) - _ENGINE_FIELDS)
        if unknown:
            raise TypeError(f"unknown engine options {unknown}; valid: {sorted(_ENGINE_FIELDS)}")
        if model is not None and not isinstance(model, str | os.PathLike):
            raise TypeError(f"model must be None, a checkpoint directory or a Hub id, got {type(model).__name__}")
        from dsv4.checkpoint.hub import resolve_model
        from dsv4.checkpoint.reader import checkpoint_tokenizer
        from dsv4.loader import check_device

        check_device(engine_options.get("device", EngineConfig.device))    # before the model is read
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
        """The token ids `generate` uses for a text prompt (exactly one BOS first)."""
        from dsv4.tokenizer import encode_prompt

        return encode_prompt(self.tokenizer, text, self.model.cfg.bos_token_id)

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """One `RequestOutput` per prompt, in order; all prompts are batched together.

        prompts: a text, a list of token ids, or a list of texts and/or id lists (text prompts get exactly one BOS;
        id lists are used as given). sampling_params: one `SamplingParams` for every prompt, or one per prompt;
        None = `SamplingParams()` (temperature 1.0, max_tokens 16). Each output has `.outputs` (its `n`
        completions: text, token_ids, finish_reason, stop_reason, logprobs, cumulative_logprob) and the first
        completion's fields as `.text`, `.token_ids`, `.finish_reason`, `.logprobs`.
        """
        prompts = _prompt_list(prompts)
        params = _params_list(sampling_params, len(prompts))
        outputs = self._add_all(prompts, params)
        with tqdm(total=len(outputs), desc="generating", disable=not use_tqdm) as bar:
            self.engine.generate_all(progress=lambda _: bar.update())
        return outputs

    def stream(self, prompt: str | Sequence[int], sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one completion as they are generated (valid UTF-8 pieces, stop strings withheld).
        `prompt` is one text or one list of token ids; `sampling_params.n` must be 1.
        The finished `RequestOutput` is the generator's return value. Closing the generator aborts the request."""
        prompt = _one_prompt(prompt, "prompt")
        params = _params_list(sampling_params, 1)[0]
        if params.n != 1:   # only one completion's deltas could be yielded: the others would be silently dropped
            raise ValueError(f"stream() yields one completion: sampling_params.n must be 1, got {params.n} "
                             f"(use generate() for n > 1)")
        out = self._add(prompt, params)
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

    def _add_all(self, prompts: list, params: list[SamplingParams]) -> list[RequestOutput]:
        """Add every request, or none: one the engine refuses (too long, ids outside the vocabulary) aborts those
        added before it, which would otherwise run, unseen, in the next call."""
        outputs = []
        try:
            for prompt, sp in zip(prompts, params, strict=True):
                outputs.append(self._add(prompt, sp))
        except BaseException:
            for out in outputs:
                self.engine.abort(out.request_id)
            raise
        return outputs

    def _add(self, prompt, params: SamplingParams) -> RequestOutput:
        text = prompt if isinstance(prompt, str) else None
        ids = self.encode(prompt) if text is not None else [int(t) for t in prompt]
        return self.engine.add_request(f"req-{next(self._ids)}", ids, params, prompt=text)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             thinking_mode: str = "chat", drop_thinking: bool = True, reasoning_effort: str | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Chat completions in DeepSeek-V4's format; each output's `.message` holds the parsed reply
        (role, reasoning_content, content, tool_calls; plus parse_error when the text does not parse).

        messages: one conversation (a list of OpenAI-style message dicts) or a list of conversations.
        thinking_mode: "chat" or "thinking"; drop_thinking: drop earlier turns' reasoning from the prompt;
        reasoning_effort: None, "high" or "max" (thinking mode). sampling_params and use_tqdm as in `generate`.
        """
        if not isinstance(messages, list | tuple):
            # A dict (one message) would fail with a bare KeyError, a str be read one character at a time.
            raise TypeError(f"messages must be a list of message dicts or a list of such lists, "
                            f"got {type(messages).__name__}")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [encode_messages(m, thinking_mode=thinking_mode, drop_thinking=drop_thinking,
                                   reasoning_effort=reasoning_effort) for m in conversations]
        outputs = self.generate(prompts, sampling_params, use_tqdm)
        for out in outputs:
            out.message = parse_chat_reply(out.text, thinking_mode, self.ended_at_eos(out))
        return outputs

    def ended_at_eos(self, out: RequestOutput) -> bool:
        """Whether the (first) completion ended by generating EOS: the stop token is not part of `.text`."""
        return (out.finish_reason == "stop" and bool(out.token_ids)
                and out.token_ids[-1] == self.model.cfg.eos_token_id)


def _is_ids(x) -> bool:
    # numbers.Integral: numpy / torch integer scalars too; bool is an int but never a token id.
    return isinstance(x, list | tuple) and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in x)


def _one_prompt(prompt, name: str) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if _is_ids(prompt):
        return [int(t) for t in prompt]
    raise TypeError(f"{name} must be a str or a list of int token ids, got {type(prompt).__name__}"
                    f"{' (a list of prompts? use generate())' if isinstance(prompt, list | tuple) else ''}"
                    f"{' (use .tolist())' if hasattr(prompt, 'tolist') else ''}")


def _prompt_list(prompts) -> list[str | list[int]]:
    """`generate`'s prompts as a list of prompts (None, bytes or a tensor would otherwise fail deep inside, or be
    read as ids)."""
    if isinstance(prompts, str) or (_is_ids(prompts) and prompts):
        return [_one_prompt(prompts, "prompts")]
    if not isinstance(prompts, list | tuple):
        raise TypeError(f"prompts must be a str, a list of int token ids, or a list of those, "
                        f"got {type(prompts).__name__}{' (use .tolist())' if hasattr(prompts, 'tolist') else ''}")
    return [_one_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)]


def _params_list(params, n: int) -> list[SamplingParams]:
    if params is None:
        params = SamplingParams()
    if isinstance(params, SamplingParams):
        return [params] * n
    if not isinstance(params, list | tuple) or not all(isinstance(p, SamplingParams) for p in params):
        raise TypeError(f"sampling_params must be None, a SamplingParams or a list of them, "
                        f"got {type(params).__name__}")
    if len(params) != n:
        raise ValueError(f"{n} prompts but {len(params)} sampling params")
    return list(params)


def parse_chat_reply(text: str, thinking_mode: str, ended_at_eos: bool = False) -> dict:
    """The parsed reply; text the format cannot parse (e.g. an untrained model's) comes back as plain content.
    `ended_at_eos`: the completion stopped on EOS, which the engine leaves out of the text but the format's
    grammar ends a plain reply with (without it, every finished reply was reported as a parse error)."""
    try:
        return parse_completion(text + EOS if ended_at_eos else text, thinking_mode)
    except ValueError as e:
        return {"role": "assistant", "reasoning_content": None, "content": text, "tool_calls": [],
                "parse_error": str(e)}
