"""JPEG decoding throughput of raydist's ImageNet transforms, in images per second on one core.

For ImageNet-sized photographs (scikit-learn's two sample photos, re-encoded as JPEG quality 90 at the sizes
below) it times the train transform (random resized crop + flip) and the eval transform (resize + center crop)
at --image-size, each with PIL's draft mode off (plain) and on (draft), on the source-size JPEG and on the copy
`raydist data to-parquet` stores by default (short side 1.15 x image_size). One thread: the figure is per core,
so cores per GPU = a GPU's training images/s / the train figure. Writes bench/results/decode.json.

    python bench/decode.py [--image-size 224] [--seconds 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image

from raydist.data.parquet import _encoded, default_resize
from raydist.data.transforms import ImageTransform

SIZES = {"imagenet_avg_500x375": (500, 375), "large_1600x1200": (1600, 1200)}


def _photos(width: int, height: int) -> list[bytes]:
    from sklearn.datasets import load_sample_images

    out = []
    for arr in load_sample_images().images:
        buf = io.BytesIO()
        Image.fromarray(arr).resize((width, height), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _rate(transform: ImageTransform, images: list[bytes], seconds: float) -> float:
    n, t0, seed = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for data in images:
            transform(data, seed)
            n += 1
            seed += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--seconds", type=float, default=2.0, help="timing per case")
    ap.add_argument("--out", default="bench/results/decode.json")
    args = ap.parse_args()
    size = args.image_size
    rows = []
    for name, (w, h) in SIZES.items():
        sources = _photos(w, h)
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "raydist_decode_bench.jpg"
        stored = []
        for data in sources:  # what to-parquet keeps: resized to 1.15 x image_size (same code path)
            tmp.write_bytes(data)
            stored.append(_encoded(str(tmp), default_resize(size), 90))
        tmp.unlink()
        for source, images in (("source", sources), (f"to-parquet {default_resize(size)}px", stored)):
            px = Image.open(io.BytesIO(images[0])).size
            for train in (True, False):
                for draft in (False, True):
                    rate = _rate(ImageTransform(size, train=train, draft=draft), images, args.seconds)
                    rows.append({"photo": name, "stored": source, "stored_size": list(px),
                                 "transform": "train" if train else "eval", "draft": draft,
                                 "images_per_s_per_core": round(rate, 1)})
                    print(f"{name:22s} {source:18s} {str(px):12s} {rows[-1]['transform']:5s} "
                          f"{'draft' if draft else 'plain':5s} {rate:8.1f} img/s/core")
    gpu_rate = 2000.0
    best = max(r["images_per_s_per_core"] for r in rows if r["transform"] == "train" and r["stored"] != "source"
               and r["photo"] == "imagenet_avg_500x375")
    result = {"image_size": size, "cpu": platform.processor() or platform.machine(), "rows": rows,
              "cores_per_gpu_at_2000_img_s": round(gpu_rate / best, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"decode cores per GPU at {gpu_rate:.0f} train img/s (to-parquet copy): "
          f"{result['cores_per_gpu_at_2000_img_s']}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
