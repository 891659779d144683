"""cllama: a Code Llama research workbench on MindSpore.

Import the stage modules directly, e.g. `from cllama.config import ModelConfig`; importing
`cllama` itself loads nothing heavy and changes no global state.
"""
__version__ = "0.1.0"
