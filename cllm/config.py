"""Typed stage configs: defaults in code, overridden by a YAML file, overridden by the command line.

Every stage (collect, train, serve, full pipeline) declares one `StageConfig` subclass. A user writes
`--config run.yaml --block-size 32 --train.lr 1e-4`; a wrong key or a bad value fails at start with
pydantic's message naming the key.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic_settings import BaseSettings, CliSettingsSource, SettingsConfigDict, SettingsError

C = TypeVar("C", bound="StageConfig")


class ConfigError(ValueError):
    """A config file or command-line override that cannot be used."""


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


def load_config(cls: type[C], argv: list[str] | None = None, **overrides: Any) -> C:
    """Build `cls` from `--config FILE` (optional) then the remaining `--key value` arguments.

    `overrides` (keyword arguments) sit between the YAML file and the command line; tests and
    pipelines use them to set values programmatically.
    """
    argv = [] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    values = read_yaml(known.config) if known.config else {}
    values.update(overrides)
    try:
        cli = CliSettingsSource(cls, cli_parse_args=rest, cli_prog_name=cls.__name__)
        return cls(**values, _cli_settings_source=cli(args=rest))
    except SettingsError as err:
        raise ConfigError(f"{cls.__name__}: {err}") from err
