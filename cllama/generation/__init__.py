"""Notebooks 07-08, generation: the prefill/decode engine (`engine`, the only cached forward),
sampling (`sampling`), streaming text (`textstream`), the generator (`generator`) and MindIR export
(`export`)."""
