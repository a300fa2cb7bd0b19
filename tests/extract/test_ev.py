"""Method EV on tiny random models (Llama and GPT-2 families) with a few queries and tokens:
the vectors are the response-token means the method defines, the metadata is complete, bad
arguments fail before any generation."""

import pytest
import torch

from emokern.bank import EmotionBank
from emokern.data import load_instructions, text_hash
from emokern.extract import (
    center_vectors,
    ev_messages,
    extract_ev,
    generate_responses,
)
from emokern.tokens import chat_prompt_ids

QUERIES = ["How was your weekend?", "Tell me about your morning commute.",
           "What do you think about rainy days?"]


def test_ev_messages_fill_the_phrasing():
    instructions = load_instructions()
    phrasing = instructions["phrasings"]["user_prefix"]
    forms = instructions["emotions"]["fear"]
    msgs = ev_messages("How was your day?", phrasing, forms)
    assert msgs == [{"role": "user",
                     "content": "Answer the following question with fear. How was your day?"}]
    neutral = ev_messages("How was your day?", phrasing)
    assert "fear" not in neutral[-1]["content"] and "How was your day?" in neutral[-1]["content"]


def test_ev_messages_with_a_system_prompt():
    phrasing = {"system": "You feel {noun}.", "user": "{query}",
                "neutral_system": "", "neutral_user": "{query}"}
    msgs = ev_messages("Hi?", phrasing, {"noun": "joy", "adjective": "joyful"})
    assert msgs == [{"role": "system", "content": "You feel joy."},
                    {"role": "user", "content": "Hi?"}]
    assert ev_messages("Hi?", phrasing) == [{"role": "user", "content": "Hi?"}]


def test_ev_vectors_average_response_tokens_only(small_llama):
    """Recompute Method EV by hand: per-sequence unpadded forwards, response tokens only."""
    model, tokenizer = small_llama
    emotions = ["joy", "fear"]
    bank = extract_ev(model, tokenizer, emotions=emotions, queries=QUERIES, center=False,
                      max_new_tokens=5, batch_size=4, do_sample=True, seed=3, progress=False)
    instructions = load_instructions()
    phrasing = instructions["phrasings"][instructions["default"]]
    conditions = ["neutral", *emotions]
    prompts = [chat_prompt_ids(tokenizer, ev_messages(
        q, phrasing, None if c == "neutral" else instructions["emotions"][c]))
        for c in conditions for q in QUERIES]
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens=5, batch_size=4,
                                   do_sample=True, seed=3, progress=False)
    per_condition = []
    for c in range(len(conditions)):
        states = []
        for j in range(len(QUERIES)):
            p, r = prompts[c * len(QUERIES) + j], responses[c * len(QUERIES) + j]
            if not r:
                continue
            with torch.no_grad():
                out = model(input_ids=torch.tensor([p + r]), output_hidden_states=True)
            states.append(torch.stack([out.hidden_states[layer + 1][0, len(p):]
                                       for layer in (0, 1)], dim=0))  # [2, |r|, D]
        per_condition.append(torch.cat(states, dim=1).mean(dim=1))  # [2, D]
    expected = torch.stack([per_condition[1] - per_condition[0],
                            per_condition[2] - per_condition[0]], dim=1)
    torch.testing.assert_close(bank.vectors[:2], expected, atol=1e-5, rtol=1e-4)
    total = sum(len(r) for r in responses)
    assert sum(bank.metadata["response_tokens"].values()) == total


def test_ev_shapes_metadata_and_centering(small_llama):
    model, tokenizer = small_llama
    kwargs = dict(emotions=["joy", "sadness", "anger"], queries=QUERIES[:2], max_new_tokens=4,
                  progress=False, do_sample=True)
    raw = extract_ev(model, tokenizer, center=False, **kwargs)
    centred = extract_ev(model, tokenizer, center=True, layers=[0, 2], **kwargs)
    assert raw.vectors.shape == (3, 3, 32) and raw.names == ["joy", "sadness", "anger"]
    assert centred.layers == [0, 2] and centred.vectors.shape == (2, 3, 32)
    torch.testing.assert_close(centred.vectors, center_vectors(raw.vectors)[[0, 2]])
    torch.testing.assert_close(centred.vectors.sum(dim=1), torch.zeros(2, 32), atol=1e-5,
                               rtol=0)
    assert raw.hidden_norm.shape == (3,) and bool((raw.hidden_norm > 0).all())
    meta = centred.metadata
    for key in ("method", "source_hash", "instruction", "centered", "fingerprint",
                "emokern_version", "default_weight", "recommended_layers"):
        assert key in meta, key
    assert meta["method"] == "ev" and meta["centered"] is True and raw.metadata["centered"] is False
    assert meta["fingerprint"]["num_layers"] == 3
    assert set(meta["recommended_layers"]) <= {0, 2}
    assert meta["source_hash"] == text_hash(QUERIES[:2])
    centred.check_compatible(model)


