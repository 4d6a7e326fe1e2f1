"""
Flags from a config dataclass: every field is a flag of the same name, with its help, its range and
its choices, and a value comes from one of a few layers of defaults, recorded by name.

    cfg = parse_layered(argv, TrainConfig, layers)  # layers(flags) -> [(source, {field: value}), ...]
    cfg.sources["max_lr"]                           # "recipe modern", "preset cpu", "flag", ...

train_gpt2.py's layers: the field defaults, then --preset, then --model's shape and GPT-3 batch and
LR, then --recipe, then the flags given; the run summary prints where each changed value came from.
"""

import argparse
from dataclasses import field, fields


def flag(default, help, low=None, high=None, choices=None):
    """A config field: its help becomes the --help of the flag of the same name; a value outside
    [low, high] or not among choices is refused when the flags are parsed."""
    return field(default=default, metadata={"help": help, "low": low, "high": high, "choices": choices})


def parse_bool(text):
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0 or true/false, got {text!r}")


def bounded(parse, low, high):
    """An argparse type: parse(text), refused outside [low, high] with a message saying so."""

    def parse_bounded(text):
        value = parse(text)
        if (low is not None and value < low) or (high is not None and value > high):
            limits = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {limits}, not {text}")
        return value

    return parse_bounded


def make_parser(config_class, description, hidden):
    """An argparse parser with a flag per field of config_class (but those in `hidden`). Flags not
    given are absent from the result (SUPPRESS), so that a layer's default is not overwritten."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    for f in fields(config_class):
        if f.name in hidden or "help" not in f.metadata:
            continue
        parse = parse_bool if f.type is bool else str if f.type is list else f.type
        parser.add_argument(
            f"--{f.name}",
            type=bounded(parse, f.metadata["low"], f.metadata["high"]),
            choices=f.metadata["choices"],
            nargs="+" if f.type is list else "?" if f.type is bool else None,
            const=True if f.type is bool else None,  # `--plan` alone means `--plan 1`
            help=f"{f.metadata['help']} (default: {f.default})".replace("%", "%%"),  # argparse formats with %
        )
    return parser


def parse_layered(argv, config_class, layers, description=None, hidden=()):
    """config_class from the command line: its defaults, then each of layers(flags)'s (source,
    values) in turn, then the flags given. cfg.sources names, for every value that differs from the
    field's default, the layer it came from ("flag" for the command line)."""
    parser = make_parser(config_class, description, hidden)
    flags = vars(parser.parse_args(argv))
    values, sources = {}, {}
    for source, layer in [*layers(flags), ("flag", flags)]:
        values.update(layer)
        sources.update({name: source for name in layer})
    cfg = config_class(**values)
    defaults = {f.name: f.default for f in fields(config_class)}
    cfg.sources = {name: sources[name] for name in values if values[name] != defaults[name]}
    return cfg


def preset_layers(presets):
    """The layers of a script whose defaults change with --preset alone (finetune.py, dpo.py, rl.py):
    presets[--preset], the first preset when none is given."""
    default = next(iter(presets))

    def layers(flags):
        preset = flags.get("preset", default)
        return [(f"preset {preset}", presets[preset])]

    return layers
