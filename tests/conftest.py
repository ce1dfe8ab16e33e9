"""Shared fixtures: tiny randomly initialised causal LMs (built from a config, never downloaded), the
character- and byte-level tokenizers, free ports, and Ray clusters of a test's own, so every test runs
offline in seconds and no test can take another's cluster down."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from cllm.train.config import TrainConfig

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP barriers make
# them 30x slower: one thread keeps the suite fast and its timings stable.
torch.set_num_threads(1)

CHARS = list(string.ascii_letters + string.digits + string.punctuation + " \n") + ["é", "€", "中"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (ids 0-3 are pad, bos, eos, unk) with a small chat template."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


BYTE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (ids 0-3 are pad, bos, eos, unk): every multi-byte character spans tokens."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = BYTE_CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


CHAR_VOCAB = len(SPECIALS) + len(CHARS)
BYTE_VOCAB = len(SPECIALS) + 256


def tiny_config(arch: str, vocab_size: int, context: int = 512, width: int = 64):
    """Tiny configs; a wide init spreads the logits so fp32 argmax has no near-ties to trip on."""
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.3)
    if arch == "llama":
        return LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=context, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=context, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=width, n_layer=2, n_head=4, n_positions=context, **common)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0, *, vocab_size: int = CHAR_VOCAB, context: int = 512,
               width: int = 64):
    """A seeded random tiny causal LM in fp32, in eval mode (the char vocabulary unless told otherwise)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size, context, width))
    return model.float().eval()


def save_model_dir(path: Path, model, tokenizer) -> Path:
    """A model and its tokenizer as a standard Hugging Face directory (what `load_model` reads)."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RayCluster:
    """A Ray head started by `ray start` for one test: its own ports and temp dir, stopped by PID."""

    address: str  # GCS address, for `ray.init(address=...)` and `--ray-address`
    dashboard: str  # job submission address
    temp_dir: Path
    gcs_port: int


def stop_cluster(temp_dir: Path, gcs_port: int) -> None:
    """Stop only this cluster's processes (`ray stop` would stop every Ray on the machine)."""
    markers = (str(temp_dir), f":{gcs_port} ")
    for attempt in range(20):
        ps = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout.splitlines()
        pids = [int(line.split(None, 1)[0]) for line in ps if any(m in line + " " for m in markers)]
        pids = [pid for pid in pids if pid != os.getpid()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if attempt < 5 else signal.SIGKILL)
        time.sleep(1)


@contextlib.contextmanager
def ray_cluster(num_cpus: int = 2, env: dict | None = None) -> Iterator[RayCluster]:
    """`ray start --head` on 127.0.0.1 with free ports; a process killed while connected to it cannot take
    down the pytest process's own Ray."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    # a short temp dir: Ray's Unix socket paths under it must stay below ~107 characters
    dashboard, gcs_port, temp_dir = free_port(), free_port(), Path(tempfile.mkdtemp(prefix="cllm-ray-"))
    ray_bin = str(Path(sys.executable).parent / "ray")
    start = [ray_bin, "start", "--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
             f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield RayCluster(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard}", temp_dir, gcs_port)
    finally:
        stop_cluster(temp_dir, gcs_port)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="session", params=["llama", "qwen2", "gpt2"])
def any_tiny_model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def llama_model():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer saved as a standard Hugging Face model directory."""
    return save_model_dir(tmp_path_factory.mktemp("tiny-llama"), tiny_model("llama"), char_tokenizer())


