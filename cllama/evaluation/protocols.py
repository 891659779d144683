"""Evaluation protocols, named and recorded with every number: how a prompt is built, where a
completion stops, how it is decoded, and the paper's figure for the same model and protocol.

| protocol     | prompt                                                           | stops                        |
|--------------|------------------------------------------------------------------|------------------------------|
| `unstripped` | the HumanEval prompt as shipped (Code Llama's paper; base/Python) | HumanEval's (REFERENCE 7)    |
| `stripped`   | the prompt without surrounding whitespace (bigcode's default)    | HumanEval's                  |
| `instruct`   | Instruct models: INSTRUCT_TEMPLATE in the chat template; the code | end of the answer (eos)      |
|              | is the answer's first fenced block (HumanEvalSynthesize-style)    |                              |
| `mbpp`       | MBPP, 3-shot (cllama.evaluation.mbpp)                             | `[DONE]`                     |

Decoding presets (DECODING): `greedy` (temperature 0: pass@1, the paper's) and `sampled`
(temperature 0.8, top-p 0.95: pass@10/100, the paper samples 200 per task). Greedy runs decode in
fixed groups of DECODE_GROUP consecutive tasks whatever the batch size asked for (cllama.evaluation.harness),
so a greedy number does not move with `batch_size`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Optional

PROMPT_STYLES = ("unstripped", "stripped", "instruct")
BENCHMARKS = ("humaneval", "humaneval_infilling", "mbpp")
DECODING = {"greedy": {"temperature": 0.0, "top_p": 0.95}, "sampled": {"temperature": 0.8, "top_p": 0.95}}
DECODE_GROUP = 8  # greedy evaluation decodes tasks in fixed groups of this many, in task order
INSTRUCT_TEMPLATE = ("Complete the following Python function. Reply with the whole function in one "
                     "```python code block.\n```python\n{prompt}\n```")
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)

# Code Llama paper (arXiv 2308.12950), pass@1 in %, greedy (REFERENCE.md section 7).
PAPER_PASS_AT_1 = {
    "codellama-7b": 33.5, "codellama-13b": 36.0, "codellama-34b": 48.8,
    "codellama-7b-python": 38.4, "codellama-13b-python": 43.3, "codellama-34b-python": 53.7,
    "codellama-7b-instruct": 34.8, "codellama-13b-instruct": 42.7, "codellama-34b-instruct": 41.5,
}
PAPER_MBPP_PASS_AT_1 = {"codellama-7b": 41.4, "codellama-13b": 47.0, "codellama-34b": 55.0}
PAPER_INFILLING_PASS_AT_1 = {  # PSM, single-line / multi-line
    "codellama-7b": {"single-line": 77.0, "multi-line": 49.7},
    "codellama-13b": {"single-line": 80.7, "multi-line": 53.7},
}
MINDFORMERS_34B_PASS_AT_1 = 46.95


def protocol_name(benchmark: str, prompt_style: str, temperature: float, infilling: Optional[str] = None) -> str:
    """The name a number is recorded under, e.g. `humaneval/unstripped/greedy`, `mbpp/greedy`,
    `humaneval_infilling/single-line/greedy`."""
    decoding = "greedy" if temperature == 0 else f"sampled-t{temperature:g}"
    if benchmark == "mbpp":
        return f"mbpp/{decoding}"
    if benchmark == "humaneval_infilling" or infilling:
        return f"humaneval_infilling/{infilling}/{decoding}"
    return f"humaneval/{prompt_style}/{decoding}"


def paper_figure(preset: Optional[str], protocol: str) -> Optional[float]:
    """The paper's pass@1 (%) for the same model and protocol, or None when the paper has none (other
    prompts, sampled decoding, or a model it did not evaluate)."""
    if not preset or not protocol.endswith("/greedy"):
        return None
    if protocol == "humaneval/unstripped/greedy" and not preset.endswith("-instruct"):
        return PAPER_PASS_AT_1.get(preset)
    if protocol == "humaneval/instruct/greedy" and preset.endswith("-instruct"):
        return PAPER_PASS_AT_1.get(preset)
    if protocol == "mbpp/greedy":
        return PAPER_MBPP_PASS_AT_1.get(preset)
    if protocol.startswith("humaneval_infilling/"):
        return PAPER_INFILLING_PASS_AT_1.get(preset, {}).get(protocol.split("/")[1])
    return None


def instruct_request(prompt: str) -> list[dict]:
    """The Instruct dialog for a HumanEval prompt (one user turn)."""
    return [{"role": "user", "content": INSTRUCT_TEMPLATE.format(prompt=prompt.strip())}]


def extract_code(answer: str) -> str:
    """The code of an Instruct answer: its first fenced block (```python ... ```, an unclosed one runs
    to the end), else the whole answer."""
    match = _FENCE.search(answer)
    return (match.group(1) if match else answer).rstrip() + "\n"


def instruct_completion(task: Mapping, answer: str) -> str:
    """The completion that makes `prompt + completion` the answer's code: the whole function after the
    prompt (a docstring-only body is valid Python, so the answer's definition replaces it) when the
    answer defines the entry point, else the answer's code as the body."""
    code = extract_code(answer)
    if re.search(rf"^\s*def\s+{re.escape(task['entry_point'])}\s*\(", code, re.MULTILINE):
        return "\n" + code
    return code