def test_ev_is_deterministic_with_a_seed(small_gpt2):
    model, tokenizer = small_gpt2
    kwargs = dict(emotions=["joy", "fear"], queries=QUERIES[:2], max_new_tokens=4,
                  do_sample=True, progress=False)
    a = extract_ev(model, tokenizer, seed=5, **kwargs)
    b = extract_ev(model, tokenizer, seed=5, **kwargs)
    c = extract_ev(model, tokenizer, seed=6, **kwargs)
    assert torch.equal(a.vectors, b.vectors)
    assert not torch.equal(a.vectors, c.vectors)


def test_ev_returns_responses_and_round_trips(small_llama, tmp_path):
    model, tokenizer = small_llama
    bank, responses = extract_ev(model, tokenizer, emotions=["joy", "fear"],
                                 queries=QUERIES[:2], max_new_tokens=3, progress=False,
                                 return_responses=True)
    assert set(responses) == {"neutral", "joy", "fear"}
    assert all(len(v) == 2 and all(isinstance(t, str) for t in v) for v in responses.values())
    path = bank.save(tmp_path / "b.safetensors", dtype=torch.float16)
    loaded = EmotionBank.load(path)
    assert loaded.metadata["instruction"] == bank.metadata["instruction"]
    torch.testing.assert_close(loaded.vectors, bank.vectors, atol=2e-3, rtol=2e-3)


def test_ev_bad_input_fails_before_generation(small_llama, tmp_path):
    model, tokenizer = small_llama
    calls = []
    original = model.generate
    model.generate = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with pytest.raises(ValueError, match=r"emotions has unknown emotion \['joyy'\]"):
            extract_ev(model, tokenizer, emotions=["joyy"], queries=QUERIES)
        with pytest.raises(TypeError, match="not a single str"):
            extract_ev(model, tokenizer, emotions="joy", queries=QUERIES)
        with pytest.raises(ValueError, match="emotions repeats"):
            extract_ev(model, tokenizer, emotions=["joy", "joy"], queries=QUERIES)
        with pytest.raises(ValueError, match="queries must not be empty"):
            extract_ev(model, tokenizer, queries=[])
        with pytest.raises(ValueError, match=r"queries\[1\]"):
            extract_ev(model, tokenizer, queries=["ok?", "  "])
        with pytest.raises(ValueError, match="at least 2 emotions"):
            extract_ev(model, tokenizer, emotions=["joy"], queries=QUERIES, center=True)
        with pytest.raises(ValueError, match=r"layers must be in \[0, 3\)"):
            extract_ev(model, tokenizer, queries=QUERIES, layers=[3])
        with pytest.raises(ValueError, match="instruction must be one of"):
            extract_ev(model, tokenizer, queries=QUERIES, instruction="shout")
        with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
            extract_ev(model, tokenizer, queries=QUERIES, max_new_tokens=0)
        with pytest.raises(TypeError, match="to read a file use load_queries"):
            extract_ev(model, tokenizer, queries=tmp_path / "q.txt")
        with pytest.raises(TypeError, match="center must be a bool"):
            extract_ev(model, tokenizer, queries=QUERIES, center=1)
        with pytest.raises(ValueError, match=r"'user' must be a str containing '\{query\}'"):
            extract_ev(model, tokenizer, queries=QUERIES,
                       instruction={"user": "no slot", "neutral_user": "{query}"})
        with pytest.raises(TypeError, match="instruction must be a phrasing id or a dict"):
            extract_ev(model, tokenizer, queries=QUERIES, instruction=3)
    finally:
        model.generate = original
    assert calls == []
