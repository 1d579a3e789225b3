"""A static guard beside tests/engine/test_default_device.py: every tensor factory call in
dptrain/, attacks/ and accountants/ names its device, or sits in a function listed below as a deliberate CPU site.

The default-device test runs steps under ``torch.device("meta")``; code under
``torch._C.DisableTorchFunction()`` (the probe fingerprints of
``grad_sample.plan.sample_prints``, ``grad_sample.watch.fingerprint``) bypasses that mode, and
paths it does not run (user-level segments, the HF collator, federated adapters) are not seen
at all.  Here the source is read with ``ast``: a call ``torch.zeros(...)`` (and the other
factories below) without ``device=`` makes its tensor on torch's default device, which need
not be the model's.  ``*_like`` and ``x.new_*`` are not listed: they take their input's device.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = [ROOT / "dptrain", ROOT / "attacks", ROOT / "accountants"]

FACTORIES = frozenset(
    {
        "arange",
        "as_tensor",
        "empty",
        "eye",
        "full",
        "linspace",
        "ones",
        "rand",
        "randint",
        "randn",
        "randperm",
        "tensor",
        "zeros",
    }
)

# file:function (the enclosing class and function names) -> why the default device is meant
ALLOWED = {
    "dptrain/data/lm.py:LMExamples.batch": "CPU-side token batches; the engine moves each "
    "batch to the model's device",
    "dptrain/data/lm.py:tokenize": "tokenized data, kept on the CPU until a batch is drawn",
    "dptrain/tasks/examples.py:TaskExamples.batch": "CPU-side token batches, as LMExamples.batch",
    "dptrain/tasks/examples.py:pad_rows": "tokenized data, kept on the CPU",
    "dptrain/tasks/classification.py:encode_classification": "CPU-side class labels of the "
    "tokenized data",
    "dptrain/tasks/generation.py:generate": "prompts padded on the CPU, then moved with "
    ".to(device) to the model's device",
    "dptrain/user_level.py:PersonSampler.sample": "CPU-side counts: record indices and segment "
    "ids of the keyed sampler (as its torch.from_numpy results)",
    "dptrain/engine.py:PrivacyEngine._person_chunks": "segment ids: as_tensor keeps a "
    "tensor's device; the sampler's are CPU-side",
    "dptrain/integrations/hf/data.py:PadCollator.__call__": "rows as the dataset gives them "
    "(as_tensor keeps a tensor's device); the HF Trainer moves batches",
    "attacks/planted.py:FixedBatches.sample": "CPU-side sample indices of the planted-bug "
    "benchmark's fixed batches",
    "attacks/planted.py:run_one": "the planted-bug benchmark's data, made beside its CPU model",
}


def _torch_names(tree: ast.Module) -> tuple[set[str], dict[str, str]]:
    """Names bound to the torch module, and factory names imported from it (alias -> name)."""
    modules, direct = {"torch"}, {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname for a in node.names if a.name == "torch" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            direct |= {a.asname or a.name: a.name for a in node.names if a.name in FACTORIES}
    return modules, direct


def findings(path: Path, root: Path = ROOT) -> list[tuple[int, str, str]]:
    """``(line, site, factory)`` of each factory call in ``path`` without ``device=``;
    ``site`` is ``file:Class.function`` (``<module>`` at top level), the file relative to
    ``root``."""
    tree = ast.parse(path.read_text(), str(path))
    modules, direct = _torch_names(tree)
    rel = path.relative_to(root).as_posix()
    out: list[tuple[int, str, str]] = []

    def visit(node: ast.AST, scope: tuple[str, ...]) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = (*scope, child.name)
            if isinstance(child, ast.Call):
                f = child.func
                name = None
                if (
                    isinstance(f, ast.Attribute)
                    and isinstance(f.value, ast.Name)
                    and f.value.id in modules
                    and f.attr in FACTORIES
                ):
                    name = f.attr
                elif isinstance(f, ast.Name) and f.id in direct:
                    name = direct[f.id]
                if name is not None and not any(k.arg == "device" for k in child.keywords):
                    out.append((child.lineno, f"{rel}:{'.'.join(scope) or '<module>'}", name))
            visit(child, inner)

    visit(tree, ())
    return out


def test_every_tensor_factory_names_its_device_or_is_a_listed_cpu_site():
    found = [(p, *f) for pkg in PACKAGES for p in sorted(pkg.rglob("*.py")) for f in findings(p)]
    bad = [
        f"{site.split(':')[0]}:{line}: torch.{name}(...) in {site.split(':')[1]} has no "
        f"device=. Fix: pass the input's device (device=x.device for the tensor it meets, "
        f"e.g. the batch or a parameter), or, for a deliberate CPU site, add '{site}' to "
        "ALLOWED in tests/engine/test_factory_devices.py with a one-line reason"
        for _, line, site, name in found
        if site not in ALLOWED
    ]
    assert not bad, "tensor factories on the default device:\n" + "\n".join(bad)
    # the allow-list names only sites that exist (a renamed function leaves no stale entry)
    sites = {site for _, _, site, _ in found}
    stale = sorted(set(ALLOWED) - sites)
    assert not stale, f"ALLOWED entries with no factory call left: {stale}; remove them"
    assert all(reason.strip() for reason in ALLOWED.values())


def test_the_guard_sees_factories_without_a_device(tmp_path):
    """The scanner flags what it should: plain, aliased and imported factories without
    ``device=``, inside classes and functions; not those with it, nor ``*_like``."""
    src = tmp_path / "dptrain" / "probe.py"
    src.parent.mkdir()
    src.write_text(
        "import torch\nimport torch as th\nfrom torch import zeros as z\n\n"
        "class A:\n    def f(self, x):\n"
        "        a = torch.zeros(3)\n"
        "        b = th.arange(4, device=x.device)\n"
        "        c = z(2)\n"
        "        d = torch.zeros_like(x)\n"
        "        return torch.tensor([1], dtype=torch.long)\n"
    )
    got = findings(src, tmp_path)
    site = "dptrain/probe.py:A.f"
    assert got == [(7, site, "zeros"), (9, site, "zeros"), (11, site, "tensor")]
