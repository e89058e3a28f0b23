"""The ``moee`` command: ``moee <subcommand> [--flags]``; each subcommand is a thin wrapper over a
library function. ``moee <subcommand> --help`` lists its flags.

  convert   SD1.5 (diffusers folders) + AnimateDiff motion weights → Orbax parameter checkpoint
  demo      train MoEE on synthetic talking faces, animate held-out people, score them (no weights needed)
  train     one training stage (vae | embedder | stage1 | stage2) on a TFDS dataset, sharded, resumable
  prepare   real videos (manifest CSV or MEAD tree) → face-cropped clips → talking_face_clips TFDS dataset
  features  a dataset's wav2vec2 audio and T5 text features, computed once into a cache (data.features)
  animate   portrait + speech + emotion → talking-head MP4 with the speech muxed in (or a manifest CSV of them)
  eval      score a run on held-out synthetic identities (emotion, AUs, compounds, lip sync, identity)
  ablate    train and score MoEE's stage-2 ablations from a run's stage 1; prints the paper-form table
  ladder    the diagnostic ladder of a run: instrument ceiling → overfit one clip → … → held-out, pass / fail
  serve     a web page (Gradio) to animate portraits with a run's model, on 127.0.0.1
  verify    check a run's checkpoints: each stage's export against its checksums, each training checkpoint read
  analyze   latent-space analysis of a run: clustering strength, PCA / t-SNE, gates, interpolations

Modules: data.py (convert, prepare, features), training.py (train, demo), animation.py (animate,
serve), scoring.py (eval, ablate, ladder, verify), common.py (the --config flag, log files); this
one parses the command line (flags spelt with hyphens or underscores, one-line flag errors) and
dispatches.
"""

from __future__ import annotations

import logging
import re
import sys

from absl import app, flags

from moee_jax.cli import animation, data, scoring, training
from moee_jax.cli.common import CONFIGS, resolve_config

COMMANDS = {"convert": data.convert, "demo": training.demo, "train": training.train, "prepare": data.prepare,
            "features": data.features, "animate": animation.animate, "eval": scoring.evaluate, "ablate": scoring.ablate,
            "ladder": scoring.ladder, "serve": animation.serve, "verify": scoring.verify}  # fmt: skip

EXAMPLES = {
    "convert": "moee convert --unet sd15/unet --vae sd15/vae --motion_adapter mm_sd_v15_v2.safetensors --out checkpoints/sd15",
    "demo": "moee demo --out outputs/demo            # add --from_scratch to train every stage again",
    "train": "moee train --config stage1.py:tiny --run_dir runs/r1 --config.data.data_dir data/",
    "prepare": "moee prepare --input videos.csv --out prepared/ --data_dir data/",
    "features": "moee features --data_dir data/ --dataset talking_face_clips --audio_encoder wav2vec2-base/",
    "animate": "moee animate --checkpoint runs/r1 --image face.png --audio speech.wav --emotion happy:0.6,surprised:0.4 --out out.mp4",
    "eval": "moee eval runs/r1 --steps 10",
    "ablate": "moee ablate runs/r1 --variants full,no_moe",
    "ladder": "moee ladder runs/r1 --rungs ceiling,overfit",
    "serve": "moee serve --checkpoint outputs/demo/run --port 7860",
    "verify": "moee verify runs/r1",
}


def summary(command: str) -> str:
    """The one-line description of ``command`` in this module's docstring table."""
    for line in __doc__.splitlines():
        if line.strip().startswith(command + " "):
            return line.strip()[len(command) :].strip()
    return ""


def command_help(command: str, names: set[str]) -> str:
    """``moee <command> --help``: the command's own flags (``names``) with their defaults and help,
    and one example; absl's and JAX's own flags stay in ``--helpfull``."""
    lines = [f"moee {command}: {summary(command)}", "", f"usage: moee {command} [--flag=value ...]", "", "flags:"]
    for name in sorted(names):
        flag = flags.FLAGS[name]
        kind = "" if flag.boolean else "=" + flag.flag_type().split()[-1].upper()
        default = "" if flag.default is None else " (default: " + flag.default_as_str.strip("'").replace(f"{CONFIGS}/", "") + ")"
        required = " (required)" if _required(flag) else ""
        lines.append(f"  --{name}{kind}{required}{default}")
        lines.append(f"      {flag.help}")
    lines += ["", "example:", f"  {EXAMPLES[command]}", "", "absl and JAX flags: moee " + command + " --helpfull"]
    return "\n".join(lines)


def _required(flag) -> bool:
    """Whether absl's ``required=True`` validator guards ``flag``."""
    return any("must have a value other than None" in str(getattr(v, "message", "")) for v in flag.validators)


