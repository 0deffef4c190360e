"""The playbook is data; every call it recommends must exist."""

import importlib
import inspect

import pytest

from seismo.diagnose import KINDS, PLAYBOOK
from seismo.diagnose.playbook import CAUSES, PRIORITY


def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_every_kind_has_ranked_mitigations_a_cause_and_a_priority():
    for kind in KINDS:
        assert PLAYBOOK[kind], kind
        assert kind in CAUSES and kind in PRIORITY


CALLS = sorted({m.call for ms in PLAYBOOK.values() for m in ms if m.call})


@pytest.mark.parametrize("call", CALLS)
def test_each_recommended_call_resolves_to_the_object_it_names(call):
    obj = _resolve(call)
    assert callable(obj), call
    # the object really is what the dotted name says (not a module or an alias of something else)
    assert getattr(obj, "__name__", None) == call.rsplit(".", 1)[1], (call, obj)
    inspect.signature(obj)  # a real function or class with a signature a user can call


def test_the_resolver_refuses_a_name_that_does_not_exist():
    with pytest.raises((ImportError, AttributeError)):
        _resolve("seismo.mitigate.NoSuchTransform")


@pytest.mark.parametrize("kind", sorted(PLAYBOOK))
def test_every_recommendation_cites_a_paper_or_source(kind):
    for m in PLAYBOOK[kind]:
        assert m.paper and m.how, m.name


def test_attention_growth_recommends_qk_layernorm_first():
    first = PLAYBOOK["attention_logit_growth"][0]
    assert first.name == "qk-layernorm" and "2309.14322" in first.paper
    assert PLAYBOOK["output_logit_divergence"][0].name == "z-loss"
    assert PLAYBOOK["softmax_collapse"][0].name == "StableMax"
