"""What ``bench/bench_vllm.py`` needs beyond vLLM itself: the generate benchmark's sweep as vLLM
requests, and the lines its engines' worker processes log.

**The sweep.** The sweep of :mod:`emokern.benchmarks.mix_sweep` (6 emotions × 7 weights × 8
prompts, greedy, ``new_tokens`` per sequence) as one ``LLM.generate`` call of 336 requests,
each carrying its own mix in ``SamplingParams(extra_args={"emotion": mix})``, in the same order
as :func:`~emokern.benchmarks.mix_sweep.sweep_emokern`'s rows (condition-major), so the tokens of
the two can be compared row by row. ``bench/bench_vllm.py`` runs it against the Hugging Face loop.

The prompts are the very token ids the Hugging Face sweep feeds (its left-padded batch with
the padding removed). Fixed length on both sides: Hugging Face's ``min_new_tokens =
max_new_tokens`` masks the end-of-sequence token at every step, and so does vLLM's
``min_tokens = max_tokens`` (``ignore_eos`` alone would let vLLM pick EOS and go on).

**Worker logs.** vLLM runs the model in processes of its own, which inherit this process's
standard output and error; what they log (which kernel backs the op, thread binding) is only
seen there. :class:`CapturedLines` passes both streams through unchanged while keeping the
lines that match a pattern, for the benchmark's record.

vLLM is imported inside :func:`sampling_params` only: the rest runs without it.
"""

from __future__ import annotations

import gc
import os
import re
import sys
import threading
import time
from collections.abc import Mapping, Sequence

import torch

from emokern.benchmarks.mix_sweep import sweep_conditions
from emokern.benchmarks.workload import PROMPTS
from emokern.tokens import encode_prompts

__all__ = ["CapturedLines", "close_engine", "first_differences", "identical_rows",
           "prompt_requests", "sampling_params", "sweep_requests", "timed_vllm_generate"]


def prompt_requests(tokenizer, prompts: Sequence[str]) -> list[dict]:
    """``prompts`` as vLLM requests ``{"prompt_token_ids": [...]}``: each chat-formatted and
    tokenized exactly as Hugging Face generation feeds it (:func:`emokern.tokens.encode_prompts`,
    the left-padded batch with its padding removed), so both engines see the same ids."""
    encoded = encode_prompts(tokenizer, list(prompts))
    return [{"prompt_token_ids": row[mask.bool()].tolist()} for row, mask in
            zip(encoded["input_ids"], encoded["attention_mask"], strict=True)]


def sweep_requests(tokenizer, bank) -> tuple[list[dict], list[dict[str, float]]]:
    """The sweep as vLLM requests: ``(prompts, mixes)``, 42 × 8 of each.

    ``prompts[i]`` is ``{"prompt_token_ids": [...]}``, the chat-formatted prompt of
    :data:`~emokern.benchmarks.workload.PROMPTS` ``[i % 8]`` tokenized exactly as the Hugging
    Face sweep does (:func:`emokern.tokens.encode_prompts`, padding removed); ``mixes[i]`` is
    condition ``i // 8`` of :func:`~emokern.benchmarks.mix_sweep.sweep_conditions` (bank units).
    """
    ids = [request["prompt_token_ids"] for request in prompt_requests(tokenizer, PROMPTS)]
    conditions = sweep_conditions(bank)
    prompts = [{"prompt_token_ids": list(ids[p])} for _ in conditions for p in range(len(ids))]
    mixes = [dict(mix) for mix in conditions for _ in ids]
    return prompts, mixes


def sampling_params(mixes: Sequence[Mapping | None], new_tokens: int, *,
                    fixed_length: bool = True, stop_token_ids: Sequence[int] = (),
                    detokenize: bool = True) -> list:
    """One greedy ``vllm.SamplingParams`` per request, with the request's mix as
    ``extra_args["emotion"]`` (no ``extra_args`` for ``None``; any form of the mix grammar).

    With ``fixed_length`` (the benchmarks) exactly ``new_tokens`` tokens each
    (``min_tokens = max_tokens``, ``ignore_eos``); without it (the evaluation) at most
    ``new_tokens``, ending at the first of ``stop_token_ids`` or the tokenizer's EOS, which is
    kept in the output as Hugging Face's ``generate`` keeps it. ``detokenize=False`` leaves the
    text to the caller (fewer front-end cycles when it decodes the tokens itself).
    """
    # Imported here: only the vLLM environment has vLLM.
    from vllm import SamplingParams

    if new_tokens < 1:
        raise ValueError(f"sampling_params: new_tokens must be at least 1, got {new_tokens}")
    length = {"min_tokens": new_tokens, "ignore_eos": True} if fixed_length else \
        {"stop_token_ids": sorted(int(t) for t in stop_token_ids)}
    return [SamplingParams(temperature=0.0, max_tokens=new_tokens, detokenize=detokenize,
                           extra_args=None if mix is None else {"emotion": _plain(mix)},
                           **length)
            for mix in mixes]


