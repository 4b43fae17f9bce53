"""Semi-supervised learning with a deep generative model: M2 of Kingma, Rezende, Mohamed & Welling (2014), "Semi-
supervised learning with deep generative models", sec. 2.2 and 3.1.2.

The model: p(y) = Cat(1/C), p(z) (the config's prior, N(0, I) by default), p(x | y, z) a decoder on [z, onehot y].
Inference: q(z | x, y) an encoder on [x, onehot y], and q(y | x) = Cat(softmax(MLP(x))), the classifier. The first
three are the ``cvae`` family's :class:`~vaelab.conditional.ConditionalVAE` (one code path for p(x, z | y)).

Per example, with L(x, y) = -ELBO(x, y) - log p(y) the negative bound on log p(x, y):

* labelled rows:   L(x, y) + alpha * (-log q(y|x)), alpha = ``alpha_scale`` * N / N_labelled with alpha_scale = 0.1:
  the paper's alpha = 0.1 N on E_labelled[-log q(y|x)], spread over the N_labelled labelled examples (without it
  q(y|x) would learn from unlabelled data only, as the paper notes);
* unlabelled rows: U(x) = sum_y q(y|x) L(x, y) - H(q(y|x)), the negative bound on log p(x), summed exactly over the
  C classes (the C copies of the batch go through the objective at once).

The ELBO(x, y) is the config's objective (``elbo``, ``iwae``, ...) on the model given y (:meth:`M2.given`): no bound
is written here.

Batches hold a fixed share of labelled rows (``labelled_share``, 0.5; the Trainer's labelled sampler, see
``vaelab.train.Trainer._labelled_split``), and the loss is the plain batch mean of the rows' terms: labelled rows
weigh as much as unlabelled ones, far more than their share of the data (100 of 50,000). This is the minibatch form
of common implementations (e.g. Pyro's SS-VAE tutorial), not an unbiased estimate of the paper's J^alpha / N:
reweighted by the sampler's importance weights, the labelled rows' ELBO terms would weigh N_labelled / N, and then
(measured with alpha_scale = 0.1 on this project's tiny 4-class bars with 8 labels) the classifier stayed at chance,
where this form reaches 100 % accuracy. N_labelled / N is read from the labelled rows' importance weight
``batch["weight"]`` (see the sampler); without weights every row is labelled and alpha = alpha_scale.

In ``vaelab eval`` M2 is a classifier: ``classify(x)`` is q(y|x), and the error rate, NLL and calibration of the test
labels are printed; no label is needed to predict. ``given(y=...)`` is the conditional VAE p(x, z | y) with the
estimators' interface, for log p(x | y) bounds through the unchanged estimators.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributions import Categorical

from vaelab import conditional  # the module, not its names: it may be mid-import (models.py imports both)
from vaelab.data import UNLABELLED
from vaelab.estimators import elbo_parts
from vaelab.models import register_model
from vaelab.nets import MLP
from vaelab.objectives import ObjectiveOutput

if TYPE_CHECKING:
    from vaelab.config import TrainConfig

ALPHA_SCALE = 0.1  # alpha = 0.1 N (sec. 3.1.2, "In all experiments, alpha = 0.1 N"), per labelled example 0.1 N / N_l
LABELLED_SHARE = 0.5  # the share of every training batch drawn from the labelled rows


def _check_options(alpha_scale: object, labelled_share: object) -> None:
    a = alpha_scale
    if isinstance(a, bool) or not isinstance(a, int | float) or not math.isfinite(a) or a < 0:
        raise ValueError(f"alpha_scale must be a finite number >= 0, got {a!r}")
    if isinstance(labelled_share, bool) or not isinstance(labelled_share, int | float) or not 0 < labelled_share < 1:
        raise ValueError(f"labelled_share must be a number in (0, 1), got {labelled_share!r}")


@register_model("m2")
class M2(nn.Module):
    """M2: p(y) p(z|y) p(x | y, z) with q(z | x, y) and the classifier q(y | x) (Kingma et al., 2014).

    The generative part and q(z | x, y) are a :class:`~vaelab.conditional.ConditionalVAE` (``generative``: one code
    path for p(x, z | y), shared with the ``cvae`` family; p(z|y) = p(z) with the default prior); M2 adds the
    classifier q(y | x) and the semi-supervised objective. It does not name ``context``: nothing it predicts needs a
    label, and the labels it trains on come as ``targets`` (-1 where hidden).

    Batches hold ``x [B, *data_shape]`` and ``y [B]`` (a class, or :data:`~vaelab.data.UNLABELLED` = -1), and, from
    the Trainer's labelled sampler, ``weight [B]``.

    Args:
        generative: the conditional VAE p(x, z | y), q(z | x, y); its ``classes`` is C.
        classifier: ``x [B, *data_shape] -> [B, C]`` logits of q(y | x).
        alpha_scale: alpha / (N / N_labelled), the weight of a labelled row's -log q(y|x) (0.1: the paper's).
        labelled_share: share of each training batch drawn from the labelled rows.
    """

    targets = ("y",)  # the Trainer hands the labels (-1: hidden) to training_objective and validation_scores
    labelled_share = LABELLED_SHARE

    def __init__(
        self,
        *,
        generative: conditional.ConditionalVAE,
        classifier: nn.Module,
        alpha_scale: float = ALPHA_SCALE,
        labelled_share: float = LABELLED_SHARE,
    ):
        super().__init__()
        _check_options(alpha_scale, labelled_share)
        self.generative, self.classifier = generative, classifier
        self.classes, self.alpha_scale, self.labelled_share = generative.classes, float(alpha_scale), labelled_share
        self.latent_dim, self.data_shape = generative.latent_dim, generative.data_shape
        self.data_support = generative.data_support

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        """What the ``cvae`` family refuses (a prior with no per-class form, an architecture that cannot take the
        one-hot label, classes < 2), and bad ``model_options`` values (``alpha_scale``, ``labelled_share``)."""
        conditional.ConditionalVAE.check_config(config)
        _check_options(**{"alpha_scale": ALPHA_SCALE, "labelled_share": LABELLED_SHARE, **config.model_options})

    @classmethod
    def from_config(
        cls,
        config: TrainConfig,
        data_shape: Sequence[int],
        *,
        alpha_scale: float = ALPHA_SCALE,
        labelled_share: float = LABELLED_SHARE,
    ) -> M2:
        """M2 as ``config`` describes it: the cvae of ``config`` (``classes``, architecture, prior, posterior,
        likelihood), and an MLP classifier with the architecture's ``hidden`` widths and ``activation`` (defaults
        those of the ``mlp`` architecture).

        Args (``model_options``): alpha_scale (default 0.1, the paper's), labelled_share (default 0.5)."""
        shape = torch.Size(data_shape)
        options = {"hidden": (512, 256), "activation": "tanh", **config.architecture_options}
        return cls(
            generative=conditional.ConditionalVAE.from_config(config, shape),
            classifier=MLP(shape.numel(), tuple(options["hidden"]), config.classes, options["activation"]),
            alpha_scale=alpha_scale,
            labelled_share=labelled_share,
        )

    @property
    def output_net(self) -> nn.Module:
        """The network whose last layer produces the likelihood's parameters (started at the data mean)."""
        return self.generative.decoder

    # --- the two halves: q(y|x), and the conditional VAE given y --------------------------------------------------
    def classify(self, x: torch.Tensor) -> Categorical:
        """q(y | x): batch ``[B]`` over the C classes."""
        return Categorical(logits=self.classifier(x), validate_args=False)

    def given(self, y: torch.Tensor) -> conditional.GivenLabels:
        """The model p(x, z | y) for the labels ``y [B]`` (classes, not -1), with the estimators' interface: the
        conditional VAE's (:meth:`vaelab.conditional.ConditionalVAE.given`)."""
        return self.generative.given(y)

    # --- training and validation ---------------------------------------------------------------------------------
    def _enumerated(self, x: torch.Tensor, run) -> tuple[torch.Tensor, ...]:
        """``run(view, x_rep)`` on the C copies of ``x [U, ...]``, the c-th given y = c; its outputs ``[C * U]`` (class
        major) reshaped to ``[C, U]``. One batch of C * U rows through the objective: no loop over classes."""
        count = len(x)
        x_rep = x.repeat(self.classes, *([1] * (x.ndim - 1)))  # (C * U, ...), class-major
        y_rep = torch.arange(self.classes, device=x.device).repeat_interleave(count)  # (C * U,)
        return tuple(None if v is None else v.reshape(self.classes, count) for v in run(self.given(y_rep), x_rep))

    def training_objective(self, batch: Mapping[str, torch.Tensor], objective, **options) -> ObjectiveOutput:
        """The per-row loss ``[B]`` (see the module docstring): ``L(x, y) + alpha * (-log q(y|x))`` on labelled rows,
        ``U(x)`` on unlabelled rows, alpha = alpha_scale * N / N_labelled.

        ``elbo`` is the bound of each row, detached: on log p(x, y) for a labelled row, on log p(x) for an unlabelled
        one; ``recon`` and ``kl`` split it (``kl`` includes KL(q(y|x) || p(y))) where the objective splits its
        ELBO. ``objective`` and ``options`` are the config's (k, beta, form, ...)."""
        x, y = batch["x"], batch["y"]
        self._check_labels(y)
        log_py = -math.log(self.classes)  # uniform p(y)
        log_q = self.classifier(x).log_softmax(-1)  # (B, C)
        rows, loss, elbo, recon, kl = [], [], [], [], []
        labelled = (y != UNLABELLED).nonzero()[:, 0]
        unlabelled = (y == UNLABELLED).nonzero()[:, 0]
        if len(labelled):
            yl = y[labelled]
            out = objective(self.given(yl), x[labelled], **options)
            nll_y = -log_q[labelled].gather(1, yl[:, None])[:, 0]  # -log q(y|x), (B_l,)
            rows.append(labelled)
            loss.append(out.loss - log_py + self.alpha(batch) * nll_y)
            elbo.append(out.elbo + log_py)
            recon.append(out.recon)
            kl.append(None if out.kl is None else out.kl - log_py)
        if len(unlabelled):
            xu, lq = x[unlabelled], log_q[unlabelled].T  # (U, ...), (C, U)
            c_loss, c_elbo, c_recon, c_kl = self._enumerated(
                xu, lambda view, xr: _fields(objective(view, xr, **options))
            )
            q = lq.exp()  # (C, U)
            entropy = -(q * lq).sum(0)  # H(q(y|x)), (U,)
            rows.append(unlabelled)
            loss.append((q * (c_loss - log_py)).sum(0) - entropy)
            qd, hd = q.detach(), entropy.detach()
            elbo.append((qd * (c_elbo + log_py)).sum(0) + hd)
            recon.append(None if c_recon is None else (qd * c_recon).sum(0))
            kl.append(None if c_kl is None else (qd * c_kl).sum(0) - hd - log_py)
        order = torch.cat(rows)

        def assemble(parts):  # rows back in batch order
            if any(p is None for p in parts):
                return None
            return parts[0].new_empty(len(x)).index_copy(0, order, torch.cat(parts))

        return ObjectiveOutput(loss=assemble(loss), elbo=assemble(elbo), recon=assemble(recon), kl=assemble(kl))

    def alpha(self, batch: Mapping[str, torch.Tensor]) -> float:
        """alpha = alpha_scale * N / N_labelled, N_labelled / N from the labelled rows' importance weight
        (:meth:`vaelab.train.Trainer._labelled_split`: weight = (N_labelled / N) / (B_labelled / B)); without
        weights every row is labelled: alpha = alpha_scale."""
        weight = batch.get("weight")
        labelled = batch["y"] != UNLABELLED
        if weight is None or not bool(labelled.any()):
            return self.alpha_scale
        fraction = float(weight[labelled][0]) * float(labelled.double().mean())  # N_labelled / N
        return self.alpha_scale / fraction

    def marginal_bound(self, x: torch.Tensor, *, k: int = 1, form: str = "kl") -> torch.Tensor:
        """-U(x) ``[B]``, the ELBO of log p(x) with y summed out exactly: sum_y q(y|x) (ELBO(x, y) + log p(y)) +
        H(q(y|x)), each ELBO(x, y) from ``k`` samples in ``form``."""
        log_q = self.classify(x).logits.log_softmax(-1).T  # (C, B)
        (elbo,) = self._enumerated(x, lambda view, xr: (elbo_parts(view, xr, k=k, form=form).elbo,))
        q = log_q.exp()
        return (q * (elbo - math.log(self.classes))).sum(0) - (q * log_q).sum(0)

    def validation_scores(self, batch: Mapping[str, torch.Tensor], *, k: int, form: str) -> dict[str, torch.Tensor]:
        """``elbo``: the bound on log p(x) of every row (:meth:`marginal_bound`, 1 sample per class; no label used),
        and ``accuracy``: 1 or 0 per labelled row, whether q(y|x)'s most probable class is its label. (``k``, the
        validation IWAE's sample count, is not used: the bound here is the 1-sample ELBO.)"""
        x = batch["x"]
        scores = {"elbo": self.marginal_bound(x, k=1, form=form)}
        y = batch.get("y")
        if y is not None:
            self._check_labels(y)
            labelled = y != UNLABELLED
            predicted = self.classify(x[labelled]).logits.argmax(-1)
            scores["accuracy"] = (predicted == y[labelled]).to(x.dtype)
        return scores

    def _check_labels(self, y: torch.Tensor) -> None:
        if y.ndim != 1 or y.is_floating_point():
            raise ValueError(f"y must be integer labels [B], got {y.dtype} of shape {tuple(y.shape)}")
        if len(y) and (int(y.min()) < UNLABELLED or int(y.max()) >= self.classes):
            raise ValueError(
                f"labels must be classes 0..{self.classes - 1} or {UNLABELLED} (unlabelled), got "
                f"{int(y.min())}..{int(y.max())}: set classes"
            )


def _fields(out: ObjectiveOutput) -> tuple[torch.Tensor | None, ...]:
    return out.loss, out.elbo, out.recon, out.kl
