"""emokern.vllm without vLLM: slot bookkeeping, token -> slot index, mixes (the grammar at the
front door, levels opt-in, slots' raw bounds), cache salts, settings (the engine tests are in
test_engine.py and need vLLM)."""

import math

import numpy as np
import pytest
import torch

from emokern.steering.config import SteeringConfig
from emokern.vllm import EmokernConfig, SlotTable, cache_salt, request_mix
from emokern.vllm.config import check_mix, mix_edits, normal_mix, with_mix

INF = math.inf

NAMES = ("joy", "sadness", "fear")


def _table(**kw):
    return SlotTable(n_layers=2, n_emotions=3, max_requests=4, max_tokens=16, **kw)


def test_fill_packs_prompt_and_generated_slots():
    t = _table(scale=0.5)
    t.add("a", torch.tensor([2.0, 0.0, 0.0]))
    t.add("b", None)
    t.add("c", torch.tensor([0.0, 1.0, -1.0]))
    # a: prefill of 3 prompt tokens; b: 2 tokens; c: prompt of 4 with 3 computed, 1 prompt + 1
    # generated token scheduled (a chunked prefill ending and its first decode).
    t.fill(["a", "b", "c"], np.array([3, 2, 2]), np.array([0, 5, 3]), np.array([3, 9, 4]))
    a, c = 0, 1  # pairs handed out in order
    assert t.token_slot[:7].tolist() == [4 * a] * 3 + [-1, -1] + [4 * c, 4 * c + 1]
    assert t.token_slot[7:].eq(-1).all()
    assert t.slot_weights[0][4 * a].tolist() == [1.0, 0.0, 0.0]
    assert t.slot_weights[0][4 * a + 1].tolist() == [1.0, 0.0, 0.0]
    assert t.slot_weights[0][4 * c].tolist() == [0.0, 0.5, -0.5]
    # a smaller next step clears the tail it no longer uses
    t.fill(["a"], np.array([1]), np.array([3]), np.array([3]))
    assert t.token_slot.tolist() == [4 * a + 1] + [-1] * 15


def test_release_keeps_readings_and_reuses_slots():
    t = _table()
    t.add("7-0a1b2c3d", torch.tensor([1.0, 0.0, 0.0]))
    gen = 1
    for layer in range(2):
        t.run_sum[layer][gen] = torch.tensor([2.0, 4.0, 6.0]) * (layer + 1)
        t.run_count[layer][gen] = 2
    live = t.readings(["7"])["7"]
    assert live["count"] == 2 and live["mean"].tolist() == [[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]]
    t.release("7-0a1b2c3d")  # finished (the plugin's on_update)
    assert not t.known("7-0a1b2c3d")
    assert t.readings(["7"])["7"]["mean"].tolist() == live["mean"].tolist()
    t.add("8", torch.tensor([0.0, 1.0, 0.0]))  # the freed pair again, statistics zeroed
    assert t.run_count[0][gen] == 0 and t.slot_weights[0][gen].tolist() == [0.0, 1.0, 0.0]
    assert torch.isnan(t.readings(["8"])["8"]["mean"]).all()


def test_prompt_and_generated_readings_and_unsteered_reads():
    t = _table()
    t.add("a", None, read=True)  # unsteered but read: a pair of zero-weight slots
    t.add("b", None)  # unsteered, not read: no slot
    assert t.slot_weights[0][:4].eq(0).all() and t.known("b")
    t.fill(["a", "b"], np.array([3, 1]), np.array([0, 0]), np.array([3, 1]))
    assert t.token_slot[:4].tolist() == [0, 0, 0, -1]
    for layer in range(2):
        t.run_sum[layer][0] = torch.tensor([3.0, 0.0, 3.0])
        t.run_count[layer][0] = 3
    r = t.readings(["a", "b"])
    assert set(r) == {"a"}
    assert r["a"]["prompt_count"] == 3 and r["a"]["prompt_mean"][0].tolist() == [1.0, 0.0, 1.0]
    assert r["a"]["count"] == 0


