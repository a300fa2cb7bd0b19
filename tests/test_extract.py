"""Emotion-vector extraction: Method EV and Method concept, data sets, errors, shipped banks.

Fast tests run on tiny random models (Llama and GPT-2 families) with a few queries and tokens;
tests marked ``slow`` use the real default model and the shipped banks.
"""

import json

import pytest
import torch

from emokern import extract as ex
from emokern.bank import EmotionBank
from emokern.extract import (
    BASIC_EMOTIONS,
    center_vectors,
    chat_prompt_ids,
    concept_token_span,
    ev_messages,
    extract_concept,
    extract_ev,
    extract_main,
    generate_responses,
    load_concepts,
    load_heldout,
    load_instructions,
    load_queries,
    span_hidden_states,
)

QUERIES = ["How was your weekend?", "Tell me about your morning commute.",
           "What do you think about rainy days?"]


@pytest.fixture(scope="module")
def tiny_llama():
    from emokern.models import tiny_model

    return tiny_model("llama", num_layers=3, hidden_size=32)


@pytest.fixture(scope="module")
def tiny_gpt2():
    from emokern.models import tiny_model

    return tiny_model("gpt2", num_layers=3, hidden_size=32)


# ---------------------------------------------------------------------------- data sets


def test_project_data_sets_are_complete():
    queries = load_queries()
    assert len(queries) >= 100 and len(set(queries)) == len(queries)
    instructions = load_instructions()
    assert len(instructions["phrasings"]) >= 4
    assert instructions["default"] in instructions["phrasings"]
    for phrasing in instructions["phrasings"].values():
        assert "{query}" in phrasing["user"] and "{query}" in phrasing["neutral_user"]
    concepts = load_concepts()
    cats = concepts["categories"]
    assert len(cats) >= 24 and set(BASIC_EMOTIONS) <= set(cats)
    assert all(len(words) >= 10 for words in cats.values())
    assert set(cats) <= set(instructions["emotions"])
    assert all(c.count("{concept}") == 1 for c in concepts["carriers"])
    heldout = load_heldout()
    for e in BASIC_EMOTIONS:
        assert sum(1 for label, _ in heldout if label == e) >= 20
    # Held-out sentences are not extraction data.
    assert not {t for _, t in heldout} & set(queries)


def test_ev_messages_fill_the_phrasing():
    instructions = load_instructions()
    phrasing = instructions["phrasings"]["user_prefix"]
    forms = instructions["emotions"]["fear"]
    msgs = ev_messages("How was your day?", phrasing, forms)
    assert msgs == [{"role": "user",
                     "content": "Answer the following question with fear. How was your day?"}]
    neutral = ev_messages("How was your day?", phrasing)
    assert "fear" not in neutral[-1]["content"] and "How was your day?" in neutral[-1]["content"]


# ---------------------------------------------------------------------------- masking


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_span_states_equal_unpadded_per_sequence_forward(family, request):
    model, tokenizer = request.getfixturevalue(family)
    texts = ["Hello there, how are you doing today my friend?", "Hi", "The quick brown fox"]
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    spans = [(3, len(seqs[0])), (0, 1), (1, 3)]
    layers = [0, 2]
    sums, counts, norm_sums = span_hidden_states(model, seqs, spans, layers=layers,
                                                 pad_token_id=tokenizer.pad_token_id,
                                                 batch_size=3)
    assert sums.shape == (3, 2, 32) and counts.tolist() == [b - a for a, b in spans]
    for i, (seq, (a, b)) in enumerate(zip(seqs, spans, strict=True)):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([seq]), output_hidden_states=True)
        # Layer 2 is the last layer: transformers reports hidden_states[3] after the final
        # norm, so read the decoder layer's own output there.
        ref = []
        for layer in layers:
            h = out.hidden_states[layer + 1][0] if layer < 2 else _layer_output(model, seq, 2)
            ref.append(h[a:b])
        torch.testing.assert_close(sums[i], torch.stack([r.sum(0) for r in ref]),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(norm_sums[i], torch.stack([r.norm(dim=-1).sum() for r in ref]),
                                   atol=1e-5, rtol=1e-5)


def _layer_output(model, seq, layer):
    from emokern.models import decoder_layers

    seen = {}
    handle = decoder_layers(model)[layer].register_forward_hook(
        lambda mod, args, out: seen.__setitem__("h", out if torch.is_tensor(out) else out[0]))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([seq]))
    finally:
        handle.remove()
    return seen["h"][0]


