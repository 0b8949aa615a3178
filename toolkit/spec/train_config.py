"""The `train:` section of a graph spec: data, loss, optimizer, schedule.

Validated with the rest of the spec at load time and used by `toolkit.train`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from toolkit.spec._base import StrictModel

BuiltinDataset = Literal["digits", "digits_images", "digits_tokens", "curves", "mnist1d", "pydoc"]
LossName = Literal["cross_entropy", "token_cross_entropy", "mse", "sum_squared", "bce"]


class DataConfig(StrictModel):
    """Where the data comes from and how it is split.

    Exactly one of ``builtin`` (a dataset that ships offline) or ``path`` (.npz, .npy or .csv).
    For a file, ``inputs`` maps each graph input to an array name (.npz) or column names (.csv), and
    ``target`` names the target array/column (default ``y``); ``target: input`` makes the graph's only
    input the target (autoencoders; built-in ``curves`` does this by itself). Splits are deterministic
    for a given ``seed``. See toolkit.data.files for the file layouts.
    """

    builtin: BuiltinDataset | None = None
    path: str | None = None
    inputs: dict[str, str | list[str]] | None = None
    target: str | None = None
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    seed: int = 0
    limit: int | None = Field(
        default=None, gt=0, description="use at most this many examples (before splitting)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.builtin is None) == (self.path is None):
            raise ValueError("expected exactly one of 'builtin' or 'path'")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"expected val_fraction + test_fraction < 1, got {self.val_fraction + self.test_fraction}"
            )
        return self


class RegularizerConfig(StrictModel):
    """Penalties that act in the gradient, the curvature and the preconditioner alike.

    ``group_lasso`` penalises the norm of each rank component of factorized layers; a component whose
    norm falls under ``prune_threshold`` is removed, so training lowers ranks.
    """

    l2: float = Field(default=0.0, ge=0.0)
    l1: float = Field(default=0.0, ge=0.0)
    group_lasso: float = Field(default=0.0, ge=0.0)
    prune_threshold: float = Field(default=1e-3, ge=0.0)
    l2_on_bias: bool = False


class OptimizerConfig(StrictModel):
    """The optimizer and its hyper-parameters; Hessian-free is the default."""

    name: Literal["hessian_free", "adam", "sgd", "lbfgs"] = "hessian_free"
    lr: float | None = Field(
        default=None, gt=0.0, description="learning rate (adam, sgd, lbfgs); HF uses 1.0"
    )
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="sgd only")
    curvature: Literal["ggn", "hessian", "fisher"] = "ggn"
    damping: float = Field(default=1.0, gt=0.0, description="initial Levenberg-Marquardt lambda")
    cg_max_iters: int | None = Field(
        default=None,
        ge=1,
        description="CG iteration cap (the largest with adaptive_cg; default: the optimizer's)",
    )
    curvature_fraction: float = Field(
        default=0.25, gt=0.0, le=1.0, description="curvature batch / gradient batch"
    )
    preconditioner: Literal["none", "diagonal", "kfac", "ekfac", "nystrom"] | None = Field(
        default=None,
        description="CG preconditioner: kfac (Kronecker-factored blocks of the linear sublayers), "
        "ekfac (K-FAC's eigenbases with corrected eigenvalues), nystrom (randomized low-rank "
        "sketch of the whole curvature), diagonal (Martens), none (default: the optimizer's)",
    )
    preconditioner_alpha: float | None = Field(
        default=None, ge=0.0, le=1.0, description="exponent of the diagonal preconditioner"
    )
    kfac_every: int | None = Field(
        default=None, ge=1, description="outer steps between K-FAC estimates (or Nyström sketches)"
    )
    nystrom_rank: int | None = Field(
        default=None, ge=1, description="curvature products per Nyström sketch; default: the optimizer's"
    )
    kfac_samples: Annotated[int, Field(strict=True, ge=1)] | Literal["exact"] | None = Field(
        default=None,
        description="Monte-Carlo draws per example for K-FAC's output factor G, or exact "
        "(one backward pass per model output); default: the optimizer's",
    )
    adaptive_cg: bool | None = Field(
        default=None, description="CG cap that starts small and grows when CG runs into it"
    )
    jvp_mode: Literal["double_vjp", "jvp", "linearize"] = Field(
        default="double_vjp",
        description=(
            "how J·v is computed inside CG: double_vjp (reverse-over-reverse, built once per step; fastest "
            "measured on CPU), jvp (forward mode each product), linearize (torch.func.linearize, traced each step)"
        ),
    )
    regularizer: RegularizerConfig = Field(default_factory=lambda: RegularizerConfig())


class TrainConfig(StrictModel):
    """Everything `rlhf train` needs besides the graph itself."""

    data: DataConfig = Field(default_factory=lambda: DataConfig(builtin="digits"))
    loss: LossName = "cross_entropy"
    metrics: list[Literal["accuracy"]] = Field(default_factory=list)
    batch_size: int = Field(default=256, ge=1)
    epochs: int = Field(default=20, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    seed: int = 0
    checkpoint_every: int = Field(default=50, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(
        default=2, ge=1, description="step checkpoints kept (the last and the previous)"
    )
    eval_every: int | None = Field(
        default=None, ge=1, description="steps between validations (default: once per epoch)"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float64"] = "float32"
    threads: int = Field(
        default=1,
        ge=0,
        description="CPU intra-op threads (0: torch's default); small models run fastest on one",
    )
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig())