def _plain(mix):
    """A mix as plain JSON-able data (dicts copied, nested ones too)."""
    if isinstance(mix, Mapping):
        return {k: _plain(v) for k, v in mix.items()}
    return mix


def close_engine(llm) -> None:
    """Shut a ``vllm.LLM``'s engine core and its worker processes down now (rather than when
    the object is collected), so the next engine gets the memory and the cores."""
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def timed_vllm_generate(llm, prompts: Sequence[dict], params: Sequence) -> tuple[list, float]:
    """``llm.generate(prompts, params)`` in one call: ``(outputs, wall seconds)``."""
    start = time.perf_counter()
    outputs = llm.generate(list(prompts), list(params), use_tqdm=False)
    return outputs, time.perf_counter() - start


def _token_list(row) -> list[int]:
    return row.tolist() if isinstance(row, torch.Tensor) else [int(t) for t in row]


def _row_pairs(a: Sequence, b: Sequence, caller: str):
    if len(a) != len(b):
        raise ValueError(f"{caller}: {len(a)} rows against {len(b)}")
    return ((_token_list(x), _token_list(y)) for x, y in zip(a, b, strict=True))


def identical_rows(a: Sequence, b: Sequence) -> int:
    """How many rows of two token lists (lists of int or 1-d tensors) are identical."""
    return sum(x == y for x, y in _row_pairs(a, b, "identical_rows"))


def first_differences(a: Sequence, b: Sequence) -> dict[str, int]:
    """Where the rows of two token lists that differ first differ: ``{step: rows}`` (``step``
    counts from 0), in step order."""
    steps: dict[str, int] = {}
    for x, y in _row_pairs(a, b, "first_differences"):
        if x != y:
            step = next(i for i, (u, v) in enumerate(zip(x, y, strict=True)) if u != v)
            steps[str(step)] = steps.get(str(step), 0) + 1
    return dict(sorted(steps.items(), key=lambda item: int(item[0])))


class CapturedLines:
    """Within the ``with`` block, keep the lines written to file descriptors 1 and 2 (by this
    process and by every process started inside the block, which inherits them) that match
    ``pattern``, while passing everything on to where the streams went before.

    Each descriptor is pointed at a pipe that a thread drains into a copy of the original
    descriptor. On exit the descriptors are restored; a child process still holding the pipe
    (a vLLM worker not yet shut down) keeps it open, so the threads are not waited for beyond
    ``timeout`` seconds. ``lines`` lists the matching lines (decoded, without the newline).
    """

    def __init__(self, pattern: str, *, timeout: float = 5.0) -> None:
        self.pattern = re.compile(pattern)
        self.timeout = timeout
        self.lines: list[str] = []
        self._streams: list[tuple[int, int, threading.Thread]] = []  # (fd, its copy, pump)
        self._lock = threading.Lock()

    def __enter__(self) -> CapturedLines:
        if self._streams:
            raise RuntimeError("CapturedLines: already capturing")
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            saved = os.dup(fd)
            read, write = os.pipe()
            os.dup2(write, fd)
            os.close(write)
            thread = threading.Thread(target=self._pump, args=(read, saved), daemon=True)
            thread.start()
            self._streams.append((fd, saved, thread))
        return self

    def _pump(self, read: int, target: int) -> None:
        pending = b""
        with os.fdopen(read, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(target, view):]
                *complete, pending = (pending + chunk).split(b"\n")
                self._keep(complete)
        self._keep([pending] if pending else [])

    def _keep(self, raw_lines: list[bytes]) -> None:
        for raw in raw_lines:
            line = raw.decode(errors="replace").rstrip("\r")
            if self.pattern.search(line):
                with self._lock:
                    self.lines.append(line)

    def __exit__(self, *exc_info) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved, _ in self._streams:
            os.dup2(saved, fd)  # closes this process's write end of the pipe
        for _, saved, thread in self._streams:
            thread.join(self.timeout)
            if not thread.is_alive():  # else a child still writes through it: leave it open
                os.close(saved)
        self._streams = []
