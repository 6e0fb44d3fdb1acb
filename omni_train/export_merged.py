"""Export a checkpoint's denoiser as one plain safetensors file, LoRA adapters merged:

    python -m omni_train.export_merged checkpoint=RUN_DIR[/checkpoints/step_N] out=FILE \
        [use_ema=true] [dtype=float32|bfloat16|float16] [trust_checkpoint_code=true]

The file loads strictly into ``build_denoiser(model_cfg)`` of the run's model config (stored in
its header as model_config), without peft, e.g. as the model.backbone.pretrained of a new run.
A trainer.finetune.mode=lora checkpoint has its adapters folded into the base weights
(W + alpha / rank * B @ A); new_modules and full checkpoints are written whole.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from omni_train.runs import export_merged

OPTIONS = ("checkpoint", "out", "use_ema", "dtype", "trust_checkpoint_code")
FLAGS = ("use_ema", "trust_checkpoint_code")


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
    options = dict(arg.split("=", 1) for arg in argv if "=" in arg)
    unknown = [arg for arg in argv if "=" not in arg or arg.split("=", 1)[0] not in OPTIONS]
    missing = [name for name in ("checkpoint", "out") if name not in options]
    if unknown or missing:
        _fail(f"unknown arguments {unknown}, missing {missing}\n{__doc__}")
    flags = {name: options.get(name, "false").lower() for name in FLAGS}
    for name, value in flags.items():
        if value not in ("true", "false"):
            _fail(f"{name}={value}: use true or false")
    try:
        path = export_merged(
            options["checkpoint"],
            options["out"],
            dtype=options.get("dtype", "float32"),
            **{name: value == "true" for name, value in flags.items()},
        )
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    print(f"merged weights written to {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
