"""A discriminative classifier p(y|x) = Categorical(logits = NN(x)): the reference a generative classifier is judged by.

It is a model family like the VAE (``TrainConfig(model="classifier")``, ``vaelab train --model classifier``) but has no
latent variables, so it has no ``prior`` / ``encode`` / ``decode``: :func:`vaelab.evaluate.is_latent_model` is False,
``vaelab eval`` skips the log p(x) numbers and prints the classification metrics of its ``classify`` (accuracy,
NLL, ECE, reliability, confusion; :func:`vaelab.evaluate.classification_metrics`).

Training (through the Trainer's ``training_objective`` / ``validation_scores`` hooks) minimises -log p(y|x) per
example; what the run's metrics call ``elbo`` is log p(y|x) (nats per example), so the best checkpoint is the one with
the highest validation log-likelihood of the labels.

Pixels: the classifier sees what the config's ``binarizes`` says, as every model does. By default (``binarize`` unset,
the default Bernoulli likelihood) it trains on a fresh binarization of every batch and is evaluated on the fixed-seed
binarization of the evaluation protocol: the same distribution of pixels in both, and the very images a Bernoulli
(c)VAE's generative classifier is scored on, so the two are compared on equal inputs. ``binarize = false`` trains and
evaluates it on the grey-level pixels instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributions import Categorical, constraints

from vaelab.models import refuse_unused, register_model
from vaelab.nets import MLP
from vaelab.objectives import ObjectiveOutput

if TYPE_CHECKING:
    from vaelab.config import TrainConfig


@register_model("classifier")
class Classifier(nn.Module):
    """p(y|x) = Categorical(logits = MLP(flatten(x))), y in 0..classes-1.

    Args:
        data_shape: the shape of one example (images are flattened).
        classes: C, the number of labels.
        hidden: widths of the MLP's hidden layers (``architecture_options={"hidden": [...]}``).
        activation: a key of :data:`vaelab.nets.ACTIVATIONS`.
    """

    targets = ("y",)  # the batch field it predicts: the Trainer hands it the labels
    data_support = constraints.unit_interval  # pixel intensities (binarized or not)

    def __init__(
        self, data_shape: Sequence[int], classes: int, hidden: Sequence[int] = (512, 256), activation: str = "tanh"
    ):
        super().__init__()
        self.data_shape = torch.Size(data_shape)
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
            raise ValueError(f"classes must be an int >= 2, got {classes!r}")
        self.classes = classes
        self.net = MLP(self.data_shape.numel(), hidden, classes, activation)

    @classmethod
    def from_config(cls, config: TrainConfig, data_shape: Sequence[int]) -> Classifier:
        """The classifier ``config`` describes (``classes``, ``architecture_options`` of the ``mlp``)."""
        return cls(data_shape, config.classes, **config.architecture_options)

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        """Refuse the fields of a latent-variable model, which a classifier does not have."""
        if config.classes < 2:
            raise ValueError(f"the 'classifier' model needs classes >= 2, got classes={config.classes!r}")
        latent = "a classifier has no latent variables"
        refuse_unused(
            config,
            "classifier",
            {
                "architecture": "it is one MLP: set its hidden widths with architecture_options",
                "latent_dim": latent,
                "prior": latent,
                "prior_options": latent,
                "posterior": latent,
                "posterior_options": latent,
                "likelihood": "it models p(y|x), not p(x); binarize decides the pixels it sees",
                "likelihood_options": "it models p(y|x), not p(x)",
                "objective": "it is trained by -log p(y|x)",
                "objective_options": "it is trained by -log p(y|x)",
                "k": "log p(y|x) is exact: there is nothing to sample",
                "form": latent,
                "schedule": "there is no KL term to weight",
                "schedule_options": "there is no KL term to weight",
            },
        )

    def classify(self, x: torch.Tensor) -> Categorical:
        """p(y|x) for ``x [B, *data_shape]``: batch ``[B]`` over ``classes`` labels."""
        return Categorical(logits=self.net(x))  # (B, C)

    def training_objective(self, batch: Mapping[str, torch.Tensor], objective: Any, **options: Any) -> ObjectiveOutput:
        """-log p(y|x) per example (``[B]``, nats) as the loss; log p(y|x) reported as ``elbo`` (it is exact).
        ``objective`` and its options (k, beta, form) are the config's defaults, refused otherwise: unused."""
        log_py = self.classify(batch["x"]).log_prob(batch["y"])  # (B,)
        return ObjectiveOutput(loss=-log_py, elbo=log_py.detach(), recon=None, kl=None)

    def validation_scores(self, batch: Mapping[str, torch.Tensor], k: int, form: str) -> dict[str, torch.Tensor]:
        """Per example, ``[B]``: ``elbo`` = log p(y|x) (nats; the best checkpoint maximises its mean) and
        ``accuracy`` (1 where the most probable label is the true one)."""
        p = self.classify(batch["x"])
        return {"elbo": p.log_prob(batch["y"]), "accuracy": (p.logits.argmax(-1) == batch["y"]).double()}
