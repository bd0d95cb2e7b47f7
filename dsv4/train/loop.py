"""The SFT loop: packs -> forward/backward per pack (gradient accumulation) -> clip -> AdamW -> records.

One optimiser step consumes `packs_per_step` packs; under FSDP rank r takes packs r, r+world, ... of them, and
every rank divides its summed cross-entropy by the step's GLOBAL number of target tokens (known to every rank,
the data order being deterministic), so the loss curve does not depend on the number of processes.
Resumable: `train_state/` holds the trainable tensors, gate biases, optimiser state and step (per rank: FSDP
shards and, with expert parallel, the rank's own experts; resume with the same number of processes).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dsv4.model.state import to_device
from dsv4.train import ep
from dsv4.train.compiled import compile_blocks, compiled_graphs, eager_blocks, pad_pack, pad_rows
from dsv4.train.data import PackStream
from dsv4.train.dist import DistContext, shard
from dsv4.train.forward import LoadCounter, PackedBatch, TrainStep, packed_batch, rows_batch
from dsv4.train.greedy_probe import (
    greedy_continue,
    greedy_continue_cached,
    mix_prompts,
    preserved_rng_and_modes,
    probe_prefixes,
    probe_stats,
    repeat_mask,
    row_prefixes,
    sequences_batch,
)
from dsv4.train.metrics import MetricsLog, expert_load, plot_loss
from dsv4.train.optim import MasterWeights, clip_grad_norm, lr_at, make_optimizer, update_gate_bias
from dsv4.train.params import forget_qat, refresh_qat

log = logging.getLogger("dsv4.train")


@dataclass
class TrainConfig:
    max_steps: int = 100
    lr: float = 1e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    seq_len: int = 2048
    packs_per_step: int = 1
    grad_ckpt: bool = True
    mtp_weight: float = 0.0
    bias_update_rate: float = 0.0
    save_every: int = 0            # 0: only at the end
    seed: int = 0
    expert_parallel: bool = False  # under torchrun: routed experts split over the ranks (train/ep.py)
    compile: str | None = None     # None (eager), "aot_eager" or "inductor": compiled blocks (train/compiled.py)
    pad_to_seq_len: bool = False   # pad packs to seq_len tokens (rows packs: seq_len / row_len rows): one compiled
                                   # graph set for every step
    rows: bool = False             # packs are `data.row_packs` rows: run as one [rows, row_len] batch (rows_batch)
    # Unlikelihood of wrong in-context copies (train/unlikelihood.py): loss = (CE + unlikelihood * UL) summed over
    # the step's target positions / their number (UL is 0 where there is no wrong copy candidate). copy_ngram: the
    # candidate follows an earlier occurrence of the last copy_ngram - 1 tokens (0: off, and no copy statistics;
    # else they are logged even at unlikelihood 0); copy_window: that occurrence at most this far back (0: anywhere
    # in the document).
    unlikelihood: float = 0.0
    copy_ngram: int = 4
    copy_window: int = 0
    # Greedy-repetition probe (train/greedy_probe.py): every greedy_probe_every steps (0: off; steps 0, N, 2N, ...)
    # probe_prefixes prefixes of probe_prefix_len tokens of the step's (this rank's first) pack are continued
    # greedily by probe_tokens tokens; greedy_seq_rep4 and greedy_distinct4 are logged. seq_unlikelihood ALPHA > 0
    # adds, on those steps, ALPHA * (summed sequence-level unlikelihood of the continuation tokens completing an
    # earlier 4-gram) / (number of continuation positions of all ranks) to the step's loss.
    greedy_probe_every: int = 0
    probe_prefixes: int = 16
    probe_prefix_len: int = 32
    probe_tokens: int = 64
    seq_unlikelihood: float = 0.0
    # the share of the probe's prefixes taken from the Trainer's `probe_prompts` instead of the pack (e.g. chat
    # requests through the assistant marker: the greedy tokens are then replies, and seq-UL sees their loops)
    probe_prompt_share: float = 0.0
    # further prefix lengths: probe k uses (probe_prefix_len, *probe_prefix_lens)[k % n] for the pack's starts and
    # takes the prompts of that length (e.g. chat requests at 32 tokens, function headers at 9 and 11: a probe is
    # one [P, length] batch, so each length gets its own probes)
    probe_prefix_lens: tuple[int, ...] = ()
    # generate the probe's tokens through decode state (greedy_continue_cached) instead of a full forward each
    probe_cache: bool = False


@dataclass
class StepValues:
    """What the step's record needs from the device, on the host."""
    sums: list[float]                      # summed main CE, MTP CE, and the copy terms (`TrainStep`)
    grad_norm: float
    counts: dict[str, torch.Tensor]        # tokens per routed expert, per gate (host int64)


