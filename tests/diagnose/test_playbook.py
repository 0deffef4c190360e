"""The playbook is data; every call it recommends must exist."""

import importlib

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


@pytest.mark.parametrize("kind", sorted(PLAYBOOK))
def test_recommended_calls_exist(kind):
    for m in PLAYBOOK[kind]:
        assert m.paper, m.name
        if m.call:
            assert callable(_resolve(m.call)) or isinstance(_resolve(m.call), type), m.call


def test_attention_growth_recommends_qk_layernorm_first():
    first = PLAYBOOK["attention_logit_growth"][0]
    assert first.name == "qk-layernorm" and "2309.14322" in first.paper
    assert PLAYBOOK["output_logit_divergence"][0].name == "z-loss"
    assert PLAYBOOK["softmax_collapse"][0].name == "StableMax"
