"""
Settings for train.py and sample.py, from three places, later ones winning:
  1. the defaults: dataclass fields, each with a trailing comment that is its help text;
  2. a config file: a Python file whose top-level assignments set keys (config/*.py);
  3. the command line: --key=value (or --key value), parsed as a Python literal when it is one.

Usage: python train.py [config/file.py ...] [--key=value ...]; --help lists every key.
An unknown key or a value of the wrong type is a UserError naming the key.
"""
import ast
import difflib
import inspect
import io
import os
import tokenize
from dataclasses import MISSING, fields

from common import UserError


def field_help(cls):
    """The trailing comment of each field in the dataclass's source: {name: help}."""
    helps = {}
    source = inspect.getsource(cls)
    line_names = {}
    for i, line in enumerate(source.splitlines(), start=1):
        stripped = line.strip()
        if ":" in stripped and not stripped.startswith(("#", "def ", "@", "class ", "return")):
            line_names[i] = stripped.split(":", 1)[0].strip()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.start[0] in line_names:
            helps.setdefault(line_names[tok.start[0]], tok.string.lstrip("#").strip())
    return helps


def defaults_of(*classes):
    """{key: (default, type, help)} over the fields of the given dataclasses."""
    out = {}
    for cls in classes:
        helps = field_help(cls)
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()
            typ = f.type if isinstance(f.type, type) else type(default)
            out[f.name] = (default, typ, helps.get(f.name, ""))
    return out


def check_value(key, value, typ):
    """The value converted to the key's type, or a UserError."""
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e3 is a whole number, written short
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        return value if isinstance(value, str) else str(value)
    else:
        return value
    raise UserError(f"{key} must be {typ.__name__}, got {value!r} ({type(value).__name__})")


def unknown_key(key, known):
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else "; see --help for the list"
    return UserError(f"unknown config key {key!r}{hint}")


def read_config_file(path, known=()):
    """The keys a config file assigns: its top-level names that are plain values. known: the keys a
    setting could be, to say so when path looks like one written without its dashes."""
    if not os.path.isfile(path):
        key = path.partition("=")[0]
        hint = f"; to set {key}, write --{path}" if "=" in path and key in known else ""
        raise UserError(f"config file {path} not found{hint}")
    namespace = {}
    try:
        with open(path, encoding="utf-8") as f:
            exec(compile(f.read(), path, "exec"), namespace)
    except Exception as e:
        raise UserError(f"config file {path} failed: {type(e).__name__}: {e}") from None
    plain = (bool, int, float, str, type(None))
    return {k: v for k, v in namespace.items() if not k.startswith("_") and isinstance(v, plain)}


def parse_literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string


def format_help(prog, description, defaults):
    lines = [f"usage: python {prog} [config/file.py ...] [--key=value ...]", "", description, "", "keys:"]
    width = max(len(k) for k in defaults) + 2
    for key, (default, typ, help_text) in defaults.items():
        lines.append(f"  --{key:<{width}}{help_text} (default: {default!r})")
    return "\n".join(lines)


def parse_args(argv, classes, prog, description):
    """Merge defaults <- config files <- --key=value overrides. Returns ({key: value}, set of keys
    set by a file or the command line). Prints help and exits on -h/--help."""
    defaults = defaults_of(*classes)
    config = {k: d for k, (d, _, _) in defaults.items()}
    explicit = set()

    def set_key(key, value):
        if key not in defaults:
            raise unknown_key(key, list(defaults))
        config[key] = check_value(key, value, defaults[key][1])
        explicit.add(key)

    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            print(format_help(prog, description, defaults))
            raise SystemExit(0)
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:  # --key value, or a bare --flag for a boolean key
                has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
                if key in defaults and defaults[key][1] is bool and not has_value:
                    text = "True"
                elif has_value:
                    i, text = i + 1, args[i + 1]
                else:
                    raise UserError(f"--{key} needs a value: --{key}=VALUE")
            value = parse_literal(text)
            if key in defaults and defaults[key][1] is str:
                value = text  # keep strings as typed, e.g. --init_from=0123
            set_key(key, value)
        else:
            for key, value in read_config_file(arg, defaults).items():
                set_key(key, value)
        i += 1
    return config, explicit
