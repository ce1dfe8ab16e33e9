"""Typed stage configs: defaults in code, overridden by a YAML file, overridden by the command line.

Every stage (collect, train, serve, full pipeline) declares one `StageConfig` subclass. A user writes
`--config run.yaml --block-size 32 --train.lr 1e-4`; a wrong key or a bad value fails at start with a
one-line `ConfigError` naming the option. A field's `description` is its one explanation: `--help`
shows it beside the option and its default.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, CliSettingsSource, SettingsConfigDict, SettingsError

from cllm.errors import DEBUG_ENV, DEBUG_FLAG, ConfigError

C = TypeVar("C", bound="StageConfig")


def fill_unset(config, recipe: dict[str, Any]) -> None:
    """Give the fields left None the recipe's values; a value the user set always wins."""
    for key, value in recipe.items():
        if getattr(config, key) is None:
            setattr(config, key, value)


class StageConfig(BaseSettings):
    """Base of every stage config: no environment variables, unknown keys rejected."""

    model_config = SettingsConfigDict(
        extra="forbid",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_avoid_json=True,
        cli_exit_on_error=False,
        validate_default=True,
    )

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        # Only explicit values (YAML + CLI) count: a stray env var must not change a run.
        return (init_settings,)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises a ConfigError instead of printing its usage and exiting, so that a mistake
    reads as one line; `options` (every option the config takes) let it suggest the one meant."""

    def __init__(self, *args, options: Sequence[str] = (), **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)
        self.options = list(options)

    def error(self, message: str):
        raise ConfigError(message + suggestion(message, self.options))


def suggestion(message: str, options: Sequence[str]) -> str:
    """'; did you mean --block-size?' for an unrecognized option close to a real one, else a pointer to --help."""
    if not message.startswith("unrecognized arguments"):
        return ""
    typed = [word.split("=")[0] for word in message.split(":", 1)[1].split() if word.startswith("--")]
    close = [match for word in typed for match in difflib.get_close_matches(word, options, n=1)]
    return f"; did you mean {' or '.join(close)}?" if close else " (--help lists the options)"


def cli_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every option of `model` as typed on the command line (`--train.lr`), with its field; a section (a field
    that is a model itself) gives its fields."""
    for name, field in model.model_fields.items():
        option = prefix + name.replace("_", "-")
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from cli_fields(field.annotation, option + ".")
        else:
            yield "--" + option, field


FACTORY_DEFAULT = re.compile(r"\(default factory: [^)]*\)")


def help_with_defaults(model: type[BaseModel]):
    """An `add_argument` for pydantic-settings that shows a default made by a factory as its value:
    pydantic-settings writes `(default factory: EvalOptions.<lambda>)`, which tells a user nothing."""
    made = {option: field.default_factory() for option, field in cli_fields(model)
            if field.default_factory is not None
            and not getattr(field, "default_factory_takes_validated_data", False)}  # pydantic < 2.10: never

    def add_argument(parser, *names, **kwargs):
        help_text = kwargs.get("help")
        if isinstance(help_text, str) and names and names[0] in made:
            value = str(made[names[0]]).replace("%", "%%")  # argparse formats help with %
            kwargs["help"] = FACTORY_DEFAULT.sub(lambda _: f"(default: {value})", help_text)
        return argparse.ArgumentParser.add_argument(parser, *names, **kwargs)

    return add_argument


def describe_validation(err: ValidationError, options: Sequence[str] = ()) -> str:
    """pydantic's errors in one line, each naming its option as typed (`--train.lr: Input should be greater
    than 0 (got -1)`); pydantic's own text spans several lines per error and links to its docs. `options`
    are the valid ones, for an unknown key (from a config file) to suggest the one meant."""
    parts = []
    for error in err.errors(include_url=False):
        option = "--" + ".".join(str(part).replace("_", "-") for part in error["loc"] if isinstance(part, str))
        message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key" + suggestion(f"unrecognized arguments: {option}", options)
        elif error["type"] != "missing" and not isinstance(error.get("input"), (dict, BaseModel)):
            message += f" (got {error['input']})"
        parts.append(f"{option}: {message}" if option != "--" else message)
    return "; ".join(parts)


def load_config(
    cls: type[C],
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
    parents: Sequence[argparse.ArgumentParser] = (),
    **overrides: Any,
) -> C:
    """Build `cls` from `--config FILE` (optional) then the remaining `--key value` arguments.

    `overrides` (keyword arguments) sit between the YAML file and the command line; tests and
    pipelines use them to set values programmatically. `prog` names the command in the usage line
    (default: the script's file name, as argparse does); `parents` hold options the caller reads
    itself (`add_help=False` parsers), so that `--help` lists them too.
    """
    argv = [] if argv is None else list(argv)
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    values = read_yaml(known.config) if known.config else {}
    values.update(overrides)
    options = [option for option, _ in cli_fields(cls)]
    parser = ArgumentParser(prog=prog, description=inspect.cleandoc(cls.__doc__ or ""), parents=list(parents),
                            options=options, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="a YAML file of these settings; options given here override it")
    parser.add_argument(DEBUG_FLAG, action="store_true", default=argparse.SUPPRESS,
                        help=f"show the traceback of an error (or set {DEBUG_ENV}=1)")
    try:
        cli = CliSettingsSource(cls, root_parser=parser, add_argument_method=help_with_defaults(cls))
        return cls(**values, _cli_settings_source=cli(args=rest))
    except ValidationError as err:
        raise ConfigError(describe_validation(err, options)) from err
    except SettingsError as err:
        raise ConfigError(" ".join(str(err).split())) from err