@pytest.fixture(scope="module")
def local_ray():
    """A fresh two-CPU local Ray for one test module; yields its GCS address for `ray.init(address=...)`."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def byte_llama_dir(tmp_path_factory, context: int) -> Path:
    """A saved tiny Llama over the byte-level tokenizer: what the server tests deploy."""
    model = tiny_model("llama", vocab_size=BYTE_VOCAB, context=context)
    return save_model_dir(tmp_path_factory.mktemp("tiny-byte-llama"), model, byte_level_tokenizer())


def greedy_text(loaded, text: str, max_tokens: int) -> str:
    """The reference: `generate(do_sample=False)` on the same model, decoded like the server decodes."""
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_tokens)
    return loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def sampled_tokens(loaded, text: str, max_tokens: int, **settings) -> list[int]:
    """The reference for a sampled answer: in-process `ar_generate` with the same settings, cut at its EOS."""
    from cllm.decoding.core import special_tokens
    from cllm.decoding.jacobi import ar_generate
    from cllm.decoding.sampling import SamplingParams

    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    eos = list(special_tokens(loaded.tokenizer, loaded.model.generation_config).eos_ids)
    out = ar_generate(loaded.model, ids, max_new_tokens=max_tokens, eos_token_id=eos,
                      sampling=SamplingParams(**settings))
    return out.sequences[0, ids.shape[1] : ids.shape[1] + out.new_tokens[0]].tolist()


def sampled_text(loaded, text: str, max_tokens: int, **settings) -> str:
    return loaded.tokenizer.decode(sampled_tokens(loaded, text, max_tokens, **settings), skip_special_tokens=True)


BYTE_MERGES = [("t", "h"), ("h", "e")]  # a GGUF of type gpt2 lists its merges; two are enough to be used


def write_llama_gguf(path: Path, model, tokens: list[str], merges: list[tuple[str, str]]) -> Path:
    """A Llama and a byte-level BPE vocabulary written as a GGUF file (F32 tensors, llama.cpp's names and
    its q/k row order), the way a user's downloaded file is laid out."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in GGUF_SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([f"{a} {b}" for a, b in merges])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_unk_token_id(3)
    writer.add_chat_template(BYTE_CHAT_TEMPLATE)

    def permute(weight: torch.Tensor, heads: int) -> torch.Tensor:  # llama.cpp's rotary layout of q and k rows
        return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
            weight.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for layer in range(config.num_hidden_layers):
        for hf, ours in parts.items():
            names[f"model.layers.{layer}.{hf}.weight"] = f"blk.{layer}.{ours}.weight"
    state = model.state_dict()
    for hf, ours in names.items():
        weight = state[hf].detach().float()
        if ours.endswith("attn_q.weight"):
            weight = permute(weight, config.num_attention_heads)
        elif ours.endswith("attn_k.weight"):
            weight = permute(weight, config.num_key_value_heads)
        writer.add_tensor(ours, weight.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


GGUF_SPECIALS = ["<pad>", "<s>", "</s>", "<|endoftext|>"]  # the last is the unknown token, GPT-2's spelling


def byte_bpe_tokens() -> list[str]:
    """A byte-level vocabulary as a GGUF file spells it: specials, the byte alphabet, the merged tokens."""
    return GGUF_SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["".join(pair) for pair in BYTE_MERGES]


# ----- training: trajectory records, a run's config and its checkpoints -----


def write_trajectories(path: Path, n_prompts: int = 8, block: int = 4, seed: int = 0) -> Path:
    """Trajectory records shaped like collection's: per block, states converging to the fixed point."""
    rng = random.Random(seed)
    rows = []
    for prompt_id in range(n_prompts):
        prompt = [1] + [rng.randrange(4, 44) for _ in range(rng.randrange(3, 8))]
        prefix = list(prompt)
        for block_idx in range(2):
            fixed = [rng.randrange(4, 44) for _ in range(block)]
            if block_idx == 1:
                fixed = fixed[:2] + [2]  # the last block ends with EOS
            states = [[rng.randrange(4, 44) for _ in range(block)]]
            for k in range(1, rng.randrange(1, len(fixed))):
                states.append(fixed[:k] + states[-1][k:])
            rows.append(
                {
                    "prompt_id": prompt_id,
                    "block_idx": block_idx,
                    "prompt_len": len(prompt),
                    "prefix_ids": list(prefix),
                    "states": [s[: len(fixed)] for s in states] if prompt_id % 4 else [],
                    "fixed_point": fixed,
                    "num_iters": len(states) + 1,
                    "eos_in_block": 2 in fixed,
                    "labels": fixed if prompt_id % 2 else None,
                }
            )
            prefix += fixed
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def config_for(tmp_path: Path, model: Path, data: Path, **overrides) -> TrainConfig:
    values = dict(
        model=str(model),
        data=str(data),
        output_dir=str(tmp_path / "out"),
        storage_path=str(tmp_path / "ray_train"),
        batch_size=4,
        lr=1e-3,
        checkpoint_every=1,
        log_every=1,
    )
    return TrainConfig(**(values | overrides))


def checkpoints(config: TrainConfig) -> list[Path]:
    return sorted(p for p in Path(config.storage_path, config.run_name).glob("checkpoint_*") if p.is_dir())


# --- the served model and its cluster: the HTTP tests' shared fixtures ------------------------------------

# The Ray actor name of a Serve replica of the app `{app}` (the HTTP tests kill and count replicas by it).
REPLICA_PREFIX = "SERVE_REPLICA::{app}#JacobiServer#"


def wait_for(condition, timeout: float, every: float = 0.5) -> float | None:
    """Seconds until `condition()` held, or None after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(every)
    return None


SERVED_CONTEXT = 160  # the served tiny model's context: requests near it probe the server's context checks
SERVED_NAME = "tiny-bytes"


@pytest.fixture(scope="module")
def served_dir(tmp_path_factory):
    """The tiny byte-level Llama the server tests deploy, as a model directory."""
    return byte_llama_dir(tmp_path_factory, SERVED_CONTEXT)


@pytest.fixture(scope="module")
def served(served_dir):
    """The same model loaded here: the reference every answer is checked against."""
    from cllm.models.loading import load_model

    return load_model(str(served_dir), device="cpu")


@pytest.fixture(scope="module")
def serve_cluster():
    """A fresh local Ray with Serve on a free loopback port for one test module; yields the base URL."""
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


# --- the serving engines without Ray or HTTP ---------------------------------------------------------------


def engine_config(**fields):
    """A ServeConfig for an engine: the server's defaults, these fields (the engines declare none of their own)."""
    from cllm.serving.config import ServeConfig

    return ServeConfig(model="unused", **fields)


def new_request(tokenizer, text: str, max_tokens: int, stop=(), sampling=None):
    from cllm.serving.request import Request

    return Request(prompt_ids=tokenizer(text)["input_ids"], max_tokens=max_tokens, stop=tuple(stop),
                   sampling=sampling)


def eos_ids(loaded) -> list[int]:
    configured = loaded.model.generation_config.eos_token_id
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return sorted({loaded.tokenizer.eos_token_id, *configured})


@torch.inference_mode()
def greedy_alone(loaded, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """The reference: `generate(do_sample=False)` of the prompt alone, cut after its first EOS."""
    ids = torch.tensor([prompt_ids])
    eos = eos_ids(loaded)
    out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_tokens,
                                eos_token_id=eos, pad_token_id=0)[0, ids.shape[1] :].tolist()
    for i, token in enumerate(out):
        if token in eos:
            return out[: i + 1]
    return out


class Served:
    """Requests through an engine and the output processor, stepped here (what the engine thread does): the
    text each request was sent, piece by piece, the requests in the order they ended, and every step's stats."""

    def __init__(self, engine, tokenizer):
        from cllm.serving.bridge import EngineLoop
        from cllm.serving.output import OutputProcessor

        self.engine = engine
        self.loop = EngineLoop(engine, OutputProcessor(tokenizer))
        self.deltas: dict[str, list[str]] = {}
        self.ended: list = []
        self.stats: list = []

    def step(self):
        stats, texts = self.loop.step()
        self.stats.append(stats)
        for output in texts:
            if output.text:
                self.deltas.setdefault(output.request.request_id, []).append(output.text)
            if output.finished:
                self.ended.append(output.request)
        return stats

    def run_until_idle(self) -> None:
        while self.engine.has_work():
            self.step()

    def text(self, request) -> str:
        return "".join(self.deltas.get(request.request_id, []))


# ----- decoder-only families: one tiny model per config class, and left-padded prompts -----

VOCAB = 160
WINDOW = 8
BLOCK = 16
MAX_NEW = 48
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
# untied: a tiny Gemma with tied, sqrt(hidden)-scaled embeddings repeats one token forever
GEMMA = dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW, tie_word_embeddings=False,
             layer_types=["sliding_attention", "full_attention"])