def test_readings_of_one_http_request_by_family():
    """The ids vLLM's OpenAI server derives from one HTTP request id: prompts as -i (or _i),
    samples as j_ prefixes, each with vLLM's random suffix."""
    t = _table()
    ids = ["cmpl-x-0-0123abcd", "1_cmpl-x-1-89abcdef", "chat-y-00ff00ff", "cmpl-xy-0-0a0a0a0a"]
    for rid in ids:
        t.add(rid, torch.ones(3))
    assert set(t.readings(["cmpl-x"], family=True)) == {"cmpl-x-0", "1_cmpl-x-1"}
    assert set(t.readings(["chat-y"], family=True)) == {"chat-y"}
    assert set(t.readings(["cmpl-x"])) == set()  # exact ids only without family


def test_slots_run_out_with_a_clear_error():
    t = SlotTable(1, 3, max_requests=1, max_tokens=4)
    t.add("a", torch.ones(3))
    with pytest.raises(RuntimeError, match="steering slots are in use"):
        t.add("b", torch.ones(3), running=["a", "b"])
    t.add("b", torch.ones(3), running=["b"])  # "a" is preempted: it gives its slots up
    assert not t.known("a") and t.known("b")


def test_tokens_recomputed_after_a_preemption_are_steered_but_not_read_again():
    t = _table()
    t.add("a", torch.tensor([1.0, 0.0, 0.0]))
    t.fill(["a"], np.array([3]), np.array([0]), np.array([3]))  # prefill
    t.fill(["a"], np.array([1]), np.array([3]), np.array([3]))  # decode: positions 0-3 read
    t.fill(["a"], np.array([1]), np.array([4]), np.array([3]))  # decode: position 4
    # preempted, resumed with 2 tokens from the prefix cache: positions 2-4 recomputed, then
    # position 5 is new
    t.fill(["a"], np.array([4]), np.array([2]), np.array([3]))
    assert t.token_slot[:4].tolist() == [2, 3, 3, 1]  # replayed prompt, replayed generated
    assert t.slot_weights[0][2].tolist() == t.slot_weights[0][1].tolist() == [1.0, 0.0, 0.0]


def test_request_mix_forms():
    assert request_mix(None, NAMES) is None
    assert request_mix({"emotion": "joy=0"}, NAMES) is None  # all zero = unsteered
    assert request_mix({"emotion": ""}, NAMES) is None
    assert request_mix({"emotion": "joy=2,fear=0.5"}, NAMES).tolist() == [2.0, 0.0, 0.5]
    assert request_mix({"emotion": {"sadness": -1}}, NAMES).tolist() == [0.0, -1.0, 0.0]
    with pytest.raises(ValueError, match="unknown emotion 'anger'"):
        request_mix({"emotion": "anger=1"}, NAMES)
    with pytest.raises(ValueError, match="finite"):
        request_mix({"emotion": {"joy": float("nan")}}, NAMES)


def test_normal_form_is_parsed_once_and_read_downstream():
    rec = {"joy": 1.5, "sadness": 2.0, "fear": 3.0}.__getitem__
    mix = normal_mix({"emotion": "fear=0.5,joy=rec,sadness=0"}, NAMES, recommended=rec)
    assert mix == {"joy": 1.5, "fear": 0.5} and list(mix) == ["joy", "fear"]  # bank order
    assert normal_mix({"emotion": "joy=0"}, NAMES) is None
    assert normal_mix(dict(emotion=mix), NAMES) == mix  # idempotent
    extra = {"emotion": "joy=rec", "other": 1}
    assert with_mix(extra, {"joy": 1.5}) == {"emotion": {"joy": 1.5}, "other": 1}
    assert with_mix(extra, None) == {"other": 1} and extra["emotion"] == "joy=rec"
    weights, bounds, _ = mix_edits({"emotion": mix}, NAMES)
    assert weights.tolist() == [1.5, 0.0, 0.5] and bounds is None
    assert mix_edits({"emotion": {}}, NAMES) is None and mix_edits(None, NAMES) is None
    with pytest.raises(ValueError, match="not an emotion of this engine's bank"):
        mix_edits({"emotion": {"anger": 1.0}}, NAMES)
    with pytest.raises(TypeError, match="unchecked"):
        mix_edits({"emotion": "joy=2"}, NAMES)  # a text mix never reaches a worker


