"""The capture's single walk of a model (``_tree``) yields what torch's own walks yield."""

from __future__ import annotations

import torch
from torch import nn

from dptrain.grad_sample.capture import _tree


def _model() -> nn.Module:
    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    m = nn.Sequential(nn.Embedding(5, 3), shared, nn.Sequential(shared, nn.LayerNorm(3)))
    m.add_module("head", nn.Linear(3, 5, bias=False))
    m.head.weight = m[0].weight  # tied: one parameter under two names
    m.register_buffer("scale", torch.ones(3))
    m[2].register_buffer("none", None)  # a None buffer is skipped by torch's walk
    m[2][1].register_buffer("count", torch.zeros(()), persistent=False)
    m.aliased = m.scale  # the same tensor as a plain attribute: not a buffer
    return m


def test_tree_matches_torch_walks() -> None:
    m = _model()
    t = _tree(m)
    assert [id(x) for x in t.modules] == [id(x) for x in m.modules()]
    assert [(n, id(p)) for n, p in t.params] == [(n, id(p)) for n, p in m.named_parameters()]
    assert [(n, id(b)) for n, b in t.buffers] == [(n, id(b)) for n, b in m.named_buffers()]
    assert len(t.params) == 5 and len(t.buffers) == 2  # the tied and shared ones once


class _Renamed(nn.Module):
    """A model whose class overrides a walk: the capture must ask it, not read the dicts."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def named_parameters(self, *args, **kwargs):  # type: ignore[override]
        for n, p in super().named_parameters(*args, **kwargs):
            yield "renamed." + n, p


def test_tree_asks_an_overriding_class() -> None:
    m = _Renamed()
    assert [n for n, _ in _tree(m).params] == ["renamed.lin.weight", "renamed.lin.bias"]


class _Hidden(nn.Module):
    """A submodule whose class overrides ``named_modules`` (hides its children): torch's walks
    recurse through it, so the capture's own loop must hand the walk back to it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(2, 2)

    def named_modules(self, memo=None, prefix="", remove_duplicate=True):  # type: ignore[override]
        yield prefix, self


def test_tree_asks_a_submodule_that_overrides_named_modules() -> None:
    m = nn.Sequential(nn.Linear(2, 2), _Hidden())
    t = _tree(m)
    assert [id(x) for x in t.modules] == [id(x) for x in m.modules()]
    assert [(n, id(p)) for n, p in t.params] == [(n, id(p)) for n, p in m.named_parameters()]
    assert len(t.params) == 2  # the hidden Linear's parameters are not walked by torch either


def test_tree_of_a_lora_model_matches_torch_walks() -> None:
    from peft import LoraConfig, get_peft_model

    from tests.engine.builders import CAUSAL_LMS, build_hf

    cls, over = CAUSAL_LMS["llama"]
    m = get_peft_model(build_hf(cls, over), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    m.base_model.model.model.layers[1].self_attn.q_proj = m.base_model.model.model.layers[
        0
    ].self_attn.q_proj  # shared
    t = _tree(m)
    assert [id(x) for x in t.modules] == [id(x) for x in m.modules()]
    assert [(n, id(p)) for n, p in t.params] == [(n, id(p)) for n, p in m.named_parameters()]
    assert [(n, id(b)) for n, b in t.buffers] == [(n, id(b)) for n, b in m.named_buffers()]


def test_a_class_patched_after_a_walk_is_asked_at_the_next() -> None:
    """Nothing about a module class is remembered between walks: a class whose
    ``named_modules`` is patched after a first walk (a library's wrapper installed later) is
    asked from the next walk on."""

    class Late(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(2, 2)

    m = nn.Sequential(nn.Linear(2, 2), Late())
    assert len(_tree(m).params) == 4
    Late.named_modules = _Hidden.named_modules  # hides its inner Linear from torch's walks
    t = _tree(m)
    assert [id(x) for x in t.modules] == [id(x) for x in m.modules()]
    assert len(t.params) == 2 == len(list(m.named_parameters()))
