"""Layer mapping g(m): exact lists from the TinyBERT paper's conventions, and every invalid case."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from kdrun.distill.mapping import LayerMapping, LayerMappingError


def test_uniform_4_from_12_is_every_third_layer() -> None:
    assert LayerMapping("uniform").resolve(4, 12) == [0, 3, 6, 9, 12, 13]


def test_top_4_from_12() -> None:
    assert LayerMapping("top").resolve(4, 12) == [0, 9, 10, 11, 12, 13]


def test_bottom_4_from_12() -> None:
    assert LayerMapping("bottom").resolve(4, 12) == [0, 1, 2, 3, 4, 13]


def test_uniform_not_divisible_rounds_half_up_and_ends_on_last_layer() -> None:
    # m*N/M = 1.5, 3, 4.5, 6 -> 2, 3, 5, 6
    assert LayerMapping().resolve(4, 6) == [0, 2, 3, 5, 6, 7]
    # 1.5 -> 2 either way; 2.5 -> 3 shows it is half up (Python's round() would give 2).
    # M=2, N=5: 2.5, 5 -> 3, 5
    assert LayerMapping().resolve(2, 5) == [0, 3, 5, 6]


def test_equal_depth_is_identity_for_every_kind() -> None:
    for kind in ("uniform", "top", "bottom"):
        assert LayerMapping(kind).resolve(6, 6) == [0, 1, 2, 3, 4, 5, 6, 7]


def test_explicit_list() -> None:
    mapping = LayerMapping("list", [2, 5, 11, 12])
    assert mapping.resolve(4, 12) == [0, 2, 5, 11, 12, 13]
    assert mapping.layer_pairs(4, 12) == [(1, 2), (2, 5), (3, 11), (4, 12)]


def test_list_from_hydra_listconfig_becomes_plain_ints() -> None:
    mapping = LayerMapping("list", OmegaConf.create([1, 2]))
    assert mapping.layers == [1, 2] and type(mapping.layers) is list


@pytest.mark.parametrize(
    ("mapping", "student", "teacher", "fragment"),
    [
        (LayerMapping("uniform"), 6, 4, "more layers"),
        (LayerMapping("list", [3, 6, 9]), 4, 12, "has 3 entries"),
        (LayerMapping("list", [0, 6, 9, 12]), 4, 12, "outside"),
        (LayerMapping("list", [3, 6, 9, 13]), 4, 12, "outside"),
        (LayerMapping("list", [3, 9, 6, 12]), 4, 12, "strictly increasing"),
        (LayerMapping("list", [3, 6, 6, 12]), 4, 12, "strictly increasing"),
        (LayerMapping("bottom"), 0, 12, "at least one"),
    ],
)
def test_invalid_resolutions_name_the_config_key(
    mapping: LayerMapping, student: int, teacher: int, fragment: str
) -> None:
    with pytest.raises(LayerMappingError, match=fragment) as caught:
        mapping.resolve(student, teacher)
    assert "distill.mapping" in str(caught.value)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"kind": "middle"}, "not a known layer mapping"),
        ({"kind": "list"}, "needs distill.mapping.layers"),
        ({"kind": "uniform", "layers": [1, 2]}, "only used with"),
        ({"kind": "list", "layers": [1, "2"]}, "integers only"),
        ({"kind": "list", "layers": [1, True]}, "integers only"),
    ],
)
def test_invalid_configurations_fail_at_construction(kwargs: dict, fragment: str) -> None:
    with pytest.raises(LayerMappingError, match=fragment) as caught:
        LayerMapping(**kwargs)
    assert "distill.mapping" in str(caught.value)
    assert isinstance(caught.value, ValueError)
