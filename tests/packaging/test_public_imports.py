"""The public import paths DESIGN.md promises (outside checks call exactly these)."""

from __future__ import annotations

import subprocess
import sys


def test_design_contract_imports():
    from lmms_tokprune.llava import PrefillResult, prune_prefill
    from lmms_tokprune.llava.llm_pruning import PrefillResult as Result
    from lmms_tokprune.llava.llm_pruning import prune_prefill as loop
    from lmms_tokprune.methods import VisionInputs, compress, iqr_outliers, lof_outliers

    assert prune_prefill is loop and PrefillResult is Result
    assert all(callable(f) for f in (compress, iqr_outliers, lof_outliers)) and VisionInputs.__name__ == "VisionInputs"


def test_llava_package_import_stays_light():
    """`import lmms_tokprune.llava.<submodule>` (the plugin's path) does not load the decoder loop; the contract name
    resolves on first use, and an unknown name is an ImportError as usual."""
    code = ("import sys, lmms_tokprune.llava.prompts as p; assert 'lmms_tokprune.llava.llm_pruning' not in sys.modules; "
            "from lmms_tokprune.llava import prune_prefill; assert 'lmms_tokprune.llava.llm_pruning' in sys.modules\n"
            "try:\n    from lmms_tokprune.llava import no_such_name\nexcept ImportError:\n    print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
