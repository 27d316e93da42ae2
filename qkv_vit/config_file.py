"""The --config argument of `python -m qkv_vit.main` and `python -m qkv_vit.plan`: FILE[:ARG] loaded once, as
ml_collections' config_flags would load it, with every way that can fail one ConfigError naming the file, the line
and the problem; the --config.KEY overrides checked against the keys it has before absl applies them."""

import sys
import traceback
import types
from pathlib import Path
from typing import NoReturn

import ml_collections
from absl import flags
from ml_collections import config_flags

from qkv_vit.config_rules import closest_key
from qkv_vit.errors import ConfigError, one_line
from qkv_vit.train.config import renamed_key_message
from qkv_vit.train.run_record import flatten

HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull", "-?")
BAD_INPUT_EXIT_CODE = 2


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flags_parser for a command with --config: FILE[:ARG] loaded once (load), then absl's parsing of the
    other flags with the --config.KEY overrides applied to it (flags.FLAGS.config); a mistake in either is one
    `error:` line (exit code 2)."""
    try:
        argument, argv = split_argv(argv)
        if argument is not None:  # None: only help asked for
            config = load(argument)
            check_override_keys(argv, config)
            config_flags.DEFINE_config_dict("config", config, "Training config, --config=FILE[:ARG].", sys_argv=argv)
        return flags.FLAGS(argv)
    except ConfigError as error:
        fail(str(error))
    except flags.Error as error:  # a malformed value, a missing required flag, an unknown flag
        fail(f"{str(error).rstrip('.')}. See --helpfull for the flags.")


def fail(message: str, exit_code: int = BAD_INPUT_EXIT_CODE) -> NoReturn:
    """Exit with one `error:` line on stderr."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(exit_code)


def split_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """(FILE[:ARG] of the last --config=FILE[:ARG] or --config FILE[:ARG] before any `--`, as absl takes it, the
    other arguments); None for a request for help without one, ConfigError for anything else without one."""
    given, rest, args = [], [], iter(argv)
    for arg in args:
        if arg == "--":
            rest += [arg, *args]
        elif arg == "--config":
            given.append(next(args, ""))
        elif arg.startswith("--config="):
            given.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    if given and given[-1]:
        return given[-1], rest
    if set(rest) & set(HELP_FLAGS):
        return None, rest
    raise ConfigError("--config=FILE is required: give a config file, e.g. --config=configs/quickstart.py[:arguments].")


def load(argument: str) -> ml_collections.ConfigDict:
    """The config that `argument`, FILE[:ARG], gives: get_config(ARG) of FILE executed as a module, as config_flags
    runs it. ConfigError naming the file, the line and the problem for a missing file, a syntax error, an exception
    while it runs or in get_config, no get_config, or a result that is no ConfigDict."""
    path, *config_string = argument.split(":", 1)  # as config_flags splits it

    def bad(problem: str) -> NoReturn:
        raise ConfigError(f"--config={argument}: {problem}")

    try:
        code = compile(Path(path).read_bytes(), path, "exec")
    except OSError as error:
        bad(
            f"cannot read {path} ({error.strerror}). Pass a config file such as configs/quickstart.py, optionally "
            "with :arguments."
        )
    except SyntaxError as error:
        bad(f"{syntax_error_place(error, path)}: {error.msg}; fix the syntax there.")
    module = types.ModuleType("config_config")
    module.__file__ = path
    sys.modules[module.__name__] = module  # as importlib's loader does (dataclasses in a config file look it up)
    try:
        exec(code, module.__dict__)  # noqa: S102 - running the user's config file is what --config asks for
    except Exception as error:  # noqa: BLE001 - whatever the user's code raises is reported, with its place
        bad(failure(error, path))
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        bad(
            f"the file has no get_config function (it defines {public_names(module) or 'nothing'}): add "
            "get_config(arg=None) returning an ml_collections.ConfigDict, as configs/quickstart.py does."
        )
    try:
        config = get_config(*config_string)
    except ConfigError as error:  # get_config's own check of its argument says what to do already
        bad(str(error))
    except Exception as error:  # noqa: BLE001
        bad(failure(error, path))
    if not isinstance(config, ml_collections.ConfigDict):
        bad(
            f"get_config() returned {type(config).__name__}, not an ml_collections.ConfigDict"
            f"{' (a missing return statement?)' if config is None else ''}: make it return the ConfigDict."
        )
    return config


def failure(error: Exception, path: str) -> str:
    """What went wrong running the config file at `path`, and where: a syntax error (in a module it imports), or
    an exception with its place."""
    if isinstance(error, SyntaxError):
        return f"{syntax_error_place(error, path)}: {error.msg}; fix the syntax there."
    return f"{exception_place(error, path)}: {type(error).__name__}: {error} (fix the config file there)"


def syntax_error_place(error: SyntaxError, path: str) -> str:
    """Where a syntax error is: "line N" in the config file, "FILE, line N" in a module it imports."""
    return f"line {error.lineno}" if error.filename == path else f"{error.filename}, line {error.lineno}"


def exception_place(error: BaseException, path: str) -> str:
    """Where an exception came from: "line N" of the config file, and the innermost line if that is elsewhere."""
    frames = traceback.extract_tb(error.__traceback__)
    own = [frame for frame in frames if frame.filename == path]
    if not own:
        return "calling get_config"
    place = f"line {own[-1].lineno}"
    if frames[-1] is not own[-1]:
        place += f" (raised in {frames[-1].filename}, line {frames[-1].lineno})"
    return place


def public_names(module: types.ModuleType) -> str:
    names = [name for name, value in vars(module).items() if callable(value) and not name.startswith("_")]
    return ", ".join(names[:5])


def check_override_keys(argv: list[str], config: ml_collections.ConfigDict) -> None:
    """Each --config.KEY=VALUE (or --[no]config.KEY for a flag) must name a key `config` has: otherwise a ConfigError
    with the closest key, or the new name of a renamed one (before absl applies the overrides)."""
    known = list(flatten(config.to_dict()))  # "optimizer.lr", "data.augment.crop_scale", ...
    for arg in argv:
        if not arg.startswith(("--config.", "--noconfig.")):
            continue
        key = arg.split("=", 1)[0].split("config.", 1)[1]
        renamed = renamed_key_message(f"config.{key}")
        if renamed:
            raise ConfigError(f"{arg}: {renamed}")
        if key not in known:
            close = closest_key(key, known)
            raise ConfigError(
                f"{arg}: the config has no key {key!r}{f' (did you mean {close!r}?)' if close else ''}; check its "
                "spelling against the keys listed in qkv_vit/train/config.py and in a run's config.json (an unknown "
                "key is an error so that a typo is never silently ignored)."
            )
