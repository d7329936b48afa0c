"""Feature extraction in a few lines: load a backbone through the hub, run it on a photo, print the feature shapes
and write a PCA picture of the patch features.

``python -m franca.demo [--weights franca_vitb14 | /path/ckpt.pth] [--image photo.jpg] [--image-size S | H W]
[--output-dir DIR] [--alpha-background white] [--image-max-value 0]``

The image is resized to the size the checkpoint was trained at (its ``img_size``) unless ``--image-size`` is given,
and decoded as the checkpoint records it was trained (its ``input_decoding``: the colour under transparent pixels,
the scale of 16/32-bit images; :mod:`franca.data.image_decoding`) unless ``--alpha-background`` /
``--image-max-value`` are given. The picture, photo and PCA side by side, each enlarged by nearest neighbour to at
least 224 pixels a side, is written to ``DIR/franca_pca.png``. The old ``--size`` and ``--out FILE`` still work (with
a note).

Without ``--weights`` the ViT-B/14 is randomly initialised (no download); without ``--image`` scikit-image's
astronaut photo is used (``pip install scikit-image``).
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from franca.data.augmentations import make_normalize_transform
from franca.data.datasets import decode_image
from franca.data.image_decoding import DEFAULT_DECODING, ImageDecoding
from franca.eval.lib.common import (
    DeprecatedOption,
    add_decoding_arguments,
    add_image_size_argument,
    resolve_decoding,
    resolve_image_size,
)
from franca.eval.lib.feature_pca import pca_rgb, upsample_rgb
from franca.eval.lib.pictures import picture_grid

PICTURE_NAME = "franca_pca.png"
PICTURE_MIN_SIDE = 224


def load_photo(path: str | None, decoding: ImageDecoding = DEFAULT_DECODING) -> Image.Image:
    if path is not None:
        return decode_image(path, decoding)
    try:
        from skimage import data
    except ImportError as err:
        raise SystemExit("no --image given and scikit-image is not installed: pass --image PHOTO.jpg") from err
    return Image.fromarray(data.astronaut())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser("franca.demo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--weights", default=None, help="hub name or checkpoint path (default: random ViT-B/14)")
    p.add_argument("--rasa-weights", default=None)
    p.add_argument("--image", default=None)
    add_image_size_argument(p, old_names=("--size",))
    p.add_argument("--output-dir", default=".", help=f"folder of the picture {PICTURE_NAME} (default: here)")
    p.add_argument("--out", default=None, action=DeprecatedOption, note="use --output-dir; this file name still works")
    add_decoding_arguments(p)
    args = p.parse_args(argv)

    from franca.hub import franca_vitb14, load_backbone

    if args.weights is None:
        model = franca_vitb14(pretrained=False)
    else:
        model = load_backbone(args.weights, rasa_weights=args.rasa_weights)
    model.eval()
    try:
        (height, width), source = resolve_image_size(args.image_size, None, None, model)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    decoding, decoding_source = resolve_decoding(args, model)
    print(f"sizes: image {height}x{width} ({source}); decoding {decoding.describe()} ({decoding_source})")
    photo = load_photo(args.image, decoding).resize((width, height), Image.BICUBIC)
    x = make_normalize_transform()(photo).unsqueeze(0)
    with torch.no_grad():
        out = model.forward_features(x, use_rasa_head=args.rasa_weights is not None)
    for key, value in out.items():
        if torch.is_tensor(value):
            print(f"{key:<20} {tuple(value.shape)}")
    grid = (height // model.patch_size, width // model.patch_size)
    patches = out.get("patch_token_rasa", out["x_norm_patchtokens"]).reshape(1, *grid, -1)
    rgb, foreground = pca_rgb(patches)
    panels = [np.asarray(photo), upsample_rgb(rgb, (height, width))[0]]
    titles = ["photo", f"PCA of the patch features (foreground {100 * foreground.float().mean():.0f}%)"]
    path = Path(args.out) if args.out is not None else Path(args.output_dir) / PICTURE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    picture_grid([panels], titles, min_side=PICTURE_MIN_SIDE).save(path)
    print(f"PCA of the patch features written to {path.resolve()}")
    return {k: tuple(v.shape) for k, v in out.items() if torch.is_tensor(v)}


if __name__ == "__main__":
    main()