def test_cache_salt_is_per_mix():
    assert cache_salt(None) is None and cache_salt({"emotion": {"joy": 0.0}}) is None
    assert cache_salt({"emotion": {"joy": 2.0, "fear": 0.5}}) == cache_salt(
        {"emotion": {"fear": 0.5, "joy": 2}})
    assert cache_salt({"emotion": {"joy": 2.0}}) != cache_salt({"emotion": {"joy": 2.5}})
    # Levels and bounds are part of the mix: each its own salt, none equal to a push's.
    salts = {cache_salt({"emotion": mix}) for mix in (
        {"joy": 2.0}, {"joy": {"level": 2.0}}, {"joy": {"max": 2.0}}, {"joy": {"min": 2.0}},
        {"joy": {"weight": 2.0, "max": 2.0}}, {"joy": {"weight": 2.0, "max": 2.5}})}
    assert len(salts) == 6
    assert cache_salt({"emotion": {"joy": {"weight": 0.0, "max": 1}}}) == cache_salt(
        {"emotion": {"joy": {"max": 1.0}}})


# ------------------------------------------------------------------- levels and bounds


def test_the_grammar_at_the_front_door_and_its_normal_form():
    """Every term in text, object or JSON form becomes one normal form (bank order, rec
    resolved to the recipe, zero pushes dropped), which the workers read as weights and
    z bounds."""
    recipes = {"joy": 1.5, "sadness": {"level": 3.0}, "fear": 0.5}.__getitem__
    mix = normal_mix({"emotion": "fear<=1,joy=rec,sadness=rec,joy>=-2"}, NAMES,
                     recommended=recipes)
    assert mix == {"joy": {"weight": 1.5, "min": -2.0}, "sadness": {"level": 3.0},
                   "fear": {"max": 1.0}}
    assert list(mix) == list(NAMES)
    assert normal_mix({"emotion": mix}, NAMES) == mix  # idempotent
    assert normal_mix({"emotion": '{"fear": "erase", "joy": {"weight": 0}}'}, NAMES) == {
        "fear": {"level": 0.0}}
    assert normal_mix({"emotion": {"joy": {"weight": 0.0}}}, NAMES) is None
    weights, bounds, _ = mix_edits({"emotion": mix}, NAMES)
    assert weights.tolist() == [1.5, 0.0, 0.0]
    assert bounds.tolist() == [[-2.0, 3.0, -INF], [INF, 3.0, 1.0]]
    with pytest.raises(ValueError, match=r"\[.joy.\] is .joy@1., a level or bound: request_mix"):
        request_mix({"emotion": "joy@1"}, NAMES)
    for bad, message in (("joy@1,joy=2", "has a level and a push"),
                         ({"joy": {"max": 1, "min": 2}}, r"\['joy'\] has a floor above its cap"),
                         ({"joy": {"level": "x"}}, r"\['joy'\]\['level'\] must be a number"),
                         ("sadness=rec", "no bank gives recommended weights")):
        with pytest.raises((TypeError, ValueError), match=message):
            normal_mix({"emotion": bad}, NAMES)


