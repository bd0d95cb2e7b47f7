"""Resuming `dsv4 finetune` as a user does: the same command resumes; other settings, another process count, another
LoRA rank or ranks saved at different steps stop the run with one line instead of a traceback, an abort or a silent
fresh start over the saved run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dist_helpers import spawned_ranks

import dsv4
from dsv4.cli import main
from dsv4.train.data import Document, PackStream, pack
from dsv4.train.dist import DistContext
from dsv4.train.loop import TrainConfig, Trainer
from dsv4.train.params import prepare_lora


def _trainer(ckpt, out, rank=4, ctx=None, **cfg) -> Trainer:
    m = dsv4.load_model(ckpt, dtype=torch.float32, progress=False)
    torch.manual_seed(0)
    m = prepare_lora(m, rank)
    docs = [Document([0, *range(5, 5 + n)], [True] * (n + 1)) for n in (20, 30, 25, 17)]
    cfg = TrainConfig(**{"max_steps": 1, "lr": 1e-2, "warmup_steps": 1, "seq_len": 64, "packs_per_step": 2,
                         "grad_ckpt": False, **cfg})
    return Trainer(m, PackStream(pack(docs, 64), 2), cfg, out, ctx, progress=False)


def _finetune(ckpt, data, out, *extra):
    return main(["finetune", "--model", str(ckpt), "--data", str(data), "--lora", "2", "--seq-len", "64",
                 "--out", str(out), "--max-steps", "1", *extra])


def test_resume_with_other_settings_or_process_count_is_refused(tiny_ckpt, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input_ids": [0, 5, 6, 7, 8]}) + "\n")
    out = tmp_path / "out"
    assert _finetune(tiny_ckpt, data, out) == 0
    assert _finetune(tiny_ckpt, data, out, "--lr", "1e-3") == 2          # was: resumed silently under another lr
    assert "train.lr 0.0001 -> 0.001" in capsys.readouterr().err
    assert _finetune(tiny_ckpt, data, out, "--max-steps", "2") == 0      # a longer run continues
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    # a 2-process run's state: was silently restarted from step 0, dropping its records
    state = out / "train_state"
    for r in range(2):
        shutil.copy(state / "rank0-of-1.pt", state / f"rank{r}-of-2.pt")
    (state / "rank0-of-1.pt").unlink()
    assert _finetune(tiny_ckpt, data, out, "--max-steps", "2") == 2
    assert "2-process run" in capsys.readouterr().err


def test_resume_with_another_lora_rank_is_a_value_error(tiny_ckpt, tmp_path):
    _trainer(tiny_ckpt, tmp_path).run()
    with pytest.raises(ValueError, match="other --lora rank"):              # was: a RuntimeError from copy_
        _trainer(tiny_ckpt, tmp_path, rank=2, max_steps=2).run()


def _interrupted_save_rank(rank: int, world: int, init: str, ckpt: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    ctx, out = DistContext(rank, world), Path(out)
    state = out / "run" / "train_state" / f"rank{rank}-of-{world}.pt"
    _trainer(ckpt, out / "run", ctx=ctx).run()                              # saved at step 1
    shutil.copy(state, out / f"step1-{rank}.pt")
    _trainer(ckpt, out / "run", ctx=ctx, max_steps=2).run()                 # saved at step 2
    if rank == 1:     # the save of step 2 was interrupted after rank 0's rename, before rank 1's
        state.replace(state.with_suffix(".tmp"))
        shutil.copy(out / "step1-1.pt", state)
    dist.barrier()
    resumed = _trainer(ckpt, out / "run", ctx=ctx, max_steps=2)
    resumed.load_state()
    if rank == 1:     # the same without rank 1's new state: no rank can resume
        shutil.copy(out / "step1-1.pt", state)
    dist.barrier()
    try:
        _trainer(ckpt, out / "run", ctx=ctx, max_steps=2).load_state()
        error = None
    except ValueError as e:
        error = str(e)
    torch.save({"recovered_step": resumed.step, "error": error}, out / f"rank{rank}.pt")


def test_ranks_saved_at_different_steps_recover_or_stop_together(tiny_ckpt, tmp_path):
    """Was: each rank resumed from its own step, then the collectives mismatched (gloo abort; NCCL hangs)."""
    results = spawned_ranks(_interrupted_save_rank, tiny_ckpt, tmp_path)
    assert [r["recovered_step"] for r in results] == [2, 2]
    assert all(r["error"] and "different steps ([2, 1]" in r["error"] for r in results)


def test_expert_parallel_with_one_process_says_it_changes_nothing(tiny_ckpt, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input_ids": [0, 5, 6, 7, 8]}) + "\n")
    with pytest.warns(UserWarning, match="with one process it changes nothing"):      # was silently ignored
        assert _finetune(tiny_ckpt, data, tmp_path / "out", "--expert-parallel") == 0


def test_only_the_first_rank_prints(tiny_ckpt, tmp_path, capsys, monkeypatch):
    # under torchrun every rank runs the command: N copies of "note:" and "wrote" lines
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input_ids": [0, 5, 6, 7, 8]}) + "\n")
    monkeypatch.setenv("RANK", "1")
    assert main(["finetune", "--data", str(data), "--lora", "2", "--seq-len", "64", "--out", str(tmp_path / "o"),
                 "--max-steps", "1"]) == 0
    out = capsys.readouterr()
    assert "wrote" not in out.out and "note:" not in out.err


def test_without_a_terminal_progress_is_a_line_on_stderr(tiny_ckpt, tmp_path, capsys):
    # no tqdm bar when stderr is a file: nothing was printed until the run ended
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input_ids": [0, 5, 6, 7, 8]}) + "\n")
    assert _finetune(tiny_ckpt, data, tmp_path / "out", "--max-steps", "2") == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("finetune: step")]
    assert lines and lines[-1].startswith("finetune: step 2/2, loss ") and lines[-1].endswith("tokens/s")
