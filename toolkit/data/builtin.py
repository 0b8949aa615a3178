"""Built-in datasets that need no download: digits (vectors, 8x8 images or tokens), CURVES, mnist1d.

Each loader returns ``(x, y)``: ``x`` float32 in [0, 1] with its natural per-example shape (int64
token ids for ``digits_tokens``),
``y`` the targets (int64 class labels, or the images themselves for CURVES, an autoencoder task).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from toolkit.errors import InputError

#: examples generated for CURVES when the spec gives no ``limit``
CURVES_DEFAULT_COUNT = 10_000


def _digits(limit: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)  # (N, 64) in [0, 1]
    return x, d.target.astype(np.int64)


def _digits_images(limit: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = _digits(limit, seed)
    return x.reshape(-1, 1, 8, 8), y  # (N, 1, 8, 8)


def _digits_tokens(limit: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The digits pixels as a sequence of 64 int64 tokens: intensities 0..16, so vocab 17."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.int64), d.target.astype(np.int64)  # (N, 64) in [0, 16]


def curves_dataset(
    count: int, seed: int = 0, size: int = 28, points: int = 3, width: float = 0.9
) -> np.ndarray:
    """Synthetic CURVES images (Hinton & Salakhutdinov 2006): a smooth curve through random control points.

    The curve through control points p_0..p_{k-1} is their Lagrange interpolant at t_i = i/(k-1)
    (a parabola for k = 3), sampled densely and rendered with a Gaussian pen of std ``width`` pixels:
    pixel value = max over curve samples of exp(-d^2 / (2 width^2)). Deterministic for a seed.

    Args:
        count: number of images.
        seed: generator seed.
        size: image side in pixels.
        points: number of control points (>= 2).
        width: pen width (Gaussian std) in pixels.

    Returns:
        (count, 1, size, size) float32 in [0, 1].

    Raises:
        ValueError: for a non-positive count or fewer than 2 control points.
    """
    if count < 1 or points < 2:
        raise ValueError(f"expected count >= 1 and points >= 2, got count={count}, points={points}")
    rng = np.random.default_rng(seed)
    margin = 3.0
    ctrl = rng.uniform(margin, size - 1 - margin, size=(count, points, 2))  # (N, k, 2) pixel coords
    t = np.linspace(0.0, 1.0, 64)  # (S,)
    knots = np.linspace(0.0, 1.0, points)
    basis = np.ones((points, t.size))  # Lagrange basis (k, S)
    for i in range(points):
        for j in range(points):
            if i != j:
                basis[i] *= (t - knots[j]) / (knots[i] - knots[j])
    curve = np.einsum("nkc,ks->nsc", ctrl, basis)  # (N, S, 2)
    grid = np.arange(size, dtype=np.float64)
    out = np.empty((count, size, size), dtype=np.float32)
    for start in range(0, count, 128):
        c = curve[start : start + 128]  # (n, S, 2)
        dy = (grid[None, None, :] - c[:, :, 0:1]) ** 2  # (n, S, H)
        dx = (grid[None, None, :] - c[:, :, 1:2]) ** 2  # (n, S, W)
        d2 = dy[:, :, :, None] + dx[:, :, None, :]  # (n, S, H, W)
        out[start : start + 128] = np.exp(-d2.min(axis=1) / (2 * width**2))
    return out[:, None]  # (N, 1, H, W)


def _curves(limit: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x = curves_dataset(limit or CURVES_DEFAULT_COUNT, seed=seed)
    return x, x.copy()


def _mnist1d(limit: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise InputError(
            "builtin dataset 'mnist1d': expected the optional package mnist1d, got ImportError; "
            "install it with `pip install mnist1d` (it generates the data offline)"
        ) from exc
    args = get_dataset_args()
    args.num_samples = limit or args.num_samples
    args.seed = seed
    d = make_dataset(args)  # generated locally from templates: no download
    x = np.concatenate([d["x"], d["x_test"]]).astype(np.float32)  # (N, 40)
    y = np.concatenate([d["y"], d["y_test"]]).astype(np.int64)
    return x, y


BUILTIN_DATASETS: dict[str, Callable[[int | None, int], tuple[np.ndarray, np.ndarray]]] = {
    "digits": _digits,
    "digits_images": _digits_images,
    "digits_tokens": _digits_tokens,
    "curves": _curves,
    "mnist1d": _mnist1d,
}


def load_builtin(name: str, limit: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Load a built-in dataset.

    Args:
        name: one of BUILTIN_DATASETS.
        limit: at most this many examples (CURVES and mnist1d generate exactly this many).
        seed: seed of generated datasets (CURVES, mnist1d).

    Returns:
        (x, y): inputs with their natural shape and targets.

    Raises:
        ValueError: for an unknown name or a missing optional package.
    """
    if name not in BUILTIN_DATASETS:
        raise InputError(f"unknown builtin dataset {name!r}; known: {sorted(BUILTIN_DATASETS)}")
    x, y = BUILTIN_DATASETS[name](limit, seed)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y