def read_step_values(sums: torch.Tensor, grad_norm: torch.Tensor, counts: dict[str, torch.Tensor]) -> StepValues:
    """The step's ONE read of the device: every other host read makes the host wait for the GPU's queue to drain
    (host and GPU time then add up instead of overlapping). All values travel as float64 (exact for the fp32 norm,
    the float64 sums and integer counts below 2**53)."""
    flat = torch.cat([sums, grad_norm.double().view(1), *(c.double() for c in counts.values())]).tolist()
    out, at = {}, len(sums) + 1
    for name, c in counts.items():
        out[name] = torch.tensor([int(v) for v in flat[at:at + c.numel()]], dtype=torch.long)
        at += c.numel()
    return StepValues(flat[:len(sums)], flat[len(sums)], out)


def copy_record(copy: list[float], n_targets: int) -> dict:
    """The step's copy statistics: the unlikelihood term (before its weight) per target position; the fractions of
    target positions whose copy candidate is wrong, that have one, whose wrong candidate is the argmax (a greedy
    wrong copy); the mean p(c_t) of the wrong candidates."""
    ul, wrong, p_wrong, has, top1 = copy
    return {"copy_ul": ul / n_targets, "copy_wrong_frac": wrong / n_targets, "copy_frac": has / n_targets,
            "copy_wrong_top1_frac": top1 / n_targets, "copy_wrong_p": p_wrong / wrong if wrong else None}


def _check_probe(cfg: TrainConfig) -> None:
    if cfg.seq_unlikelihood and not cfg.greedy_probe_every:
        raise ValueError("seq_unlikelihood needs greedy_probe_every > 0 (the probe makes its sequences)")
    if not cfg.greedy_probe_every:
        return
    lengths = probe_lengths(cfg)
    if cfg.probe_prefixes < 1 or min(lengths) < 1 or cfg.probe_tokens < 4:
        raise ValueError("the greedy probe needs >= 1 prefix of >= 1 token and >= 4 new tokens (one 4-gram)")
    if not 0 <= cfg.probe_prompt_share <= 1:
        raise ValueError(f"probe_prompt_share must be in [0, 1], got {cfg.probe_prompt_share}")
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"the probes' prefix lengths must differ (each has its own prompts and turn), got "
                         f"{list(lengths)}")


def probe_lengths(cfg: TrainConfig) -> tuple[int, ...]:
    """The probes' prefix lengths, in the order the probes cycle through them."""
    return (cfg.probe_prefix_len, *cfg.probe_prefix_lens)


def prompts_by_length(prompts: list[list[int]], lengths: tuple[int, ...], share: float, count: int) -> dict:
    """{length: the prompts of that length} for the probes' lengths. With share > 0 (checked before any training)
    every prompt needs a probe of its length and every length needs prompts."""
    groups = {n: [q for q in prompts if len(q) == n] for n in lengths}
    if share:
        stray = sorted({len(q) for q in prompts} - set(lengths))
        if stray:
            want = lengths[0] if len(lengths) == 1 else f"one of {list(lengths)}"
            raise ValueError(f"probe prompts must have the prefix length {want}; got lengths {stray}")
        for n in lengths:                                   # raises where a length has no prompts
            mix_prompts([[0] * n] * count, groups[n], share, 0)
    return groups


