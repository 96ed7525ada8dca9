"""Data sets for lbe-train: scikit-learn's digits (no download) or a local Keras-layout .npz.

Both come back as float32 images [N, H, W, C] standardized with training-set statistics, and
int64 labels [N]. Nothing here imports TensorFlow.
"""

import os
from typing import NamedTuple

import numpy as np

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

# The digits split is fixed (it does not follow --seed): seeds vary the initialization and the
# batch order, never which images are held out.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
# The validation split carved from the training data is fixed the same way.
VALIDATION_SPLIT_SEED = 0


class DataError(ValueError):
    """The data set cannot be loaded or is malformed; the message says why."""


class Dataset(NamedTuple):
    name: str
    x_train: np.ndarray     # float32 [N, H, W, C], standardized
    y_train: np.ndarray     # int64 [N]
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    description: str        # how it was loaded and normalized, for results.json

    @property
    def image_shape(self):
        return tuple(int(d) for d in self.x_train.shape[1:])


def load_digits():
    """scikit-learn's 8x8 digits: a fixed stratified 80/20 split, standardized."""
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DataError(
            "the default data set (scikit-learn's digits) needs scikit-learn, which is not "
            "installed: pip install 'lbe-ops[train]' (or scikit-learn), or train on a local "
            "MNIST-style file with --data PATH") from None
    digits = sklearn_load_digits()
    images = digits.images.astype(np.float32)[..., np.newaxis]    # [1797, 8, 8, 1], 0..16
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=DIGITS_TEST_FRACTION, stratify=labels,
        random_state=DIGITS_SPLIT_SEED)
    # One mean and one std over all training pixels, as for the image files. Per-pixel
    # standardization would blow up the nearly constant border pixels (a std of a few
    # hundredths), and a deep network generalizes worse from those outliers.
    mean = float(x_train.mean())
    std = float(x_train.std())
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std
    return Dataset(
        name="digits", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
        num_classes=10,
        description=(f"scikit-learn digits (8x8), stratified split {1 - DIGITS_TEST_FRACTION:g}/"
                     f"{DIGITS_TEST_FRACTION:g} with random_state={DIGITS_SPLIT_SEED}, "
                     f"standardized with the training set's mean {mean:.4g} and std {std:.4g}"))


def _labels(name, y, path):
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{path}: {name} must hold integer class labels of shape [N] "
                        f"(Keras layout), got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating) or not np.all(np.equal(np.mod(y, 1), 0)):
            raise DataError(f"{path}: {name} must hold integer class labels, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise DataError(f"{path}: {name} has negative labels (min {y.min()})")
    return y


def _images(name, x, path):
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{path}: {name} must be numeric, got dtype {x.dtype}")
    if x.ndim == 2:           # [N, features]: a one-row "image"
        x = x[:, np.newaxis, :, np.newaxis]
    elif x.ndim == 3:         # [N, H, W] as in keras.datasets.mnist
        x = x[..., np.newaxis]
    elif x.ndim != 4:
        raise DataError(f"{path}: {name} must have shape [N, H, W], [N, H, W, C] or "
                        f"[N, features], got {x.shape}")
    return x.astype(np.float32)


def load_npz(path):
    """A local .npz in the Keras layout (x_train, y_train, x_test, y_test), e.g. mnist.npz.

    Images are standardized with one mean and one std of the training set (as the paper's
    MNIST normalization); uint8 images are first scaled to [0, 1].
    """
    path = os.fspath(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"--data: no such file: {path}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"--data: cannot read {path} as a NumPy .npz archive ({exc})") from None
    with archive:
        if not hasattr(archive, "files"):
            raise DataError(f"--data: {path} is a single .npy array, not an .npz archive with "
                            f"{', '.join(NPZ_KEYS)}")
        missing = [key for key in NPZ_KEYS if key not in archive.files]
        if missing:
            raise DataError(
                f"--data: {path} lacks {', '.join(missing)}; an archive in the Keras layout "
                f"holds {', '.join(NPZ_KEYS)} (found: {', '.join(archive.files) or 'nothing'})")
        raw_train = archive["x_train"]
        x_train = _images("x_train", raw_train, path)
        x_test = _images("x_test", archive["x_test"], path)
        y_train = _labels("y_train", archive["y_train"], path)
        y_test = _labels("y_test", archive["y_test"], path)
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise DataError(f"{path}: x_{split} has {len(x)} examples but y_{split} has {len(y)}")
        if len(x) < 2:
            raise DataError(f"{path}: x_{split} needs at least 2 examples, has {len(x)}")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{path}: x_train images are {x_train.shape[1:]} but x_test images are "
                        f"{x_test.shape[1:]}")
    if raw_train.dtype == np.uint8:
        x_train, x_test = x_train / 255.0, x_test / 255.0
    mean = float(x_train.mean())
    std = float(x_train.std()) or 1.0
    x_train = ((x_train - mean) / std).astype(np.float32)
    x_test = ((x_test - mean) / std).astype(np.float32)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    if num_classes < 2:
        raise DataError(f"{path}: the labels hold a single class; classification needs two")
    name = os.path.splitext(os.path.basename(path))[0]
    return Dataset(
        name=name, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
        num_classes=num_classes,
        description=(f"{os.path.abspath(path)} (Keras layout), "
                     + ("uint8 scaled to [0, 1], " if raw_train.dtype == np.uint8 else "")
                     + f"standardized with the training set's mean {mean:.4g} and std {std:.4g}"))


def split_validation(data, fraction, seed=VALIDATION_SPLIT_SEED):
    """(train, (x_val, y_val)): a stratified `fraction` of the training examples held out.

    Each class gives round(fraction * its count) examples (at least one where it has two or
    more), chosen by a fixed seed, so the split does not follow --seed. The test set is left
    alone: it never chooses anything.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(data.y_train):
        members = np.flatnonzero(data.y_train == label)
        count = int(round(fraction * len(members)))
        if count == 0 and len(members) >= 2:
            count = 1
        held.append(rng.permutation(members)[:count])
    held = np.sort(np.concatenate(held))
    keep = np.setdiff1d(np.arange(len(data.y_train)), held)
    if len(keep) < 2 or len(held) < 2:
        raise DataError(f"a validation fraction of {fraction:g} leaves {len(keep)} training and "
                        f"{len(held)} validation examples; both need at least 2")
    train = data._replace(x_train=data.x_train[keep], y_train=data.y_train[keep])
    return train, (data.x_train[held], data.y_train[held])
