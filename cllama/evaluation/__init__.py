"""Notebook 06, evaluation: HumanEval problems, prompts and scoring (`humaneval`), the resumable
harness (`harness`) and the sandbox for generated code (`sandbox`, `sandbox_worker`)."""
