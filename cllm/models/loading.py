"""Load a Hugging Face causal LM and its tokenizer, on the right device and dtype.

Loading never builds anything: `"builtin"` names the project's own teacher, which only the entry points
and the pipeline's teacher stage turn into a directory (`cllm.models.teacher.resolve_model`); every stage then
loads it through the same `from_pretrained` path as a hub model.

torch and transformers are imported by the functions that load: the stage configs and the entry points use the
names and path checks here (`BUILTIN_MODEL`, `check_model_path`) while reading a command line, which must not
cost those imports, and a model path that does not exist is refused before transformers is imported.
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cllm.errors import ModelLoadError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

BUILTIN_MODEL = "builtin"
CACHE_ENV = "CLLM_HOME"  # where models the project builds (the teacher, converted GGUF files) are cached
TEACHER_METADATA = "teacher.json"  # what marks a directory as the built-in teacher (its recipe and score)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int | None:
        return context_length(self.model)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cllm")


def pick_device(device: str | None = None) -> torch.device:
    import torch

    if device not in (None, "auto"):
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    """bf16 on GPUs that support it, fp32 elsewhere (fp32 is what makes CPU decoding exact)."""
    import torch

    if dtype not in (None, "auto"):
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16") from None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def is_missing_path(name_or_path: str) -> bool:
    """True for a reference that is written as a local path (not a hub name) and does not exist."""
    if Path(name_or_path).expanduser().exists():
        return False
    return name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1


def check_model_path(name_or_path: str) -> None:
    """Refuse a model written as a local path that does not exist: cheap, so entry points call it before any work."""
    if is_missing_path(name_or_path):
        raise ModelLoadError(f"cannot load a model from {name_or_path!r}: the model path does not exist (a model is "
                             "a Hugging Face directory or hub name, a GGUF file, or builtin)")


def absolute_if_local(name_or_path: str) -> str:
    """An existing local path made absolute (Ray's workers run in other directories); a hub name as it is."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def is_builtin_teacher(model_dir: str | Path) -> bool:
    return (Path(model_dir) / TEACHER_METADATA).is_file()


def recipe_kind(model: str) -> str:
    """Which recipe a model takes: "builtin" for the project's teacher (by name, or a directory holding its
    teacher.json), "model" for any other."""
    return "builtin" if model == BUILTIN_MODEL or is_builtin_teacher(model) else "model"


def causal_lm_config(name_or_path: str):
    """The model's config, checked to be a causal LM: a bad model fails in the driver, not in every worker."""
    if name_or_path == BUILTIN_MODEL:
        raise ModelLoadError(
            f"{BUILTIN_MODEL!r} names the project's built-in teacher, which is not built yet at this point: "
            "resolve it first with cllm.models.teacher.resolve_model (the entry points do)"
        )
    check_model_path(name_or_path)
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load a model config from {name_or_path!r}: {err}") from err
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(f"{name_or_path!r} is a {config.model_type!r} model, not a causal language model")
    return config


def context_length(model: PreTrainedModel) -> int | None:
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@functools.cache
def forward_takes(model_class: type, keyword: str) -> bool:
    """Whether the model class's forward() has the keyword (checked once per class)."""
    return keyword in inspect.signature(model_class.forward).parameters


def cache_keyword(model_class: type) -> str:
    """The forward() keyword that takes a KV cache: transformers 5.24 renamed `past_key_values` to
    `cache` (the old name warns, and goes in 5.40); older releases and some models know only the old."""
    return "cache" if forward_takes(model_class, "cache") else "past_key_values"


def load_tokenizer(name_or_path: str):
    """Tokenizer with a pad token and left padding (what batched decoding needs)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load a tokenizer from {name_or_path!r}: {err}") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "left"
    return tokenizer


def quantization_config(quantize: str, compute_dtype: torch.dtype):
    """bitsandbytes settings for a QLoRA base: NF4 with double quantization (the QLoRA paper's), or int8."""
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError("quantize needs bitsandbytes: pip install bitsandbytes") from None
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_model(name_or_path: str, *, device: str | None = None, dtype: str | None = None,
               quantize: str = "none") -> LoadedModel:
    """Load a causal LM and its tokenizer from a local directory or a hub name, ready for inference.

    `quantize` ("4bit", "8bit") loads the linear layers quantized by bitsandbytes (a QLoRA base); `dtype`
    is then the dtype everything else keeps and the quantized layers compute in.
    """
    from transformers import AutoModelForCausalLM

    path = name_or_path
    causal_lm_config(path)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(torch_device, dtype)
    # On a GPU the weights go straight to it: no full copy of the model in host memory on the way.
    placement = {"device_map": {"": torch_device}} if torch_device.type == "cuda" or quantize != "none" else {}
    if quantize != "none":
        placement["quantization_config"] = quantization_config(quantize, torch_dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **placement)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load model weights from {name_or_path!r}: {err}") from err
    tokenizer = load_tokenizer(path)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if quantize == "none":
        model.to(torch_device)  # bitsandbytes models are placed by device_map and refuse .to()
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name_or_path)


def format_prompt(tokenizer, prompt: str | list[dict], *, chat: bool = False) -> str:
    """Turn a prompt (text or chat messages) into the text the model reads."""
    if isinstance(prompt, list) or chat:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("this model's tokenizer has no chat template; send a plain completion prompt")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt


def encode_prompts(
    tokenizer, prompts: list[str], *, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded `input_ids` and `attention_mask` for a batch of prompt texts."""
    if not prompts:
        raise ValueError("no prompts to encode")
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    if batch["input_ids"].shape[1] == 0 or (batch["attention_mask"].sum(dim=1) == 0).any():
        raise ValueError("empty prompt: every prompt needs at least one token")
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)
