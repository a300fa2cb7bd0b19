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

__all__ = ["CapturedLines", "first_differences", "identical_rows", "sampling_params",
           "sweep_requests", "timed_vllm_generate"]


def sweep_requests(tokenizer, bank) -> tuple[list[dict], list[dict[str, float]]]:
    """The sweep as vLLM requests: ``(prompts, mixes)``, 42 × 8 of each.

    ``prompts[i]`` is ``{"prompt_token_ids": [...]}``, the chat-formatted prompt of
    :data:`~emokern.benchmarks.workload.PROMPTS` ``[i % 8]`` tokenized exactly as the Hugging
    Face sweep does (:func:`emokern.tokens.encode_prompts`, padding removed); ``mixes[i]`` is
    condition ``i // 8`` of :func:`~emokern.benchmarks.mix_sweep.sweep_conditions` (bank units).
    """
    encoded = encode_prompts(tokenizer, list(PROMPTS))
    ids = [row[mask.bool()].tolist() for row, mask in
           zip(encoded["input_ids"], encoded["attention_mask"], strict=True)]
    conditions = sweep_conditions(bank)
    prompts = [{"prompt_token_ids": list(ids[p])} for _ in conditions for p in range(len(ids))]
    mixes = [dict(mix) for mix in conditions for _ in ids]
    return prompts, mixes


def sampling_params(mixes: Sequence[Mapping[str, float] | None], new_tokens: int) -> list:
    """One greedy ``vllm.SamplingParams`` per request, exactly ``new_tokens`` tokens each, with
    the request's mix as ``extra_args["emotion"]`` (no ``extra_args`` for ``None``)."""
    # Imported here: only the vLLM environment has vLLM.
    from vllm import SamplingParams

    if new_tokens < 1:
        raise ValueError(f"sampling_params: new_tokens must be at least 1, got {new_tokens}")
    return [SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens,
                           ignore_eos=True,
                           extra_args=None if mix is None else {"emotion": dict(mix)})
            for mix in mixes]


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
