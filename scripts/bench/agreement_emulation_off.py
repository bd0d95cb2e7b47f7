import torch

from dsv4.bench.run import BenchOptions, _agreement
from dsv4.checkpoint.synth import synthesize_tensors
from dsv4.config import ModelConfig
from dsv4.loader import load_tensors

cfg = ModelConfig.preset("flash").truncated(4)
t = synthesize_tensors(cfg, 0, "cuda")
for emu in (False,):
    m = load_tensors(cfg, t, "cuda", torch.bfloat16, quant_emulation=emu)
    print("emulation", emu, _agreement(m, BenchOptions(agreement_steps=32)), flush=True)
