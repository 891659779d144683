"""`cllama lora`: merge an adapter into its base, and translate adapters to and from Hugging Face PEFT.
A LoRA run itself is `cllama train --config YAML` with model.model_config.pet_config."""
from __future__ import annotations

from cllama.cli.common import command, device_arg, init_device, print_json
from cllama.fileio import check_destination


def _merge(args) -> int:
    init_device(args)
    from cllama.checkpoint.adapter import merge_adapter

    check_destination(args.dst, args.overwrite)  # written whole beside it, then renamed over it
    path = merge_adapter(args.base, args.adapter, args.dst, args.format)
    print_json({"model_dir": str(path), "base": args.base, "adapter": args.adapter})
    return 0


def _export_peft(args) -> int:
    init_device(args)
    from cllama.checkpoint.adapter import export_peft

    check_destination(args.dst, args.overwrite)  # written whole beside it, then renamed over it
    print_json({"peft_dir": str(export_peft(args.adapter, args.dst)), "adapter": args.adapter})
    return 0


def _import_peft(args) -> int:
    init_device(args)
    from cllama.checkpoint.adapter import import_peft

    check_destination(args.dst, args.overwrite)  # written whole beside it, then renamed over it
    print_json({"adapter_dir": str(import_peft(args.src, args.base, args.dst, args.format)), "peft_dir": args.src})
    return 0


def add_lora(sub) -> None:
    from cllama.checkpoint.files import FORMATS

    cmds = sub.add_parser("lora", help="LoRA adapters: merge into the base, Hugging Face PEFT export/import") \
        .add_subparsers(dest="action", required=True)
    merge = command(cmds, "merge", _merge, "fold an adapter into its base: an ordinary model directory")
    merge.add_argument("--base", required=True, help="the base model directory the adapter was trained on")
    merge.add_argument("--adapter", required=True, help="adapter directory (adapter.ckpt + adapter_config.json)")
    merge.add_argument("--dst", required=True, help="model directory to write")
    merge.add_argument("--format", choices=list(FORMATS), help="weights format (default: the base's)")
    export = command(cmds, "export-peft", _export_peft,
                     "write adapter_model.safetensors + adapter_config.json for peft.PeftModel.from_pretrained")
    export.add_argument("--adapter", required=True, help="adapter directory")
    export.add_argument("--dst", required=True, help="PEFT adapter directory to write")
    imp = command(cmds, "import-peft", _import_peft, "read a Hugging Face PEFT LoRA adapter into MindFormers names")
    imp.add_argument("--src", required=True, help="PEFT adapter directory (adapter_model.safetensors + "
                                                 "adapter_config.json)")
    imp.add_argument("--base", required=True, help="the base model directory (cllama convert hf2ms of the PEFT base)")
    imp.add_argument("--dst", required=True, help="adapter directory to write")
    imp.add_argument("--format", choices=list(FORMATS), default="ckpt", help="adapter.ckpt (default) or "
                                                                             "adapter.safetensors")
    for p in (merge, export, imp):
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst whole")
        device_arg(p)
