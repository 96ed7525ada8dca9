"""Checking the PNG figures the commands write."""

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(path):
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE, f"{path} is not a PNG"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(np.ptp(image)) > 0, f"{path} is blank"