def test_levels_are_opt_in_per_engine():
    """Without "levels": true a level, bound or level recipe is refused at the door, naming
    the field and how to turn them on; with it they pass in normal form (the shipped bank is
    calibrated)."""
    off = EmokernConfig.from_additional_config({"emokern": {}})
    on = EmokernConfig.from_additional_config({"emokern": {"levels": True}})
    assert off.levels is False and on.levels is True
    assert check_mix({"emotion": "joy=2"}, off) == {"joy": 2.0}
    for mix in ("sadness@1.5", "anger<=0.5", "joy>=1", "fear=erase", {"joy": {"level": 1}}):
        with pytest.raises(ValueError, match=r"extra_args\['emotion'\]\[.*\] is .*, a level or "
                                             r"bound, but this engine was started without "
                                             r"levels; enable them with additional_config="):
            check_mix({"emotion": mix}, off)
    assert check_mix({"emotion": "sadness@1.5,joy=2,joy<=3"}, on) == {
        "joy": {"weight": 2.0, "max": 3.0}, "sadness": {"level": 1.5}}
    with pytest.raises(ValueError, match=r"\['sadness'\]: level z = 1e\+38 is beyond this "
                                         r"server's limit max_level = 27.552"):
        check_mix({"emotion": "sadness@1e38"}, on)  # the default limit comes first
    unlimited = EmokernConfig.from_additional_config({"emokern": {"levels": True,
                                                                  "max_level": 3e38}})
    with pytest.raises(ValueError, match=r"\['sadness'\]: z = 1e\+38 is .* outside float32"):
        check_mix({"emotion": "sadness@1e38"}, unlimited)  # raw bounds stay finite everywhere
    with pytest.raises(TypeError, match="levels'] must be true or false"):
        EmokernConfig.from_additional_config({"emokern": {"levels": "yes"}})


def test_slots_hold_raw_bounds_per_layer_with_levels_on():
    mean = torch.tensor([[0.0, 1.0, 2.0], [10.0, 20.0, 30.0]])
    std = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    t = _table(scale=0.5, neutral=(mean, std))
    assert t.levels and len(t.bounds) == 2 and t.bounds[0].shape == (16, 2, 3)
    assert t.bounds[0].isinf().all() and t.bounds[0].is_contiguous()
    z = torch.tensor([[1.5, -INF, -INF], [1.5, INF, -1.0]])  # joy level 1.5, fear cap -1
    t.add("a", None, z_bounds=z)  # a level alone: zero weights, bounds set
    t.add("b", torch.tensor([1.0, 0.0, 0.0]))  # a push: open bounds
    a, b = 0, 1
    for slot in range(4 * a, 4 * a + 4):
        assert t.slot_weights[0][slot].eq(0).all()
        assert t.bounds[0][slot].tolist() == [[1.5, -INF, -INF], [1.5, INF, 1.0]]
        assert t.bounds[1][slot].tolist() == [[13.0, -INF, -INF], [13.0, INF, 28.0]]
    assert t.bounds[1][4 * b:4 * b + 4].isinf().all()
    t.release("a")
    t.add("c", torch.ones(3))  # the freed pair again: its bounds open
    assert t.bounds[0][4 * a:4 * a + 4].isinf().all()
    t.fill(["c", "b"], np.array([2, 1]), np.array([0, 0]), np.array([2, 1]))
    assert t.token_slot[:3].tolist() == [0, 0, 4]
    plain = _table()
    assert not plain.levels and plain.bounds is None
    with pytest.raises(ValueError, match="engine without levels"):
        plain.add("a", None, z_bounds=z)
    assert not plain.known("a")


def test_settings():
    assert EmokernConfig.from_additional_config({}) is None
    cfg = EmokernConfig.from_additional_config({"emokern": {"layers": [3, 4], "monitor": False}})
    assert cfg.layers == (3, 4) and cfg.monitor is False and cfg.bank == "default"
    assert cfg.levels is False
    with pytest.raises(ValueError, match="unknown setting"):
        EmokernConfig.from_additional_config({"emokern": {"layer": 3}})
    with pytest.raises(ValueError, match="spread"):
        EmokernConfig.from_additional_config({"emokern": {"spread": "all"}})
    with pytest.raises(ValueError, match="unknown setting"):  # the hook is the benchmark's
        EmokernConfig.from_additional_config({"emokern": {"impl": "hook"}})


