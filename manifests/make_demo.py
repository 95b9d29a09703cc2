"""Make the demo face images and manifests in this folder (run: python manifests/make_demo.py).

The faces are drawn here with Pillow, not downloaded: a few simple cartoon portraits.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

HERE = Path(__file__).parent
SKIN = [(241, 194, 125), (224, 172, 105), (141, 85, 36), (255, 219, 172)]
HAIR = [(40, 30, 20), (200, 160, 60), (90, 50, 20), (20, 20, 20)]


def face(i: int) -> Image.Image:
    img = Image.new("RGB", (256, 256), (200 - 30 * i, 220, 235))
    d = ImageDraw.Draw(img)
    d.ellipse((58, 20, 198, 120), fill=HAIR[i])
    d.ellipse((68, 40, 188, 200), fill=SKIN[i])
    d.ellipse((98, 95, 118, 110), fill="white")
    d.ellipse((138, 95, 158, 110), fill="white")
    d.ellipse((104, 98, 114, 108), fill=(40, 40, 90))
    d.ellipse((144, 98, 154, 108), fill=(40, 40, 90))
    d.line((128, 110, 122, 140, 132, 140), fill=(120, 70, 40), width=3)
    d.arc((103, 140, 153, 175), 20, 160, fill=(160, 40, 40), width=4)
    d.rectangle((88, 200, 168, 256), fill=(60 + 40 * i, 80, 140))
    return img


def main() -> None:
    names = []
    for i in range(4):
        name = f"faces/face_{i}.png"
        face(i).save(HERE / name)
        names.append(name)
    styles = ["Vibrant Color", "Watercolor", "Film Noir", "Neon", "Cyberpunk", "Pop Art"]
    with open(HERE / "demo_instantid.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt", "face_image", "style", "num_inference_steps", "seed"])
        for n in range(12):
            image = names[n % 4] if n % 3 else "https://example.com/portraits/person.jpg"
            w.writerow(
                [
                    f"portrait-{n:03d}",
                    f"photo of a person, portrait {n}",
                    image,
                    styles[n % len(styles)],
                    10,
                    1000 + n,
                ]
            )
    rows = [
        {
            "id": f"iy-{n:03d}",
            "prompt": f"a person in a library, scene {n}",
            "id_image": names[n % 4],
            "output_format": ["webp", "png", "jpg"][n % 3],
            "width": 512,
            "height": 640,
            "seed": 7000 + n,
        }
        for n in range(6)
    ]
    pq.write_table(pa.Table.from_pylist(rows), HERE / "demo_infinite_you.parquet")
    with open(HERE / "demo_mixed.jsonl", "w") as f:
        for n in range(8):
            if n % 2:
                row = {
                    "id": f"mix-{n}",
                    "model": "infinite-you",
                    "prompt": "portrait",
                    "id_image": names[n % 4],
                    "width": 384,
                    "height": 384,
                    # InfiniteYou's default seed is fixed (6255): rows alike but for it
                    # would each be billed for one same image.
                    "seed": 8000 + n,
                }
            else:
                row = {
                    "id": f"mix-{n}",
                    "model": "instantid",
                    "prompt": "portrait",
                    "face_image": names[n % 4],
                    "samples": 2,
                }
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
