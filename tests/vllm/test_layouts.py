"""emokern.vllm on the Qwen2 and Gemma 3 decoder layouts, with vLLM's compilation on: tiny
randomly initialised checkpoints saved locally (no tokenizer: token-id prompts), a random
bank, steered in vLLM and through Hugging Face with the same mix. Run by ``make test-vllm``;
skipped where vLLM is not installed.
"""

import gc

import pytest
import torch

# A submodule: this tests/vllm directory would pass for the package ``vllm``.
pytest.importorskip("vllm.sampling_params")
import transformers  # noqa: E402
import vllm  # noqa: E402
from helpers import random_bank  # noqa: E402

import emokern  # noqa: E402
import emokern.vllm  # noqa: E402

pytestmark = [pytest.mark.slow]

MAX_TOKENS = 10
# Same tolerance as the default model's test (test_engine.READING_ATOL); the tiny models'
# projections are ~1-10.
READING_ATOL = 1e-3
VOCAB = 512


def _config(kind: str):
    # head_dim 64: vLLM's CPU attention has no kernel for small heads (16)
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    return transformers.Gemma3TextConfig(
        **common, head_dim=64, sliding_window=8, query_pre_attn_scalar=64,
        layer_types=["sliding_attention", "full_attention"] * 2), transformers.Gemma3ForCausalLM


@pytest.fixture(scope="module", params=["qwen2", "gemma3"])
def tiny(request, tmp_path_factory):
    """(name, HF model, model dir, bank path, vLLM engine with the plugin) of one layout."""
    kind = request.param
    config, cls = _config(kind)
    torch.manual_seed(0)
    model = cls(config).float().eval()
    path = tmp_path_factory.mktemp(kind)
    model.save_pretrained(path / "model")
    # vectors ~ the hidden states' scale, so a weight of a few changes the greedy tokens; a
    # default weight of 2, so that the engine's default limit (4 x 2) admits the weights of 8
    bank = random_bank(model, scale=1.0, fingerprint=False, recommended_layers=[1, 2],
                       default_weight=2.0)
    bank.save(path / "bank.safetensors")
    llm = vllm.LLM(model=str(path / "model"), dtype="float32", max_model_len=256,
                   max_num_seqs=16, seed=0, skip_tokenizer_init=True,
                   additional_config={"emokern": {"bank": str(path / "bank.safetensors"),
                                                  "layers": [1, 2]}})
    yield kind, model, bank, llm
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _prompts(n):
    g = torch.Generator().manual_seed(1)
    return [{"prompt_token_ids": torch.randint(3, VOCAB, (12 + 3 * i,), generator=g).tolist()}
            for i in range(n)]


def _run(llm, prompts, mixes):
    params = [vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                  detokenize=False,
                                  extra_args=None if m is None else {"emotion": m})
              for m in mixes]
    outs = llm.generate(prompts, params, use_tqdm=False)
    return outs, [list(o.outputs[0].token_ids) for o in outs]


def test_layout_steers_rows_apart_and_reads_like_hugging_face(tiny):
    kind, model, bank, llm = tiny
    prompts = _prompts(4)
    _, plain = _run(llm, prompts, [None] * 4)
    _, zero = _run(llm, prompts, ["joy=0"] * 4)
    assert zero == plain
    mix = {"joy": 8.0, "fear": -4.0}
    outs, alone = _run(llm, prompts[:1], [mix])
    assert alone[0] != plain[0], f"{kind}: the mix did not change the tokens"
    mixes = [None, {"sadness": 6.0}, mix, {"joy": -8.0}]
    _, batch = _run(llm, [prompts[1], prompts[2], prompts[0], prompts[3]], mixes)
    assert batch[2] == alone[0] and batch[0] == plain[1]
    reading = emokern.vllm.readings(llm, outs)[outs[0].request_id]
    assert reading["count"] == MAX_TOKENS - 1 and reading["layers"] == [1, 2]
    ids = torch.tensor([prompts[0]["prompt_token_ids"]])
    with emokern.steer(model, bank, mix=[mix], layers=[1, 2], positions="all",
                       monitor="generated") as s:
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                            pad_token_id=0)
    assert hf[0, ids.shape[1]:].tolist() == alone[0], f"{kind}: vLLM and HF tokens differ"
    got = torch.tensor(reading["mean"])
    print(f"{kind}: max |vLLM - HF| reading:", (got - s.monitor.mean()[0]).abs().max().item())
    torch.testing.assert_close(got, s.monitor.mean()[0], atol=READING_ATOL, rtol=0)
