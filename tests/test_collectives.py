"""Collectives go through cpt.dist only, on the engine's device, once per training step (issue 11, item 1)."""

import ast
from pathlib import Path

import cpt

COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast", "broadcast_object_list",
    "barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "gather_object", "scatter",
    "scatter_object_list", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv", "monitored_barrier",
}
PACKAGE = Path(cpt.__file__).parent


def direct_collectives(path: Path) -> list[str]:
    """Calls like ``torch.distributed.all_reduce(...)`` or ``<alias of torch.distributed>.barrier()``."""
    tree = ast.parse(path.read_text())
    aliases = {"torch.distributed"}
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            hits += [f"{path.name}:{node.lineno}: imports {a.name}" for a in node.names if a.name in COLLECTIVES]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and ast.unparse(node.value) in aliases:
            hits.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return hits


def test_no_module_outside_cpt_dist_calls_collectives():
    hits = [h for f in sorted(PACKAGE.rglob("*.py")) if f != PACKAGE / "dist.py" for h in direct_collectives(f)]
    assert not hits, "collectives must go through cpt.dist:\n" + "\n".join(hits)


def test_the_scan_sees_every_spelling(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch\nimport torch.distributed as d\nfrom torch import distributed\n"
        "from torch.distributed import barrier\ntorch.distributed.all_reduce(x)\nd.broadcast(x, 0)\n"
        "distributed.all_gather(a, b)\ntorch.distributed.get_rank()\n"
    )
    assert len(direct_collectives(bad)) == 4
