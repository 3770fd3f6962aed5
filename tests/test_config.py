"""Config apart from runtime: the schema and `cpt validate` import no torch, transformers or deepspeed
(issue 11, item 12)."""

import json
import subprocess
import sys
from pathlib import Path

import cpt

HEAVY = ("torch", "transformers", "deepspeed", "lm_eval", "datasets", "tokenizers", "scipy")
RECIPES = Path(__file__).parent.parent / "recipes"


def _imported_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter has imported after running ``code``."""
    probe = f"import sys, json\n{code}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_every_config_module_imports_no_runtime():
    modules = sorted(p.stem for p in (Path(cpt.__file__).parent / "config").glob("*.py") if p.stem != "__init__")
    assert {"recipe", "load", "checks", "schema", "training", "schedule", "data", "evaluation", "mixture"} <= set(modules)
    assert _imported_after("\n".join(f"import cpt.config.{m}" for m in modules)) == []


def test_cpt_validate_imports_no_runtime():
    code = (
        "import contextlib, io\nfrom cpt.cli import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()):\n    assert main(['validate', {str(RECIPES / 'quickstart.yaml')!r}]) == 0"
    )
    assert _imported_after(code) == []
