"""The optimizer registry: names to torch.optim classes, options passed through, and which one the whole step takes.

Training with each (and resuming bit for bit) is tested end to end in test_train.py.
"""

from __future__ import annotations

import pytest
import torch

from vaelab.optimizers import OPTIMIZERS, is_plain_adam, make_optimizer


def params() -> list[torch.Tensor]:
    return [torch.zeros(3, requires_grad=True)]


@pytest.mark.parametrize(
    ("name", "options", "kind"),
    [
        ("adam", {}, torch.optim.Adam),
        ("adamw", {"weight_decay": 0.05}, torch.optim.AdamW),
        ("sgd", {"momentum": 0.9, "nesterov": True}, torch.optim.SGD),
    ],
)
def test_each_name_builds_its_torch_optimizer_with_the_options(name, options, kind):
    optimizer = make_optimizer(name, params(), 0.01, options)
    assert type(optimizer) is kind
    (group,) = optimizer.param_groups
    assert group["lr"] == 0.01 and all(group[key] == value for key, value in options.items())


def test_unknown_names_and_options_are_refused_naming_them():
    assert list(OPTIMIZERS) == ["adam", "adamw", "sgd"]
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'; choose from adam, adamw, sgd"):
        make_optimizer("rmsprop", params(), 0.01, {})
    with pytest.raises(ValueError, match=r"optimizer_options \{'betas': \[0.9, 0.99\]\} are not accepted by 'sgd'"):
        make_optimizer("sgd", params(), 0.01, {"betas": [0.9, 0.99]})


def test_only_plain_adam_is_written_out_by_the_whole_step():
    assert is_plain_adam(make_optimizer("adam", params(), 0.01, {}))
    assert is_plain_adam(make_optimizer("adam", params(), 0.01, {"betas": (0.8, 0.99), "eps": 1e-6}))
    for name, options in [("adam", {"amsgrad": True}), ("adam", {"weight_decay": 0.1}), ("adamw", {}), ("sgd", {})]:
        assert not is_plain_adam(make_optimizer(name, params(), 0.01, options)), (name, options)
