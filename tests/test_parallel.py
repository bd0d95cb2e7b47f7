"""Tensor + expert parallelism (spec §5.4) on 2 CPU processes with gloo, tiny config, fp32.

Tolerance: fp32 models reduce float64 partials (`RowParallelLinear`), the embedding and head are exact (zeros added,
slices gathered), and the MoE sum has 2 routed experts per token here (every order of a 2-term fp32 sum is the
same), so TP=2 may differ from TP=1 only by the summation order of the float64 `wo_b` sums and of the fp32 indexer
score over heads: a few fp32 ulps, held to rtol=atol=1e-5 (measured: bit-identical on x86 CPUs, emulation on and
off).
The test config doubles `o_lora_rank` to 128: with the default 64, a rank's `wo_b` input slice would be 64 wide,
cutting the 128-wide FP8 activation-quantisation blocks, which the model (like the reference) cannot do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from dist_helpers import spawned_ranks

from dsv4.config import tiny_config
from dsv4.dist.sharding import Rule, check_tp, rule

TOL = dict(rtol=1e-5, atol=1e-5)
IDS = torch.randint(0, 512, (1, 140), generator=torch.Generator().manual_seed(7))   # past one 128-token HCA block


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread here too: the rank processes already take both cores of the CI runner, and two OpenMP
    threads on a busy 2-core machine spin-wait each other at every op (see tests/test_cli.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tp_ckpt(tmp_path_factory):
    from dsv4.checkpoint import synthesize

    return synthesize(tiny_config(o_lora_rank=128), tmp_path_factory.mktemp("tp"), seed=99, progress=False)


# ---------------------------------------------------------------------------------------------- the table
@pytest.mark.parametrize("name, want", [
    ("embed.weight", Rule("split", 0)), ("head.weight", Rule("split", 0)),
    ("layers.1.attn.wq_b.weight", Rule("split", 0)), ("layers.1.attn.wq_b.scale", Rule("split", 0)),
    ("layers.1.attn.wo_a.weight", Rule("split", 0)), ("layers.1.attn.wo_b.scale", Rule("split", 1)),
    ("layers.1.attn.attn_sink", Rule("split", 0)), ("layers.1.attn.indexer.wq_b.weight", Rule("split", 0)),
    ("layers.1.attn.indexer.weights_proj.weight", Rule("split", 0)), ("mtp.0.attn.wo_b.weight", Rule("split", 1)),
    ("layers.3.ffn.experts.5.w2.scale", Rule("expert", expert=5)),
    *[(n, Rule("replicate")) for n in [
        "layers.1.attn.wq_a.weight", "layers.1.attn.wkv.weight", "layers.1.attn.q_norm.weight",
        "layers.1.attn.kv_norm.weight", "layers.1.attn.compressor.wkv.weight", "layers.1.attn.compressor.ape",
        "layers.1.attn.indexer.compressor.wgate.weight", "layers.1.ffn.gate.weight", "layers.0.ffn.gate.tid2eid",
        "layers.1.ffn.shared_experts.w1.weight", "layers.1.hc_attn_fn", "hc_head_base", "norm.weight",
        "mtp.0.e_proj.weight"]]])
def test_sharding_table_follows_the_spec(name, want):
    assert rule(name) == want


def test_unsplittable_models_are_refused_up_front():
    check_tp(tiny_config(o_lora_rank=128), 2)
    with pytest.raises(ValueError, match=r"layers\.N\.attn\.wo_b\.weight: input slices of 64"):
        check_tp(tiny_config(), 2)
    with pytest.raises(ValueError, match="n_heads=4 is not divisible by 8"):
        check_tp(tiny_config(o_lora_rank=128), 8)


# ---------------------------------------------------------------------------------------------- 2 ranks
def _rank(rank: int, world: int, init: str, path: str, out: str) -> None:
    torch.set_num_threads(1)
    from dsv4.checkpoint import CheckpointReader
    from dsv4.dist.context import init_group
    from dsv4.loader import load_model

    reads = {"get": [], "slices": []}
    get, get_slice = CheckpointReader.get, CheckpointReader.get_slice

    def spy_get(self, name):
        reads["get"].append(name)
        return get(self, name)

    def spy_get_slice(self, name):
        sl = get_slice(self, name)

        class Spy:
            def __getattr__(self, attr):                   # get_shape, get_dtype
                return getattr(sl, attr)

            def __getitem__(self, index):
                t = sl[index]
                reads["slices"].append((name, tuple(sl.get_shape()), tuple(t.shape)))
                return t
        return Spy()

    CheckpointReader.get, CheckpointReader.get_slice = spy_get, spy_get_slice
    tp = init_group(rank, world, "cpu", init)
    res = {"reads": reads}
    for qe in (False, True):
        model = load_model(path, dtype=torch.float32, quant_emulation=qe, progress=False, parallel=tp)
        with torch.inference_mode():
            res[qe] = model(IDS)
    res["dynamo"] = "torch._dynamo" in sys.modules          # loading and running a model never imports it
    res["experts"] = {i: [e for e, m in enumerate(b.ffn.experts) if m is not None] for i, b in enumerate(model.layers)}
    wo_a = model.layers[1].attn.wo_a
    res["wo_a"] = (wo_a.weight.detach().clone(), wo_a.scale.detach().clone(), wo_a.groups)
    torch.save(res, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tp_ckpt, tmp_path_factory):
    return spawned_ranks(_rank, tp_ckpt, tmp_path_factory.mktemp("ranks"))


@pytest.mark.parametrize("quant_emulation", [False, True])
def test_tp2_logits_equal_tp1(tp_ckpt, two_ranks, quant_emulation):
    import dsv4

    model = dsv4.load_model(tp_ckpt, dtype=torch.float32, quant_emulation=quant_emulation, progress=False)
    with torch.inference_mode():
        want = model(IDS)
    for res in two_ranks:                                   # every rank ends with the full logits
        torch.testing.assert_close(res[quant_emulation], want, **TOL)


def test_ranks_never_import_dynamo(two_ranks):
    """A process that loads and runs a model (a TP rank, the server, the CLI) does not import Dynamo: ~1.3 s of
    start-up (`ops.registry.trace_constant`; the embeddings' meta-device init would import it through torch._refs)."""
    assert [res["dynamo"] for res in two_ranks] == [False, False]


def test_experts_are_placed_per_spec(two_ranks, tiny_cfg):
    n = tiny_cfg.n_routed_experts
    for rank, res in enumerate(two_ranks):
        for layer, experts in res["experts"].items():
            assert experts == list(range(rank * n // 2, (rank + 1) * n // 2)), (rank, layer)


def test_each_rank_holds_its_wo_a_groups_as_stored(two_ranks, tp_ckpt):
    """wo_a is held FP8: a rank's groups are rows of the weight and of its 128-row scale blocks (o_lora_rank 128)."""
    from dsv4.checkpoint import CheckpointReader

    reader = CheckpointReader(tp_ckpt)
    weight, scale = reader.get("layers.1.attn.wo_a.weight"), reader.get("layers.1.attn.wo_a.scale")
    for rank, res in enumerate(two_ranks):
        w, s, groups = res["wo_a"]
        assert groups == 1 and w.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
        assert torch.equal(w.view(torch.uint8), weight[rank * 128:(rank + 1) * 128].view(torch.uint8))
        assert torch.equal(s.view(torch.uint8), scale[rank:rank + 1].view(torch.uint8))


def test_each_rank_reads_only_its_slices(two_ranks):
    for res in two_ranks:
        full = [n for n in res["reads"]["get"] if rule(n).kind == "split"]
        assert not full, f"split tensors read whole: {full[:5]}"
        sliced = res["reads"]["slices"]
        assert {rule(n).kind for n, _, _ in sliced} == {"split"} and len(sliced) > 50
        for name, whole, part in sliced:
            dim = rule(name).dim
            assert part[dim] < whole[dim] or (name.endswith(".scale") and whole[dim] == 1), (name, whole, part)
            assert part[:dim] + part[dim + 1:] == whole[:dim] + whole[dim + 1:], name
        experts = {rule(n).expert for n in res["reads"]["get"] if rule(n).kind == "expert"}
        assert len(experts) == 4                           # half of the 8 experts, never the other rank's


# ---------------------------------------------------------------------------------------------- the engine
def test_engine_generates_the_same_tokens_with_tp2(tp_ckpt):
    from dsv4.engine.sampling import SamplingParams
    from dsv4.llm import LLM

    prompts = [IDS[0, :140].tolist(), [0, 5, 9, 100, 3], [0, 7, 7, 7]]
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=3, max_tokens=10, ignore_eos=True)]

    def tokens(llm):
        return [[o.outputs[0].token_ids for o in llm.generate(prompts, p)] for p in params]

    with pytest.warns(UserWarning, match="tokenizer"):
        llm = LLM(tp_ckpt, tensor_parallel_size=2, max_num_seqs=2, max_num_batched_tokens=64)
    try:
        got = tokens(llm)
        # The server's view: add / step / abort on rank 0 while the follower keeps pace.
        llm.engine.add_request("a", prompts[1], params[0])
        llm.engine.step()
        llm.engine.abort("a")
        assert not llm.engine.has_unfinished()
    finally:
        llm.close()
    follower = [p for p in mp.active_children() if p.name.startswith("dsv4-tp-rank")]
    assert not follower, "the follower outlived close()"
    with pytest.warns(UserWarning, match="tokenizer"):
        want = tokens(LLM(tp_ckpt, max_num_seqs=2, max_num_batched_tokens=64))
    assert got == want


# ---------------------------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def tp_text_ckpt(tmp_path_factory):
    """The tiny TP config with the real V4 vocabulary, so text prompts tokenise."""
    from dsv4.checkpoint import synthesize

    cfg = tiny_config(o_lora_rank=128, vocab_size=129280)
    return synthesize(cfg, tmp_path_factory.mktemp("tp_text"), seed=5, progress=False)


def _cli(*args, launcher=(sys.executable, "-m", "dsv4")) -> subprocess.CompletedProcess:
    """Run the command in its own session, so a hang kills the launcher AND its rank processes."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([*launcher, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def want_text(tp_text_ckpt) -> str:
    """What `dsv4 generate "hello world" --max-tokens 6` prints at TP=1."""
    from dsv4.engine.sampling import SamplingParams
    from dsv4.llm import LLM

    return LLM(tp_text_ckpt).generate("hello world", SamplingParams(temperature=0, max_tokens=6))[0].outputs[0].text


def test_cli_generate_with_tp2(tp_text_ckpt, want_text):
    done = _cli("generate", "hello world", "--model", str(tp_text_ckpt), "--tp", "2", "--max-tokens", "6")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout == want_text + "\n"


def test_cli_generate_under_torchrun(tp_text_ckpt, want_text):
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dsv4")
    done = _cli("generate", "hello world", "--model", str(tp_text_ckpt), "--max-tokens", "6", launcher=torchrun)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout == want_text + "\n"                                  # printed once, by rank 0


def test_cli_refuses_a_model_that_cannot_split(tiny_ckpt, capsys):
    from dsv4.cli import main

    assert main(["generate", "hi", "--model", str(tiny_ckpt), "--tp", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "cannot run with tensor-parallel size 2" in err and "wo_b" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- the benchmark
def test_full_flash_bench_runs_on_cpu(tmp_path):
    """The 2xH200 script's code path at world size 1 on the tiny config (its TP parts are the model's, tested above;
    the figures come only from GPU runs)."""
    from dsv4.bench.full_flash import main

    res = main(["--config", "tiny", "--layers", "2", "--device", "cpu", "--context", "24", "--prefill", "64",
                "--decode-batches", "1", "--decode-steps", "1", "--check", "--check-layers", "2", "--check-steps", "4",
                "--out", str(tmp_path / "r.json")])
    assert res["tp_check"]["greedy_agreement"] == 1.0 and res["tp_check"]["logits_max_abs_diff_over_std"] == 0.0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert {"gpus", "full_flash_tpot_bs1_ms", "prefill_64_tok_s", "mem_per_gpu_gib", "max_context_tokens"} <= set(saved)


def test_server_answers_with_tp2(tp_ckpt, want_ids_for_server):
    """`dsv4 serve --tp 2`: the ranks start, /health answers, a greedy completion equals the TP=1 engine's, and
    SIGINT stops the server and its follower rank."""
    import httpx
    from serve_helpers import serve_command

    args = ["--model", str(tp_ckpt), "--tp", "2", "--served-model-name", "tiny", "--max-model-len", "256",
            "--num-pages", "4", "--page-size", "128", "--max-num-seqs", "2", "--log-level", "warning"]
    with serve_command(*args, env=dict(os.environ, OMP_NUM_THREADS="1")) as (proc, url):
        body = {"model": "tiny", "prompt": PROMPT_IDS, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        reply = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 5
        assert reply.json()["choices"][0]["text"] == want_ids_for_server
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0


PROMPT_IDS = [5, 17, 300, 42, 7, 99, 128, 3]


@pytest.fixture(scope="module")
def want_ids_for_server(tp_ckpt):
    from dsv4.engine.sampling import SamplingParams
    from dsv4.llm import LLM

    with pytest.warns(UserWarning, match="tokenizer has"):
        llm = LLM(tp_ckpt)
    return llm.generate([PROMPT_IDS], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0].outputs[0].text
