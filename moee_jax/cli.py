"""The ``moee`` command: ``moee <subcommand> [--flags]``; each subcommand is a thin wrapper over a
library function. ``moee <subcommand> --help`` lists its flags.

  convert   SD1.5 (diffusers folders) + AnimateDiff motion weights → Orbax parameter checkpoint
  demo      run the backbone end to end on a synthetic portrait and write frames
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

DEFAULT_CONFIG = "configs/backbone.py:tiny"


def _config_flag(default: str = DEFAULT_CONFIG):
    return config_flags.DEFINE_config_file("config", default, "Config file and variant, e.g. configs/backbone.py:sd15.")


def _convert() -> None:
    config = _config_flag("configs/backbone.py:sd15")
    unet = flags.DEFINE_string("unet", None, "diffusers U-Net folder (…/unet) or .safetensors file.", required=True)
    vae = flags.DEFINE_string("vae", None, "diffusers VAE folder (…/vae) or .safetensors file.")
    motion = flags.DEFINE_string("motion_adapter", None, "AnimateDiff motion adapter folder or .safetensors file.")
    out = flags.DEFINE_string("out", None, "Output checkpoint directory (must not exist yet).", required=True)
    allow_pickle = flags.DEFINE_bool("allow_pickle", False, "Also read pickle files (.bin/.ckpt/.pt): only from trusted sources.")

    def main(argv):
        del argv
        from moee_jax.checkpoint.convert.backbone import convert_backbone
        from moee_jax.checkpoint.convert.state_dict import ConversionError

        try:
            meta = convert_backbone(
                config.value, out.value, unet=unet.value, vae=vae.value, motion_adapter=motion.value, allow_pickle=allow_pickle.value
            )
        except (ConversionError, FileNotFoundError, FileExistsError) as e:
            sys.exit(f"moee convert: {e}")
        print(f"wrote {out.value}")
        for part, modules in meta["initialised"].items():
            if modules:
                print(f"  {part}: {len(modules)} module(s) not in the sources, freshly initialised, e.g. {modules[0]}")

    return main


def _demo() -> None:
    config = _config_flag()
    out = flags.DEFINE_string("out", "outputs/demo", "Output directory.")
    checkpoint = flags.DEFINE_string("checkpoint", None, "Parameter checkpoint from `moee convert` (default: fresh init).")

    def main(argv):
        del argv
        from moee_jax.inference.demo import run_demo

        summary = run_demo(config.value, out.value, checkpoint.value)
        print(f"wrote {out.value}: {summary['frames']} frames, "
              f"{summary['seconds_sampling_and_decoding_incl_compile']} s sampling + decoding (incl. compile)")

    return main


COMMANDS = {"convert": _convert, "demo": _demo}


def run(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in COMMANDS:
        print(__doc__)
        sys.exit(0 if len(argv) > 1 and argv[1] in ("-h", "--help") else 2)
    command = argv[1]
    # absl logs at INFO; jax's backend probe would report every platform it did not find (TPU, GPU).
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    main = COMMANDS[command]()
    app.run(main, argv=[f"moee {command}"] + argv[2:])


if __name__ == "__main__":
    run()
