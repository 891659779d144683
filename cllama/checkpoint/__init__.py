"""Notebook 01, weights: parameter names and shapes (`names`, pure), the MindSpore .ckpt and
safetensors files (`ckpt_file`, `safetensors_file`), Hugging Face / Meta / MindSpore tensor sources
(`sources`), streaming conversion (`convert`), model directories (`model_dir`) and LoRA adapters
(`lora`, pure; `adapter`)."""