MIXED = dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
MOE = dict(num_local_experts=4, num_experts_per_tok=2)

# family -> (config class, config arguments); SIZES apply unless the class names sizes its own way
FAMILIES = {
    "llama": ("LlamaConfig", SIZES),
    "mistral": ("MistralConfig", dict(SIZES, sliding_window=WINDOW)),
    "mixtral": ("MixtralConfig", dict(SIZES, sliding_window=WINDOW, **MOE)),
    "qwen2": ("Qwen2Config", SIZES),
    "qwen2-sliding": ("Qwen2Config", dict(SIZES, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(SIZES, head_dim=8)),
    "qwen3-moe": ("Qwen3MoeConfig", dict(SIZES, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=32, use_sliding_window=True, sliding_window=WINDOW)),
    "gemma2": ("Gemma2Config", dict(SIZES, **GEMMA)),
    "gemma3": ("Gemma3TextConfig", dict(SIZES, **GEMMA)),
    "phi3": ("Phi3Config", dict(SIZES, sliding_window=WINDOW)),
    "olmo2": ("Olmo2Config", SIZES),
    "granite": ("GraniteConfig", SIZES),
    "smollm3": ("SmolLM3Config", dict(SIZES, no_rope_layers=[1, 0])),
    "ministral": ("MinistralConfig", dict(SIZES, head_dim=8, sliding_window=WINDOW)),
    "cohere2": ("Cohere2Config", dict(SIZES, **MIXED)),
    "olmo3": ("Olmo3Config", dict(SIZES, **MIXED)),
    "gpt-oss": ("GptOssConfig", dict(SIZES, head_dim=8, num_local_experts=4, num_experts_per_tok=2, **MIXED)),
    "gpt-neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       max_position_embeddings=256)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=32, max_position_embeddings=256)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=256)),
}


def tiny_family_model(config_class: str, arguments: dict, seed: int = 0, vocab_size: int = VOCAB):
    """A tiny fp32 model of the family; a wide init spreads the logits, so argmax has no near-ties."""
    config_type = getattr(transformers, config_class, None)
    if config_type is None:
        pytest.skip(f"{config_class} is not in the installed transformers {transformers.__version__}")
    config = config_type(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.3,
                         **arguments)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float().eval()


def left_padded_prompts(lengths=(11, 6), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length:] = torch.randint(3, VOCAB, (length,), generator=generator)
        mask[row, width - length:] = 1
    return input_ids, mask
