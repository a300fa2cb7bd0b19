"""The plugin's numbers in vLLM's Prometheus ``/metrics``.

=================================================  =========================================
metric (type; labels)                              meaning
=================================================  =========================================
``emokern_steered_requests_total`` (counter;       requests with a mix (a non-empty one, not
``kind``)                                          all zeros) that vLLM answered with 200 (on
                                                   ``/v1/completions``, ``/v1/chat/completions``,
                                                   ``/v1/responses``, ``/v1/messages``), by
                                                   the kinds of edit in the mix: ``push``,
                                                   ``level``, ``erase`` (a level at z = 0,
                                                   however written), ``cap``, ``floor``,
                                                   ``rec`` (the mix used an emotion's recipe;
                                                   the recipe's own kind counts too),
                                                   ``preset`` (the request named a preset;
                                                   the kinds of its mix count too). A request
                                                   counts once under each kind its mix has, so
                                                   the kinds do not add up to the requests
``emokern_rejected_mixes_total`` (counter;         mixes the server refused before vLLM saw
``reason``)                                        them (:data:`REASONS`): ``malformed`` (bad
                                                   term, type, JSON or conflicting terms, 400),
                                                   ``unknown_emotion``, ``unknown_preset``,
                                                   ``out_of_range`` (a non-finite number, or
                                                   one beyond float32), ``over_limit`` (a
                                                   weight or level beyond the server's
                                                   ``max_weight``/``max_level``),
                                                   ``levels_off`` (a
                                                   level, cap or floor for an engine without
                                                   levels), ``no_emokern`` (any mix for an
                                                   engine without emokern), ``forbidden``
                                                   (steering without the steering key, 403)
``emokern_reading`` (histogram; ``emotion``)       the summary readings returned to clients:
                                                   each choice's ``emotion_readings.choices[]
                                                   .readings[emotion]`` (standard scores with
                                                   a calibrated bank; ``null`` ones are left
                                                   out), buckets :data:`READING_BUCKETS`
                                                   (``_bucket`` and ``_count``; no ``_sum``:
                                                   readings go below 0, and prometheus_client
                                                   then leaves it out, as OpenMetrics asks)
``emokern_slots_in_use`` (gauge)                   requests holding steering slots in the
                                                   engine's workers when ``/metrics`` is
                                                   scraped: steered ones, and unsteered ones
                                                   too while readings are on (a finished
                                                   request frees its slots at the engine's
                                                   next step)
``emokern_slots_capacity`` (gauge)                 requests that can hold slots at once
                                                   (``max_requests``, default twice vLLM's
                                                   ``max_num_seqs``)
=================================================  =========================================

**Which process counts what.** vLLM's API server answers ``GET /metrics`` from
prometheus_client's registry of its own process (``REGISTRY``; with several API servers,
``--api-server-count``, vLLM switches to prometheus_client's multiprocess mode and every API
server's values are merged, which these metrics, plain prometheus_client metrics, take part
in). The counters and the histogram are counted in that process by the HTTP middleware
(:mod:`emokern.vllm.http`), which sees every request's mix, every refusal it answers itself
and every readings block it returns. The slots live in the workers' slot tables
(:class:`~emokern.vllm.slots.SlotTable`, another process): when ``GET /metrics`` passes
through the middleware it first asks the engine (``collective_rpc("emokern_slots")``) and
sets both gauges, so they are what the workers hold at that scrape (``NaN`` when the engine did
not answer within :data:`SLOTS_TIMEOUT_S`); a data-parallel deployment reports the engine that
``collective_rpc`` reaches, as readings do.

The middleware records through the functions below; prometheus_client is imported the first
time one runs (it comes with vLLM); without it they record nothing. This module imports
neither vLLM nor prometheus_client when imported. Tested in ``tests/test_metrics.py`` (the
counting, without vLLM) and ``tests/vllm/test_metrics.py`` (scraping a live ``emokern
serve``).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Mapping

from emokern.steering.mix import asks_rec, has_scope, normalize_mix

__all__ = ["KINDS", "READING_BUCKETS", "REASONS", "SLOTS_METHOD", "SLOTS_TIMEOUT_S", "Metrics",
           "current", "edit_kinds", "record_readings", "record_rejected", "record_slots",
           "record_steered", "refresh_slots", "reject_reason"]

log = logging.getLogger("vllm.emokern")

#: The worker method (added to vLLM's ``WorkerBase`` by the plugin) that reports slots.
SLOTS_METHOD = "emokern_slots"
#: How long a scrape waits for the engine's slot counts.
SLOTS_TIMEOUT_S = 5.0

#: ``emokern_steered_requests_total``'s ``kind`` values.
KINDS = ("push", "level", "erase", "cap", "floor", "scope", "rec", "preset")
#: ``emokern_rejected_mixes_total``'s ``reason`` values.
REASONS = ("malformed", "unknown_emotion", "unknown_preset", "out_of_range", "over_limit",
           "levels_off", "no_emokern", "forbidden")
#: Upper bounds of ``emokern_reading``'s buckets (standard scores; ``+Inf`` is added).
READING_BUCKETS = (-10.0, -5.0, -3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0,
                   20.0)

# A refusal's reason, from the words of the message (emokern.vllm.config.check_mix and
# emokern.steering.mix): the first entry whose phrase the message holds; none, "malformed".
_REASON_PHRASES = (
    ("started without emotion steering", "no_emokern"),
    ("not a mix and not a preset", "unknown_preset"),
    ("names unknown emotion", "unknown_emotion"),
    ("started without levels", "levels_off"),
    ("asks for a level or bound", "levels_off"),  # levels with an uncalibrated bank
    ("must be finite", "out_of_range"),
    ("outside float32's finite range", "out_of_range"),
    ("beyond this server's limit", "over_limit"),
)


def reject_reason(message: str) -> str:
    """The :data:`REASONS` entry for a mix refused with ``message`` (the text of the
    TypeError/ValueError :func:`emokern.vllm.config.check_mix` raised); ``"malformed"`` when
    no more specific reason fits."""
    return next((reason for phrase, reason in _REASON_PHRASES if phrase in message),
                "malformed")


def edit_kinds(mix, normal: Mapping | None, presets: Iterable[tuple[str, str]] = ()
               ) -> tuple[str, ...]:
    """The :data:`KINDS` of an accepted mix, in that order (empty when unsteered).

    Parameters
    ----------
    mix
        The request's mix as sent (``vllm_xargs["emotion"]``): ``rec`` and a preset's name are
        seen only here.
    normal : Mapping or None
        Its normal form (what :func:`~emokern.vllm.config.check_mix` returned; None:
        unsteered): pushes, levels (``erase`` = level 0), caps (``max``), floors (``min``).
    presets : iterable of (name, mix text)
        The engine's presets (:attr:`~emokern.vllm.config.EmokernConfig.presets`).
    """
    if not normal:
        return ()
    found = set()
    for term in normal.values():
        fields = term if isinstance(term, Mapping) else {"weight": term}
        if fields.get("weight"):
            found.add("push")
        if "level" in fields:
            found.add("erase" if fields["level"] == 0 else "level")
        if "max" in fields:
            found.add("cap")
        if "min" in fields:
            found.add("floor")
        if has_scope(term):
            found.add("scope")
    written = mix
    if isinstance(mix, str):
        named = dict(presets).get(mix.strip())
        if named is not None:
            found.add("preset")
            written = named
    try:
        raw = normalize_mix(written, argument="mix", who="emokern.vllm")
    except (TypeError, ValueError):  # accepted already: cannot happen, and counts no rec
        raw = {}
    if any(asks_rec(t) for t in raw.values()):
        found.add("rec")
    return tuple(k for k in KINDS if k in found)


class Metrics:
    """The metrics themselves (prometheus_client objects), registered in ``registry``
    (prometheus_client's ``REGISTRY`` by default: what vLLM's ``/metrics`` serves). Label
    values of :data:`KINDS` and :data:`REASONS` exist from the start (at 0)."""

    def __init__(self, registry=None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        registry = REGISTRY if registry is None else registry
        self.steered = Counter(
            "emokern_steered_requests", "Requests with a mix that vLLM answered with 200, by "
            "kind of edit (a request counts once under each kind its mix has)", ["kind"],
            registry=registry)
        self.rejected = Counter(
            "emokern_rejected_mixes", "Mixes refused before vLLM saw them, by reason",
            ["reason"], registry=registry)
        self.reading = Histogram(
            "emokern_reading", "Summary readings returned to clients (emotion_readings."
            "choices[].readings), per emotion", ["emotion"], buckets=READING_BUCKETS,
            registry=registry)
        # Set at each scrape by the process that answers it: the most recent value is true.
        self.slots_in_use = Gauge(
            "emokern_slots_in_use", "Requests holding steering slots in the engine's workers",
            registry=registry, multiprocess_mode="mostrecent")
        self.slots_capacity = Gauge(
            "emokern_slots_capacity", "Requests that can hold steering slots at once",
            registry=registry, multiprocess_mode="mostrecent")
        for kind in KINDS:
            self.steered.labels(kind=kind)
        for reason in REASONS:
            self.rejected.labels(reason=reason)


@functools.cache
def current() -> Metrics | None:
    """This process's :class:`Metrics` on prometheus_client's ``REGISTRY`` (made once), or
    None without prometheus_client."""
    try:
        return Metrics()
    except ImportError:
        return None


def record_steered(kinds: Iterable[str]) -> None:
    """One steered request answered with 200, whose mix has ``kinds``."""
    metrics = current()
    if metrics is not None:
        for kind in kinds:
            metrics.steered.labels(kind=kind).inc()


def record_rejected(reason: str) -> None:
    """One mix refused (a :data:`REASONS` entry)."""
    metrics = current()
    if metrics is not None:
        metrics.rejected.labels(reason=reason).inc()


def record_readings(readings: Mapping[str, float | None]) -> None:
    """One choice's summary readings (emotion → value; None and NaN are left out)."""
    metrics = current()
    if metrics is None:
        return
    for emotion, value in readings.items():
        if value is not None and math.isfinite(value):
            metrics.reading.labels(emotion=emotion).observe(value)


def record_slots(in_use: float, capacity: float) -> None:
    """The slot gauges (``NaN``: unknown)."""
    metrics = current()
    if metrics is not None:
        metrics.slots_in_use.set(in_use)
        metrics.slots_capacity.set(capacity)


async def refresh_slots(engine) -> None:
    """Ask ``engine`` (vLLM's engine client) for its workers' slot counts and set the gauges
    (``NaN`` when it fails or takes longer than :data:`SLOTS_TIMEOUT_S`). Every worker of an
    engine holds the same requests (tensor or pipeline parallel ranks), so the largest
    answer is the engine's."""
    import asyncio

    try:
        parts = await asyncio.wait_for(engine.collective_rpc(SLOTS_METHOD), SLOTS_TIMEOUT_S)
        parts = [p for p in parts if p]
        record_slots(max(p["in_use"] for p in parts), max(p["capacity"] for p in parts))
    except Exception as exc:  # never fail the scrape: vLLM's own metrics still go out
        log.warning("emokern.vllm: slot counts unavailable for /metrics: %r", exc)
        record_slots(math.nan, math.nan)
