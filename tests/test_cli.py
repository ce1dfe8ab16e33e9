"""The entry points as a user runs them: `--help` explains every option and shows its default, and a mistake
gets one line on stderr naming it, exit code 2, and a traceback only with --debug or CLLM_DEBUG=1.

Each command here fails (or prints its help) in its first seconds: before any Ray cluster starts and before
any model is built, so the subprocesses cost their imports only. Those that need no model answer before torch,
transformers or Ray is imported (`test_the_command_line_is_read_without_torch_transformers_or_ray`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cllm.errors import ConfigError, DataError, ModelLoadError, run_main

REPO = Path(__file__).resolve().parents[1]
BENCH = ["-m", "cllm.cli", "bench"]  # what the `cllm` console script runs


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`python ARGS` in the checkout; no CLLM_DEBUG unless `env` sets it, no Ray cluster to join."""
    environ = {key: value for key, value in os.environ.items() if key != "CLLM_DEBUG"}
    environ |= {"RAY_ADDRESS": "", "COLUMNS": "100", **env}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=environ, capture_output=True, text=True,
                          timeout=300)


def option_help(help_text: str) -> dict[str, str]:
    """Option (its first name) -> its help text, from argparse's `--help` output, however it wrapped."""
    entries: dict[str, str] = {}
    current = None
    for line in help_text.split("\n\n", 1)[1].splitlines():  # after the usage block
        if line.startswith("  -"):
            invocation, _, text = line.strip().partition("  ")
            current = invocation.split(",")[0].split()[0]
            entries[current] = text.strip()
        elif current is not None and line.startswith(" " * 6):
            entries[current] = f"{entries[current]} {line.strip()}".strip()
        else:
            current = None
    return entries


HELP_CASES = {
    "full": (["pipelines/full.py"], "full.py", {
        "--train.lr": ("peak learning rate", "(default: None)"),
        "--block-size": ("tokens refined together by one Jacobi pass", "(default: 16)"),
        "--eval.methods": ("decoding methods compared", "(default: ['hf_greedy', 'ar', 'jacobi',"),
    }),
    "collect": (["pipelines/collect.py"], "collect.py", {
        "--actors": ("model replicas", "(default: 2)"),
        "--output": ("directory of Parquet files", "(required)"),
    }),
    "train": (["pipelines/train.py"], "train.py", {
        "--lora-rank": ("LoRA adapter", "(default: 0)"),
        "--data": ("Parquet file", "(required)"),
    }),
    "serve": (["pipelines/serve.py"], "serve.py", {
        "--max-batch-size": ("the most requests running at once", "(default: 32)"),
        "--port": ("port", "(default: 8000)"),
    }),
    "evaluate": (["pipelines/evaluate.py"], "evaluate.py", {
        "--models": ("the models compared", "(default: ['builtin'])"),
        "--limit": ("the first N records", "(default: 100)"),
    }),
    "teacher": (["pipelines/teacher.py"], "teacher.py", {
        "--hidden-size": ("width", "(default: 192)"),
        "--retrain": ("train the recipe again", ""),
    }),
    "cllm bench": (BENCH, "cllm bench", {
        "--methods": ("decoding methods compared", "'multiblock'])"),
        "--dataset": ("builtin:arith", "(default: builtin:arith)"),
    }),
}


@pytest.mark.parametrize("entry", HELP_CASES)
def test_help_describes_every_option_with_its_default(entry):
    args, prog, expected = HELP_CASES[entry]
    done = run(*args, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {prog} [-h] ") and "[--config FILE] [--debug]" in done.stdout
    assert "default factory" not in done.stdout
    options = option_help(done.stdout)
    undescribed = [option for option, text in options.items() if not re.sub(r"\((default: .*|required)\)$", "", text)]
    assert not undescribed, f"options without a description: {undescribed}"
    for option, (description, default) in expected.items():
        assert description in options[option] and default in options[option], options[option]


@pytest.fixture(scope="module")
def promptless(tmp_path_factory) -> Path:
    """A dataset none of whose records holds the prompt field."""
    path = tmp_path_factory.mktemp("data") / "questions.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": "#### 1"}) + "\n" for q in ("1 + 0", "0 + 1")))
    return path


