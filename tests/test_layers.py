"""The package's layers point one way: the algorithm imports neither Ray nor a stage; nothing imports in a loop."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cllm"

# The serving layers below the Serve deployment (`cllm.serving.api`): Ray-free, and below the API layer
# (`protocol`, `api`) free of HTTP and OpenAI errors too.
BELOW_THE_API = (
    "cllm.serving.request", "cllm.serving.scheduler", "cllm.serving.runner", "cllm.serving.engine",
    "cllm.serving.static", "cllm.serving.output", "cllm.serving.bridge", "cllm.serving.config",
)
SERVING = ("cllm.serving", *BELOW_THE_API, "cllm.serving.protocol")
# The Ray-free algorithm: decoding, guesses, losses, batching of records, trajectories, the decoding modes,
# model loading, datasets, configs, and the serving layers above.
DECODING = (
    "cllm.decoding", "cllm.decoding.core", "cllm.decoding.guesses", "cllm.decoding.kv_cache", "cllm.decoding.jacobi",
    "cllm.decoding.multiblock", "cllm.decoding.modes", "cllm.decoding.sampling",
)
ALGORITHM = (
    "cllm.config", "cllm.errors", *DECODING, "cllm.train", "cllm.train.losses", "cllm.train.batches",
    "cllm.models", "cllm.models.loading", "cllm.models.tokenizer", "cllm.models.gguf",
    "cllm.data", "cllm.data.trajectories", "cllm.data.store", "cllm.data.collect_config",
    "cllm.tasks", "cllm.tasks.arith", *SERVING,
)
# The training layer's Ray Train stage; its objectives and batches (`losses`, `batches`) are algorithm.
TRAINING_STAGE = (
    "cllm.train.config", "cllm.train.driver", "cllm.train.loop", "cllm.train.engines", "cllm.train.lora",
    "cllm.train.feed",
)
# Stages run the algorithm, on Ray where they scale out; the pipeline and the CLI drive the stages.
STAGES = (
    "cllm.models.teacher", "cllm.data.collect", *TRAINING_STAGE, "cllm.evaluate", "cllm.serving.api", "cllm.pipeline",
    "cllm.cli",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """cllm modules that `path` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in known:  # `from cllm.train.config import X` -> cllm.train.config
                name = name.rpartition(".")[0]
            if name and name != "cllm":
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    known = set(files)
    return {name: imported_modules(path, known) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_every_module_is_placed_in_a_layer():
    placed = set(ALGORITHM) | set(STAGES)
    graph = import_graph()
    unplaced = {m for m in graph if m != "cllm" and not any(m == p or m.startswith(p + ".") for p in placed)}
    assert not unplaced, f"add these modules to ALGORITHM or STAGES: {sorted(unplaced)}"


def test_the_package_imports_nothing_in_a_loop():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_algorithm_modules_import_no_stage():
    graph = import_graph()
    stage = lambda m: any(m == s or m.startswith(s + ".") for s in STAGES)  # noqa: E731
    wrong = {m: sorted(filter(stage, graph[m])) for m in ALGORITHM if any(map(stage, graph[m]))}
    assert not wrong, f"algorithm modules importing stages: {wrong}"


@pytest.mark.timeout(120)
def test_algorithm_imports_neither_ray_nor_a_stage_in_a_fresh_interpreter():
    code = (
        "import sys\n"
        f"for name in {ALGORITHM!r}: __import__(name)\n"
        f"stages = [m for m in sys.modules if m in {STAGES!r} or m.startswith({tuple(s + '.' for s in STAGES)!r})]\n"
        "ray = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]\n"
        "print('stages', stages); print('ray', ray[:5])\n"
        "sys.exit(1 if stages or ray else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout + done.stderr


def test_serving_layers_below_the_api_know_nothing_of_http():
    """Only the API layer speaks HTTP and OpenAI; the layers below raise domain errors (`RequestError`)."""
    graph = import_graph()
    api = {"cllm.serving.api", "cllm.serving.protocol"}
    wrong = {m: sorted(graph[m] & api) for m in BELOW_THE_API if graph[m] & api}
    assert not wrong, f"serving layers importing the API layer: {wrong}"
    for module in BELOW_THE_API:
        source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
        assert "OpenAIError" not in source and "fastapi" not in source and "starlette" not in source, module


def test_the_decoding_core_never_imports_the_server():
    graph = import_graph()
    core = (*DECODING, "cllm.models.loading")
    wrong = {m: sorted(n for n in graph[m] if n.startswith("cllm.serving")) for m in core}
    assert not any(wrong.values()), wrong


@pytest.mark.timeout(120)
def test_the_pipeline_imports_neither_ray_serve_nor_fastapi():
    """The pipeline reads the server's settings (`cllm.serving.config`) without importing the server."""
    code = (
        "import sys\n"
        "import cllm.pipeline\n"
        "server = ('fastapi', 'starlette', 'ray.serve')\n"
        "loaded = [m for m in sys.modules if m.startswith(server)]\n"
        "print(loaded[:5])\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout + done.stderr


def test_loading_a_model_never_builds_the_builtin_teacher():
    from cllm.models.loading import ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match="resolve it first"):
        load_model("builtin")


def test_each_layer_folder_says_what_it_may_import():
    """A newcomer reads a layer's boundary in its folder's `__init__`."""
    folders = sorted(PACKAGE.glob("*/__init__.py"))
    assert len(folders) >= 6
    for init in folders:
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "may import" in doc, f"{init.relative_to(ROOT)} does not say what its layer may import"