def test_span_states_reject_bad_spans(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="one .start, stop. per sequence"):
        span_hidden_states(model, [[1, 2]], [], layers=[0])
    with pytest.raises(ValueError, match=r"spans\[0\]"):
        span_hidden_states(model, [[1, 2]], [(0, 3)], layers=[0])


def test_ev_vectors_average_response_tokens_only(tiny_llama):
    """Recompute Method EV by hand: per-sequence unpadded forwards, response tokens only."""
    model, tokenizer = tiny_llama
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


# ---------------------------------------------------------------------------- Method EV


def test_ev_shapes_metadata_and_centering(tiny_llama):
    model, tokenizer = tiny_llama
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
                "emokern_version", "recommended_alpha", "recommended_layers"):
        assert key in meta, key
    assert meta["method"] == "ev" and meta["centered"] is True and raw.metadata["centered"] is False
    assert meta["fingerprint"]["num_layers"] == 3
    assert set(meta["recommended_layers"]) <= {0, 2}
    assert meta["source_hash"] == ex.text_hash(QUERIES[:2])
    centred.check_compatible(model)


def test_ev_is_deterministic_with_a_seed(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    kwargs = dict(emotions=["joy", "fear"], queries=QUERIES[:2], max_new_tokens=4,
                  do_sample=True, progress=False)
    a = extract_ev(model, tokenizer, seed=5, **kwargs)
    b = extract_ev(model, tokenizer, seed=5, **kwargs)
    c = extract_ev(model, tokenizer, seed=6, **kwargs)
    assert torch.equal(a.vectors, b.vectors)
    assert not torch.equal(a.vectors, c.vectors)


def test_ev_returns_responses_and_round_trips(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    bank, responses = extract_ev(model, tokenizer, emotions=["joy", "fear"],
                                 queries=QUERIES[:2], max_new_tokens=3, progress=False,
                                 return_responses=True)
    assert set(responses) == {"neutral", "joy", "fear"}
    assert all(len(v) == 2 and all(isinstance(t, str) for t in v) for v in responses.values())
    path = bank.save(tmp_path / "b.safetensors", dtype=torch.float16)
    loaded = EmotionBank.load(path)
    assert loaded.metadata["instruction"] == bank.metadata["instruction"]
    torch.testing.assert_close(loaded.vectors, bank.vectors, atol=2e-3, rtol=2e-3)


def test_ev_bad_input_fails_before_generation(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
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
    finally:
        model.generate = original
    assert calls == []


def test_query_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n# only a comment\n")
    with pytest.raises(ValueError, match="holds no query"):
        load_queries(empty)
    with pytest.raises(ValueError, match="does not exist"):
        load_queries(tmp_path / "missing.txt")
    good = tmp_path / "q.txt"
    good.write_text("First query?\n\n# comment\n  Second query?  \n")
    assert load_queries(good) == ["First query?", "Second query?"]


def test_extract_main_checks_everything_before_loading_the_model(tmp_path):
    out = tmp_path / "bank.safetensors"
    missing_model = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match="unknown emotion"):
        extract_main(missing_model, "ev", ["joy", "happyness"], None, out)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="holds no query"):
        extract_main(missing_model, "ev", None, empty, out)
    with pytest.raises(ValueError, match="does not exist"):
        extract_main(missing_model, "ev", None, tmp_path / "nope.txt", out)
    with pytest.raises(ValueError, match="method must be one of"):
        extract_main(missing_model, "pca", None, None, out)
    with pytest.raises(ValueError, match="unknown category"):
        extract_main(missing_model, "concept", ["joy", "glee"], None, out)
    with pytest.raises(ValueError, match="out_path's directory"):
        extract_main(missing_model, "ev", None, None, tmp_path / "no" / "b.safetensors")
    # Only once every argument is fine does the (missing) model fail to load.
    with pytest.raises(FileNotFoundError, match="neither 'default' nor an existing path"):
        extract_main(missing_model, "ev", None, None, out)
    assert list(tmp_path.iterdir()) == [empty]


# ---------------------------------------------------------------------------- Method concept


def test_concept_token_span_covers_the_concept(tiny_llama):
    _, tokenizer = tiny_llama
    for carrier in load_concepts()["carriers"]:
        for word in ("joy", "a scream in the dark", "self-respect", "a neighbour's new car"):
            ids, a, b = concept_token_span(tokenizer, carrier, word)
            assert tokenizer.decode(ids[a:b]).strip() == word
    with pytest.raises(ValueError, match="exactly one"):
        concept_token_span(tokenizer, "no slot here", "joy")


def test_concept_shapes_centering_and_pooling(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    cats = ["joy", "fear", "anger"]
    last = extract_concept(model, tokenizer, categories=cats, progress=False)
    mean = extract_concept(model, tokenizer, categories=cats, pooling="mean", layers=[1],
                           progress=False)
    assert last.vectors.shape == (3, 3, 32) and last.names == cats
    torch.testing.assert_close(last.vectors.sum(dim=1), torch.zeros(3, 32), atol=1e-5, rtol=0)
    assert mean.layers == [1] and not torch.allclose(mean.vectors[0], last.vectors[1])
    assert last.metadata["method"] == "concept" and last.metadata["pooling"] == "last"
    custom = extract_concept(model, tokenizer, categories={"a": ["sun", "smile"],
                                                           "b": ["rain", "storm"]},
                             carriers=["It was {concept}."], progress=False)
    torch.testing.assert_close(custom.vectors[:, 0], -custom.vectors[:, 1])
    assert custom.metadata["source"] == "custom"


def test_concept_vector_is_category_mean_minus_mean_of_categories(tiny_llama):
    model, tokenizer = tiny_llama
    cats = {"a": ["sun"], "b": ["rain"], "c": ["a storm"]}
    carrier = "It was {concept} again."
    bank = extract_concept(model, tokenizer, categories=cats, carriers=[carrier], layers=[1],
                           progress=False)
    states = []
    for words in cats.values():
        ids, _, b = concept_token_span(tokenizer, carrier, words[0])
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        states.append(out.hidden_states[2][0, b - 1])
    states = torch.stack(states)
    torch.testing.assert_close(bank.vectors[0], states - states.mean(dim=0), atol=1e-5,
                               rtol=1e-4)


def test_concept_bad_input(tiny_llama):
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError, match="unknown category"):
        extract_concept(model, tokenizer, categories=["joy", "glee"])
    with pytest.raises(ValueError, match="at least 2 categories"):
        extract_concept(model, tokenizer, categories=["joy"])
    with pytest.raises(ValueError, match="exactly one"):
        extract_concept(model, tokenizer, categories=["joy", "fear"], carriers=["no slot"])
    with pytest.raises(ValueError, match="pooling must be"):
        extract_concept(model, tokenizer, categories=["joy", "fear"], pooling="max")
    with pytest.raises(ValueError, match="non-empty list"):
        extract_concept(model, tokenizer, categories={"a": [], "b": ["x"]})


# ---------------------------------------------------------------------------- default model


@pytest.fixture(scope="module")
def default_model():
    from emokern.models import load_model

    # CI machines are shared: one thread is several times faster when the CPUs are busy.
    threads = torch.get_num_threads()
    ex.auto_threads()
    yield load_model("default")
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.model
def test_shipped_banks_are_small_float16_and_belong_to_the_default_model(default_model):
    model, _ = default_model
    total = 0
    for method in ("ev", "concept"):
        path = EmotionBank.default_path(method)
        total += path.stat().st_size
        bank = EmotionBank.load_default(method)
        bank.check_compatible(model)
        assert bank.metadata["method"] == method
        assert bank.metadata.get("recommendation") == "calibrated"
        assert bank.recommended_alpha > 0 and bank.recommended_layers
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            assert fh.get_tensor("vectors").dtype == torch.float16
    assert total < 5 * 2**20
    ev = EmotionBank.load_default("ev")
    assert ev.names == list(BASIC_EMOTIONS) and ev.layers == list(range(30))
    concept = EmotionBank.load_default("concept")
    assert len(concept.names) >= 24 and set(BASIC_EMOTIONS) <= set(concept.names)


def _middle_cosines(a, b, layers):
    out = []
    for layer in layers:
        x, y = a.layer_vectors(layer), b.layer_vectors(layer)
        out.append(torch.nn.functional.cosine_similarity(x, y, dim=-1))
    return torch.stack(out)  # [layers, K]


@pytest.mark.slow
@pytest.mark.model
def test_reextracting_ev_on_a_subset_reproduces_the_shipped_vectors(default_model):
    model, tokenizer = default_model
    shipped = EmotionBank.load_default("ev")
    layers = [10, 14, 18]
    # Measured on the default model (docs/emotions.md): the centred vectors of a subset of n
    # of the 118 queries reach cosine >= 0.9 with the full set's from n ~ 50 (20 queries give
    # ~0.7), so the test uses the first 60.
    queries = load_queries()[:60]
    bank = extract_ev(model, tokenizer, queries=queries, layers=layers, progress=False)
    cos = _middle_cosines(bank, shipped, layers)
    assert float(cos.min()) >= 0.9, cos


@pytest.mark.slow
@pytest.mark.model
def test_reextracting_concepts_reproduces_the_shipped_vectors(default_model):
    model, tokenizer = default_model
    shipped = EmotionBank.load_default("concept")
    layers = [10, 14]
    bank = extract_concept(model, tokenizer, layers=layers, progress=False)
    cos = _middle_cosines(bank, shipped, layers)
    assert float(cos.min()) >= 0.99, cos


@pytest.mark.slow
@pytest.mark.model
def test_heldout_sentences_are_classified_by_the_ev_directions(default_model):
    from emokern.eval.calibrate import heldout_report

    model, tokenizer = default_model
    bank = EmotionBank.load_default("ev")
    layers = list(range(4, 28, 2))  # a dozen layers keeps it quick
    report = heldout_report(model, tokenizer, bank.select(layers=layers))
    assert report["best_bank"] >= 0.5, report
    assert report["best_random"] < report["best_bank"]
    assert report["best_nearest_mean"] >= report["best_bank"] - 0.05
    print(json.dumps({k: report[k] for k in ("best_layer", "best_bank", "best_random",
                                             "best_nearest_mean")}))


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.parametrize("method", ["ev", "concept"])
def test_recommended_setting_steers_sadness_fluently(default_model, method):
    """At the shipped recommendation the classifier sees sadness and the text does not loop
    (docs/emotions.md: sadness gain +0.30 / +0.33, hit rate 0.88 with both banks)."""
    from emokern.eval.calibrate import calibrate

    model, tokenizer = default_model
    bank = EmotionBank.load_default(method)
    rows = calibrate(model, tokenizer, bank, layers=bank.recommended_layers,
                     alphas=[bank.recommended_alpha], emotions=["sadness"], fluency=False,
                     progress=False)
    steered = rows[1]
    assert steered["gain"] >= 0.15 and steered["hit_rate"] >= 0.5, steered
    assert steered["repetition"] <= 0.2, steered