# A mistake -> (its command line, what its one line must name); {tmp} is the test's directory.
ERROR_CASES = {
    "bad value": (["pipelines/full.py", "--train.lr", "-1"], "--train.lr"),
    "unknown key": (["pipelines/full.py", "--no-such-key", "1"], "--no-such-key"),
    "missing config file": (["pipelines/full.py", "--config", "{tmp}/missing.yaml"], "{tmp}/missing.yaml"),
    "missing model": (["pipelines/full.py", "--model", "{tmp}/no/model"], "{tmp}/no/model"),
    "missing dataset": (["pipelines/full.py", "--dataset", "{tmp}/gone.jsonl"], "{tmp}/gone.jsonl"),
    "no prompt in the dataset": (["pipelines/full.py", "--dataset", "{promptless}"], "{promptless}"),
    "collect: missing model": (["pipelines/collect.py", "--model", "{tmp}/no/model", "--output", "{tmp}/o"],
                               "{tmp}/no/model"),
    "train: missing records": (["pipelines/train.py", "--data", "{tmp}/none", "--output-dir", "{tmp}/o"],
                               "{tmp}/none"),
    "serve: missing model": (["pipelines/serve.py", "--model", "{tmp}/no/model"], "{tmp}/no/model"),
    "evaluate: bad value": (["pipelines/evaluate.py", "--limit", "0"], "--limit"),
    "bench: missing model": ([*BENCH, "--models", "{tmp}/no/model"], "{tmp}/no/model"),
    "cllm: unknown command": (["-m", "cllm.cli", "benhc"], "benhc"),
    "teacher: bad value": (["pipelines/teacher.py", "--hidden-size", "1"], "--hidden-size"),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_a_mistake_is_one_line_naming_it_and_exit_code_2(case, tmp_path, promptless):
    def fill(text: str) -> str:
        return text.format(tmp=tmp_path, promptless=promptless)

    args, named = ERROR_CASES[case]
    done = run(*map(fill, args))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert (done.returncode, len(lines)) == (2, 1), done.stderr
    assert lines[0].startswith("error: ") and fill(named) in lines[0], lines[0]
    assert "Traceback" not in done.stderr and "errors.pydantic.dev" not in done.stderr


def test_debug_shows_the_traceback_of_a_mistake(tmp_path):
    done = run("pipelines/full.py", "--train.lr", "-1", "--debug")
    assert done.returncode == 2 and "Traceback" in done.stderr
    assert done.stderr.rstrip().splitlines()[-1] == "error: --train.lr: Input should be greater than 0 (got -1)"
    done = run("pipelines/collect.py", "--config", str(tmp_path / "missing.yaml"), CLLM_DEBUG="1")
    assert done.returncode == 2 and "Traceback" in done.stderr and "ConfigError" in done.stderr


def test_cllm_without_a_command_prints_its_usage():
    done = run("-m", "cllm.cli")
    assert done.returncode == 2 and done.stderr.startswith("usage: cllm ") and "bench" in done.stderr
    done = run("-m", "cllm.cli", "--help")
    assert done.returncode == 0 and "bench" in done.stdout


# Commands answered from the command line alone, or by a cheap check of a path that does not exist.
LIGHT_COMMANDS = [
    ["pipelines/full.py", "--help"], ["pipelines/full.py", "--train.lr", "-1"],
    ["pipelines/full.py", "--no-such-key", "1"], ["pipelines/full.py", "--config", "{tmp}/missing.yaml"],
    ["pipelines/full.py", "--model", "{tmp}/no/model"], ["pipelines/full.py", "--dataset", "{tmp}/gone.jsonl"],
    ["pipelines/collect.py", "--help"], ["pipelines/collect.py", "--actors", "0", "--output", "{tmp}/o"],
    ["pipelines/collect.py", "--model", "{tmp}/no/model", "--output", "{tmp}/o"],
    ["pipelines/collect.py", "--dataset", "{tmp}/gone.jsonl", "--output", "{tmp}/o"],
    ["pipelines/train.py", "--help"], ["pipelines/train.py", "--data", "{tmp}/none", "--output-dir", "{tmp}/o"],
    ["pipelines/serve.py", "--help"], ["pipelines/serve.py", "--model", "{tmp}/no/model"],
    ["pipelines/evaluate.py", "--help"], ["pipelines/evaluate.py", "--limit", "0"],
    ["pipelines/teacher.py", "--help"], ["pipelines/teacher.py", "--hidden-size", "1"],
    ["cllm", "bench", "--help"], ["cllm", "bench", "--models", "{tmp}/no/model"], ["cllm", "benhc"],
]
# Runs each command's main in this one interpreter, as its script or console script would, and reports after
# each which of the heavy packages are imported by then.
LIGHT_RUNNER = """
import contextlib, io, json, runpy, sys
sys.path.insert(0, "pipelines")
from cllm.cli import main as cllm_main
report = []
for command in json.loads(sys.argv[1]):
    sys.argv = command
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            cllm_main(command[1:]) if command[0] == "cllm" else runpy.run_path(command[0], run_name="__main__")
            code = 0
        except SystemExit as exit:
            code = exit.code
    loaded = {name.split(".")[0] for name in sys.modules}
    report.append([command, code, sorted(loaded & {"torch", "transformers", "ray"})])
print(json.dumps(report))
"""


def test_the_command_line_is_read_without_torch_transformers_or_ray(tmp_path):
    """`--help`, a bad value and a missing file or model path are answered with pydantic- and YAML-level imports:
    torch, transformers and Ray cost seconds before a word is printed (more on a busy machine), and the
    tests above run every such command in a subprocess. The first command to import one of them is named."""
    commands = [[arg.format(tmp=tmp_path) for arg in command] for command in LIGHT_COMMANDS]
    done = run("-c", LIGHT_RUNNER, json.dumps(commands))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [command for command, _, _ in report] == commands
    for command, code, heavy in report:
        assert code == (0 if "--help" in command else 2), command
        assert not heavy, f"{' '.join(command)} imported {', '.join(heavy)}"


# ----- run_main itself, in process -----


def test_run_main_reports_a_usage_error_in_one_line(capsys):
    def main(argv):
        assert "--debug" not in argv
        raise DataError("dataset file not found: x.jsonl\n(one line, however the message wrapped)")

    with pytest.raises(SystemExit) as exit_info:
        run_main(main, [])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: dataset file not found: x.jsonl (one line, however the message wrapped)\n"

    with pytest.raises(SystemExit):
        run_main(main, ["--debug"])
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("error: dataset file not found")


def test_run_main_leaves_a_bug_its_traceback():
    def main(argv):
        return {}["missing"]

    with pytest.raises(KeyError):
        run_main(main, [])
    assert run_main(lambda argv: argv, ["--block-size", "4", "--debug"]) == ["--block-size", "4"]


def test_a_usage_error_raised_in_a_ray_task_is_reported_as_raised(capsys):
    """Ray re-raises a task's exception as a RayTaskError that is also of the original class, its message
    holding the remote traceback: the line shows the original message only."""
    from ray.exceptions import RayTaskError

    def main(argv):
        remote = "Traceback (most recent call last):\n  File 'actor.py'\nModelLoadError: no model at /m"
        raise RayTaskError("load", remote, ModelLoadError("no model at /m")).as_instanceof_cause()

    with pytest.raises(SystemExit):
        run_main(main, [])
    assert capsys.readouterr().err == "error: no model at /m\n"


def test_config_errors_name_the_option_as_typed(tmp_path):
    from cllm.config import load_config
    from cllm.pipeline import PipelineConfig

    with pytest.raises(ConfigError, match=r"^--collect\.limit: Input should be greater than or equal to 1 \(got 0\); "
                                          r"--eval\.metric: Input should be"):
        load_config(PipelineConfig, ["--collect.limit", "0", "--eval.metric", "bleu"])
    with pytest.raises(ConfigError, match="did you mean --block-size"):
        load_config(PipelineConfig, ["--block-sizes", "3"])
    config = tmp_path / "run.yaml"
    config.write_text("blocksize: 3\n")
    with pytest.raises(ConfigError, match="^--blocksize: unknown key; did you mean --block-size"):
        load_config(PipelineConfig, ["--config", str(config)])