def test_a_scope_sets_weights_and_bounds_per_position_kind_and_layer():
    """A request whose mix is scoped (edit_scope's factor [2, L, K]) gets, in each of its four
    slots, the weights of the slot's position kind at each layer, and its bounds only where
    the factor is positive; a mix without scope gets the plain scale at the band's layers."""
    mean, std = torch.zeros(2, 3), torch.ones(2, 3)
    t = _table(scale=0.5, band=[True, False], neutral=(mean, std))
    steering = SteeringConfig(names=NAMES, layers=(1, 2), band=(1,), monitor_layers=(1, 2))
    mix = {"joy": {"weight": 2.0, "layers": [2], "positions": "generated"},
           "fear": {"max": 1.0, "layers": [1, 2], "positions": "prompt"}, "sadness": 1.0}
    weights, z_bounds, scope = mix_edits({"emotion": mix}, NAMES, steering)
    assert scope.shape == (2, 2, 3)
    t.add("a", weights, z_bounds=z_bounds, scope=scope)
    prompt, generated, replay_prompt, replay_generated = range(4)
    # layer index 0 (decoder layer 1, the band): sadness at 1/1, joy nowhere
    assert t.slot_weights[0][prompt].tolist() == [0.0, 1.0, 0.0]
    assert t.slot_weights[0][generated].tolist() == [0.0, 1.0, 0.0]
    # layer index 1 (decoder layer 2): joy on generated tokens, full weight
    assert t.slot_weights[1][generated].tolist() == [2.0, 0.0, 0.0]
    assert t.slot_weights[1][replay_generated].tolist() == [2.0, 0.0, 0.0]
    assert t.slot_weights[1][prompt].eq(0).all() and t.slot_weights[1][replay_prompt].eq(0).all()
    for layer in range(2):  # fear's cap on prompt tokens at both layers only
        assert t.bounds[layer][prompt, 1, 2] == 1.0 and t.bounds[layer][replay_prompt, 1, 2] == 1.0
        assert t.bounds[layer][generated, 1, 2] == INF
    t.add("b", torch.tensor([1.0, 0.0, 0.0]))  # no scope: the plain scale, the band only
    assert t.slot_weights[0][4].tolist() == [0.5, 0.0, 0.0]
    assert t.slot_weights[1][4].eq(0).all()


def test_the_front_door_checks_a_scope_against_the_engines_layers():
    """A scope is part of the normal form (and so of the cache salt); a layer the engine does
    not steer is one clear error, before the request reaches a worker."""
    config = EmokernConfig.from_additional_config({"emokern": {}})  # layers "auto": [12]
    normal = check_mix({"emotion": "joy[generated]=1,fear=1"}, config)
    assert normal == {"joy": {"weight": 1.0, "positions": "generated"}, "fear": 1.0}
    assert cache_salt({"emotion": normal}) != cache_salt({"emotion": {"joy": 1.0, "fear": 1.0}})
    with pytest.raises(ValueError, match=r"emokern.vllm: extra_args\['emotion'\]\['joy'\] steers "
                                         r"layers \[3\], which this steerer does not steer "
                                         r"\(it steers \[12\]\)"):
        check_mix({"emotion": "joy[3]=1"}, config)
    # an engine may steer more layers than its band, for requests that scope edits to them
    wide = EmokernConfig.from_additional_config({"emokern": {"layers": [11, 12, 13],
                                                             "band": [12]}})
    assert wide.band == (12,)
    steering = wide.steering(wide.load_bank(), 30)
    assert steering.layers == (11, 12, 13) and steering.band == (12,) and steering.scale == 1.0
    assert check_mix({"emotion": "joy[11-13]=1,fear=1"}, wide) == {
        "joy": {"weight": 1.0, "layers": [11, 12, 13]}, "fear": 1.0}
    for band, message in ((3, r"band: layer 3 .* not .* steered|band \[3\] must be some"),
                          ("x", "band must be 'auto' or"), ([12, 12], "band lists a layer twice")):
        bad = EmokernConfig.from_additional_config({"emokern": {"layers": [11, 12],
                                                                "band": band}})
        with pytest.raises(ValueError, match=message):
            bad.steering(bad.load_bank(), 30)
