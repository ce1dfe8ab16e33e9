"""cllm: Consistency Large Language Models: exact Jacobi decoding, consistency finetuning, Ray pipeline."""

__version__ = "0.1.0"
