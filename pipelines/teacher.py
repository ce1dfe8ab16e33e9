"""Build (or find in the cache) the built-in teacher and print its directory and recipe.

    python pipelines/teacher.py                          # the default recipe, cached under $CLLM_HOME
    python pipelines/teacher.py --max-steps 300 --cache-dir /tmp/teachers

Keys are TeacherConfig's (cllm/models/teacher.py). Only the embedded default needs it: with a Hugging Face
model the pipeline starts from that model instead.
"""

from __future__ import annotations

import checkout  # noqa: F401  (cllm importable here and in Ray workers, without installing)

from cllm.errors import run_main
from cllm.models.teacher import main

if __name__ == "__main__":
    run_main(main)
