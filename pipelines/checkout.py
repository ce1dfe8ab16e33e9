"""Makes `cllm` importable when an entry point runs from a source checkout that was never pip-installed.

Importing this puts the checkout first on `sys.path` and on `PYTHONPATH`; a local Ray cluster started
by this process hands that environment to its workers, so actors and train workers import the same
code. (Under `ray job submit --working-dir .` Ray ships the checkout itself.)
"""

import os
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