def run(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(argv) > 1 else 2)
    if argv[1] not in (*COMMANDS, "analyze"):
        import difflib

        close = difflib.get_close_matches(argv[1], [*COMMANDS, "analyze"], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        sys.exit(f"moee: unknown command {argv[1]!r}; {hint}`moee --help` lists the commands")
    command = argv[1]
    from moee_jax import console

    argv[2:] = ["--verbosity=1" if a == "-v" else a for a in argv[2:]]
    if not any(a.startswith("--verbosity") for a in argv[2:]):
        console.quiet_native_logs()
    if command == "analyze":  # argparse-based (python -m moee_jax.analysis)
        from moee_jax.analysis.__main__ import main as analyze

        console.configure(verbose=any(a.startswith("--verbosity") for a in argv[2:]))
        sys.exit(analyze([underscored(a) for a in argv[2:] if not a.startswith("--verbosity")]))
    # jax's backend probe would report every platform it did not find (TPU, GPU).
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    before = set(flags.FLAGS)
    try:  # ml_collections reads --config overrides from sys.argv as the flag is defined
        main = COMMANDS[command]()
    except Exception as e:  # noqa: BLE001 - a bad override or config file is the user's input
        sys.exit(f"moee {command}: {flag_error(e, [underscored(a) for a in argv[2:]])}")
    if any(a in ("-h", "--help") for a in argv[2:]):
        print(command_help(command, set(flags.FLAGS) - before))
        sys.exit(0)
    full = [f"moee {command}"] + _config_paths([_negated(underscored(a)) for a in argv[2:]])
    try:  # the flags (and --config with its overrides) as one line each, before absl's own parse
        remaining = flags.FLAGS(full)
        config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
        if config is not None:
            config.to_dict()  # a config file that failed to load raises its error on first use
    except Exception as e:  # noqa: BLE001 - any parse failure is the user's input, reported as such
        sys.exit(f"moee {command}: {flag_error(e, full[1:])}")

    def with_console(argv):  # after app.run's own logging set-up, which it would otherwise override
        console.configure(verbose=flags.FLAGS.verbosity >= 1)
        return main(argv)

    app.run(with_console, argv=full, flags_parser=lambda _: remaining)  # parsed above


def flag_error(error: BaseException, args: list[str] = ()) -> str:
    """One readable line for a flag or config error (``args``: the command line): ml_collections'
    suggestion ("Did you mean …") and the last line of a config file's traceback instead of the
    whole chain, with the flag it came from."""
    text = str(error).replace("\\n", "\n").replace("\\'", "'")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    unknown = re.match(r"Unknown command line flag '([^']+)'(?:\. Did you mean: ([^?]+) \?)?", lines[0])
    if unknown:
        hint = f" (did you mean --{unknown.group(2).strip()}?)" if unknown.group(2) else ""
        return f"--{unknown.group(1)}: unknown flag{hint}; `--help` lists the flags"
    if "Failed loading config file" in text:
        shipped = ", ".join(sorted(p.name for p in CONFIGS.glob("*.py") if not p.name.startswith("_")))
        return (
            f"--config: cannot read {lines[-2] if len(lines) > 1 else 'the file'} ({lines[-1]}); give a path or a shipped config: {shipped}"
        )
    hint = next((line.strip("'\"") for line in lines if "Did you mean" in line), None)
    if hint is not None:  # an unknown config field: name the override it came from
        field = lines[0].strip("'\"")
        flag = next((a.split("=")[0] for a in args if a.startswith("--config.") and a.split("=")[0].endswith("." + field)), None)
        return f"{flag or '--config'}: no config field {field!r}. {hint}"
    head = lines[0] if not lines[0].startswith("Traceback") else lines[-1]
    if "Error whilst parsing config file" in lines[0]:
        head = lines[0].split(": Error whilst")[0] + ": " + lines[-1]
    return head


def _config_paths(args: list[str]) -> list[str]:
    """Every ``--config FILE[:variant]`` value resolved by :func:`resolve_config`."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg.removeprefix("--config="))
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
    return out


def _negated(arg: str) -> str:
    """``--no_warmup`` → absl's ``--nowarmup`` for a boolean flag ``warmup`` (unless ``no_warmup``
    is itself a flag, like animate's ``--no_detect``)."""
    name = arg.removeprefix("--no_")
    if arg.startswith("--no_") and "=" not in arg and arg[2:] not in flags.FLAGS and name in flags.FLAGS \
            and isinstance(flags.FLAGS[name], flags.BooleanFlag):  # fmt: skip
        return "--no" + name
    return arg


def underscored(arg: str) -> str:
    """``--emotion-text=x`` → ``--emotion_text=x``: flags may be spelt with hyphens or underscores."""
    if not arg.startswith("--") or arg == "--":
        return arg
    name, sep, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + sep + value
