from __future__ import annotations

import json

import pytest

from memory_store import MemoryParams


def test_defaults_are_the_contract():
    p = MemoryParams()
    assert (p.top_k, p.merge_threshold, p.merge_weight, p.decay) == (16, 0.98, 0.5, 0.95)
    assert (p.floor, p.capacity, p.reinforce, p.exact_max, p.knn_k) == (0.02, 65536, 0.0, 20000, 16)


def test_dict_round_trip_through_json():
    p = MemoryParams(top_k=8, decay=0.9, exact_max=100)
    assert MemoryParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert MemoryParams.from_dict({}) == MemoryParams()
    assert MemoryParams.from_dict(None) == MemoryParams()


def test_unknown_and_invalid_fields_raise():
    with pytest.raises(ValueError, match="unknown"):
        MemoryParams.from_dict({"top_k": 4, "bogus": 1})
    with pytest.raises(ValueError, match="decay"):
        MemoryParams(decay=0.0)
    with pytest.raises(ValueError, match="capacity"):
        MemoryParams(capacity=0)
