"""StdConfig validation: bad knobs fail at construction with a message naming the knob."""

import pytest

from std_core import StdConfig


def test_defaults_are_the_papers() -> None:
    config = StdConfig()
    assert (config.mode, config.gamma, config.sparse_budget, config.verify) == ("std", 9, 1024, "parallel")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gamma": 0}, "gamma"),
        ({"gamma": -3}, "gamma"),
        ({"sparse_budget": 0}, "sparse_budget"),
        ({"sparse_budget": -1}, "sparse_budget"),
        ({"mode": "fast"}, "mode"),
        ({"verify": "lazy"}, "verify"),
        ({"selection": "random"}, "selection"),
        ({"selection_queries": "question"}, "selection_queries"),
    ],
)
def test_bad_values_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StdConfig(**kwargs)