class Trainer:
    def __init__(self, model, stream: PackStream, cfg: TrainConfig, out_dir, ctx: DistContext | None = None,
                 progress: bool = True, probe_prompts: list[list[int]] | None = None,
                 log_every_s: float | None = None):
        """`progress`: a tqdm bar. `log_every_s`: without the bar, a plain line on stderr at most this often (a
        run whose stderr goes to a log file printed nothing until it ended)."""
        ctx = ctx or DistContext()
        self.log_every_s = log_every_s
        if cfg.packs_per_step % ctx.world:
            raise ValueError(f"packs_per_step={cfg.packs_per_step} must be a multiple of the {ctx.world} processes")
        _check_probe(cfg)
        if cfg.compile and not cfg.pad_to_seq_len:
            raise ValueError("compile needs pad_to_seq_len (packs padded to one shape): steps of other shapes "
                             "would compile again")
        self.model, self.stream, self.cfg, self.ctx = model, stream, cfg, ctx
        self.probe_prompts = prompts_by_length(list(probe_prompts or []), probe_lengths(cfg),
                                               cfg.probe_prompt_share if cfg.greedy_probe_every else 0.0,
                                               cfg.probe_prefixes)
        self.out, self.progress = Path(out_dir), progress and ctx.main
        self.device = next(model.parameters()).device
        if cfg.expert_parallel:
            ep.install(model, ctx)
        step = TrainStep(model, cfg.grad_ckpt, cfg.mtp_weight, cfg.unlikelihood, cfg.copy_ngram, cfg.copy_window)
        self.step_module = shard(step, ctx, ep.local_expert_params(model))
        self.params = [(n, p) for n, p in self.step_module.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("nothing to train: no parameter requires a gradient")
        self.master = MasterWeights([p for _, p in self.params])
        self.opt = make_optimizer(self.master.masters, cfg.lr, cfg.weight_decay)
        self.counter = LoadCounter(model)
        if cfg.compile:
            compile_blocks(model, cfg.compile)
        self.step = 0
        self.steps_run = 0            # by this process (a resumed run compiles at its first step too)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        t0, graphs = time.perf_counter(), compiled_graphs()
        packs = self.stream.step(self.step)
        # max(1, .): a step whose targets were all cut off by truncation contributes a zero loss, not NaN.
        n_targets = max(1, sum(d.n_targets for p in packs for d in p))
        n_mtp = sum(sum(d.mask[2:]) for p in packs for d in p if len(d) >= 3)
        lr = lr_at(self.step, self.cfg.lr, self.cfg.warmup_steps, self.cfg.max_steps, self.cfg.min_lr_ratio)
        for g in self.opt.param_groups:
            g["lr"] = lr
        # summed main CE, MTP CE; the copy terms (unlikelihood, wrong copies, their summed p, candidates, top-1 wrong);
        # the greedy probe's (repeated continuation 4-grams, distinct ones, sequence-level unlikelihood)
        sums = torch.zeros(10, dtype=torch.float64, device=self.device)
        refresh_qat(self.model)                                 # once per step: the weights change only below
        for pack in packs[self.ctx.rank::self.ctx.world]:
            ce, mtp, _, copy = self.step_module(self._batch(pack))
            loss = ce / n_targets
            if copy is not None:
                if self.cfg.unlikelihood:
                    loss = loss + self.cfg.unlikelihood * copy[0] / n_targets
                sums[2:7] += copy.detach().double()
            if mtp is not None and n_mtp:
                loss = loss + self.cfg.mtp_weight * mtp / n_mtp
                sums[1] += mtp.detach().double()
            sums[0] += ce.detach().double()
            self.counter.enabled = False                        # checkpoint recomputation must not count
            loss.backward()
            self.counter.enabled = True
        probe = self.cfg.greedy_probe_every and self.step % self.cfg.greedy_probe_every == 0
        if probe:                                               # after the packs: the same QAT-rounded weights
            tp = time.perf_counter()
            sums[7:] = self._probe(packs[self.ctx.rank])
            probe_s = time.perf_counter() - tp
        forget_qat(self.model)
        self.master.grads_to_masters()
        grad_norm = clip_grad_norm(self.master.masters, self.cfg.clip_grad or float("inf"), self.ctx)
        counts = {n: self.ctx.all_sum(c) for n, c in self.counter.take().items()}
        host = read_step_values(self.ctx.all_sum(sums), grad_norm, counts)
        if not math.isfinite(host.grad_norm):
            raise FloatingPointError(f"step {self.step}: the gradient norm is {host.grad_norm}")
        if not all(map(math.isfinite, host.sums)):
            raise FloatingPointError(f"step {self.step}: non-finite loss {host.sums} (NaN/inf logits): the weights "
                                     "or inputs are broken")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.master.masters_to_params()
        update_gate_bias(self.model, counts, self.cfg.bias_update_rate)
        tokens = sum(len(d) for p in packs for d in p)
        record = {"step": self.step, "loss": host.sums[0] / n_targets, "lr": lr, "grad_norm": host.grad_norm,
                  "tokens": tokens, "target_tokens": n_targets,
                  "tok_per_s": tokens / (time.perf_counter() - t0)}
        if self.cfg.mtp_weight and n_mtp:
            record["mtp_loss"] = host.sums[1] / n_mtp
        if self.cfg.copy_ngram:
            record.update(copy_record(host.sums[2:7], n_targets))
        if probe:
            record.update(self._probe_record(host.sums[7:], probe_s))
        record["expert_load"] = expert_load(host.counts)
        if self.cfg.compile:
            record["compiled_graphs"] = self._new_graphs(compiled_graphs() - graphs)
        self.step += 1
        self.steps_run += 1
        return record

    def _probe(self, pack) -> torch.Tensor:
        """The greedy probe of this rank (train/greedy_probe.py) and, with seq_unlikelihood, its term's backward
        (gradients accumulate onto the packs'). The expert load counter is off: neither the generated tokens nor
        their training forward move the gate biases. -> [3] fp64 (repeated continuation 4-grams, distinct ones,
        summed unlikelihood before ALPHA)."""
        cfg, bos = self.cfg, self.model.cfg.bos_token_id
        # probe k (this step's) uses the k-th length of the cycle and is the round-th probe of that length
        lengths = probe_lengths(cfg)
        round_, which = divmod(self.step // max(cfg.greedy_probe_every, 1), len(lengths))
        P, first, L = cfg.probe_prefixes, lengths[which], cfg.probe_tokens
        self.counter.enabled = False
        # eager_blocks: the probe's sequences grow a token at a time; compiled, each length would compile again
        with preserved_rng_and_modes(self.model), eager_blocks(self.model):
            # rows: the rows' own starts (documents at position 0, as prompts are); else windows of the pack
            starts = row_prefixes(pack, P, first, bos) if cfg.rows else probe_prefixes(pack, P, first, bos)
            # each probe takes the next prompts of the list (ranks apart), so a run cycles through all of them
            k = round(cfg.probe_prompt_share * P)
            starts = mix_prompts(starts, self.probe_prompts[first], cfg.probe_prompt_share,
                                 (round_ * self.ctx.world + self.ctx.rank) * k)
            prefixes = to_device(torch.tensor(starts), self.device)
            if cfg.probe_cache:     # captured decode steps where nothing gathers weights (no FSDP): one process
                ids = greedy_continue_cached(self.step_module, prefixes, L,
                                             graphs=self.device.type == "cuda" and not self.ctx.enabled)
            else:
                ids = greedy_continue(self.step_module, prefixes, L)
            repeats = repeat_mask(ids)
            ul = torch.zeros((), dtype=torch.float64, device=self.device)
            if cfg.seq_unlikelihood:
                batch = PackedBatch(ids.reshape(1, -1), None, sequences_batch(P, first + L, self.device), [])
                ul = self.step_module(batch, task="seq_ul", repeats=repeats, first=first)
                (cfg.seq_unlikelihood * ul / (P * L * self.ctx.world)).backward()
        self.counter.enabled = True
        return torch.cat([probe_stats(ids, repeats, first), ul.detach().double().view(1)])

    def _probe_record(self, sums: list[float], probe_s: float) -> dict:
        """Means over every rank's continuations; seq_ul per continuation position, before ALPHA."""
        n = self.cfg.probe_prefixes * self.ctx.world
        rec = {"greedy_seq_rep4": sums[0] / (n * self.cfg.probe_tokens),
               "greedy_distinct4": sums[1] / (n * (self.cfg.probe_tokens - 3)), "probe_s": probe_s}
        if self.cfg.seq_unlikelihood:
            rec["seq_ul"] = sums[2] / (n * self.cfg.probe_tokens)
        return rec

    def _new_graphs(self, n: int) -> int:
        """n graphs compiled this step: expected at the first, a warning after it (the padded shapes should make
        every step's graphs those of the first)."""
        if n and self.steps_run:
            log.warning("step %d compiled %d graphs again after the first step: a shape or guarded value changed "
                        "(TORCH_LOGS=recompiles says which)", self.step, n)
        return n

    def _batch(self, pack) -> PackedBatch:
        """The pack as one batch; with `pad_to_seq_len`, padded to seq_len tokens (not counted as expert load);
        with `rows`, its rows as one [rows, row_len] batch (their padding not counted either), with
        `pad_to_seq_len` padded with empty rows to seq_len / row_len rows."""
        if self.cfg.rows:
            if self.cfg.pad_to_seq_len:                     # every pack seq_len / row_len rows: one shape
                pack = pad_rows(pack, self.cfg.seq_len // len(pack[0]))
            pb = rows_batch(pack, self.device)
            self.counter.real_mask(pb.real)
            return pb
        if not self.cfg.pad_to_seq_len:
            return packed_batch(pack, self.device)
        padded = pad_pack(pack, self.cfg.seq_len)           # padded before the batch is built: built once
        self.counter.real_tokens(len(pack[0]))
        return packed_batch(padded, self.device)

    # ------------------------------------------------------------------ the run
    def run(self) -> list[dict]:
        self.load_state()
        log = MetricsLog(self.out, self.step) if self.ctx.main else None
        bar = tqdm(total=self.cfg.max_steps, initial=self.step, desc="finetune", unit="step",
                   disable=not self.progress)
        records, last_line = [], time.monotonic()
        while self.step < self.cfg.max_steps:
            rec = self.train_step()
            records.append(rec)
            if log:
                log.write(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tok_per_s']:.0f}")
            bar.update(1)
            last_line = self._log_line(rec, last_line)
            if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.cfg.max_steps:
                self.save_state()
        bar.close()
        self.save_state()
        if self.ctx.main and (self.out / "metrics.jsonl").exists():
            plot_loss(self.out / "metrics.jsonl", self.out / "loss.png")
        return records

    def _log_line(self, rec: dict, last: float) -> float:
        """Print a progress line when `log_every_s` has passed since the last one (or at the last step)."""
        if not self.log_every_s or self.progress or not self.ctx.main:
            return last
        now = time.monotonic()
        if now - last < self.log_every_s and self.step < self.cfg.max_steps:
            return last
        print(f"finetune: step {self.step}/{self.cfg.max_steps}, loss {rec['loss']:.4f}, "
              f"{rec['tok_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
        return now

    # ------------------------------------------------------------------ resumable state
    def _state_path(self) -> Path:
        return self.out / "train_state" / f"rank{self.ctx.rank}-of-{self.ctx.world}.pt"

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Trainable parameters and gate biases (the only tensors training changes), as local shards."""
        out = {n: p for n, p in self.step_module.named_parameters() if p.requires_grad or n.endswith("gate.bias")}
        return {n: p.to_local() if hasattr(p, "to_local") else p for n, p in out.items()}

    def save_state(self) -> None:
        path = self._state_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"step": self.step, "tensors": {n: t.detach().clone() for n, t in self._tensors().items()},
                 "masters": [m.detach().clone() for m in self.master.masters], "optimizer": self.opt.state_dict(),
                 "config": asdict(self.cfg)}
        torch.save(state, path.with_suffix(".tmp"))
        # Why the barrier: no rank replaces its old state before every rank's new one is complete, so an interrupted
        # save leaves at worst some ranks one save behind, with their new state whole in .tmp (`_agreed_state`).
        self.ctx.barrier()
        path.with_suffix(".tmp").replace(path)

    def load_state(self) -> None:
        path = self._state_path()
        check_state_world(path.parent, self.ctx.world)
        state = self._agreed_state(path)
        if state is None:
            return
        with torch.no_grad():
            mine = self._tensors()
            if set(mine) != set(state["tensors"]):
                raise ValueError(f"{path} does not match this model's trainable tensors (other --lora/--full?)")
            for n, t in mine.items():
                if t.shape != state["tensors"][n].shape:      # e.g. another --lora rank: one line, not a traceback
                    raise ValueError(f"{path} does not match this model: {n} is {list(state['tensors'][n].shape)} "
                                     f"there, {list(t.shape)} here (other --lora rank?)")
                t.copy_(state["tensors"][n])
            for m, saved in zip(self.master.masters, state["masters"], strict=True):
                (m.to_local() if hasattr(m, "to_local") else m).copy_(
                    saved.to_local() if hasattr(saved, "to_local") else saved)
        self.opt.load_state_dict(state["optimizer"])
        self.step = state["step"]

    def _rank_steps(self, state: dict | None) -> list[int]:
        """Every rank's saved step (-1: none), on every rank."""
        steps = torch.zeros(self.ctx.world, dtype=torch.long, device=self.device)     # NCCL: on the GPU
        steps[self.ctx.rank] = -1 if state is None else state["step"]
        return self.ctx.all_sum(steps).tolist()

    def _agreed_state(self, path: Path) -> dict | None:
        """This rank's saved state, at the step every rank resumes from. Ranks at different steps (a save
        interrupted between the ranks' renames) would issue different numbers of collectives: an abort or a hang.
        A rank behind takes its .tmp when that holds the newest step (complete: written before the save's
        barrier); otherwise the run stops with every rank's step."""
        state = torch.load(path, weights_only=False) if path.exists() else None
        steps = self._rank_steps(state)
        tmp = path.with_suffix(".tmp")
        if len(set(steps)) > 1:
            if (state is None or state["step"] < max(steps)) and tmp.exists():
                try:
                    newer = torch.load(tmp, weights_only=False)
                except Exception:                               # a .tmp cut off mid-write: not the newest save
                    newer = None
                if newer is not None and newer["step"] == max(steps):
                    tmp.replace(path)
                    state = newer
            steps = self._rank_steps(state)                     # on every rank: a collective
        if len(set(steps)) > 1:
            raise ValueError(f"{path.parent} holds the ranks' states at different steps ({steps}, -1: none): an "
                             "interrupted save; remove it to start afresh")
        return state


def check_state_world(state_dir: Path, world: int) -> None:
    """A `train_state/` written with another number of processes cannot be resumed (each rank's file holds its
    own shards); starting afresh instead would silently drop that run's progress and records."""
    other = sorted(f.name for f in state_dir.glob("rank*-of-*.pt") if not f.name.endswith(f"-of-{world}.pt"))
    if other:
        n = other[0].rsplit("-of-", 1)[1].removesuffix(".pt")
        raise ValueError(f"{state_dir} holds the state of a {n}-process run ({', '.join(other)}); resume it with "
                         f"{n} processes, or use another output directory")
