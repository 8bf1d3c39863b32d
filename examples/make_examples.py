"""Draw the bundled example inputs: a bar chart, a text page, a landscape, a short clip of frames and
a short video file.

They are small on purpose (a few hundred 14 x 14 patches each) so that the quick start, a random
encoder of the released dimensions on a laptop CPU, finishes in seconds. Run from anywhere:

    python examples/make_examples.py
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

HERE = Path(__file__).resolve().parent


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def bar_chart(width: int = 224, height: int = 168) -> Image.Image:
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((width // 2, 4), "Tokens per image", fill="black", font=font(13), anchor="ma")
    left, bottom, top = 30, height - 22, 26
    d.line([(left, top), (left, bottom), (width - 8, bottom)], fill="black", width=1)
    values = [("doc", 0.9), ("photo", 0.55), ("chart", 0.35), ("icon", 0.12), ("page", 0.72)]
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]
    slot = (width - 8 - left) / len(values)
    for i, ((label, v), color) in enumerate(zip(values, colors, strict=True)):
        x0 = left + i * slot + 6
        x1 = left + (i + 1) * slot - 6
        d.rectangle([x0, bottom - v * (bottom - top), x1, bottom - 1], fill=color)
        d.text(((x0 + x1) / 2, bottom + 3), label, fill="black", font=font(10), anchor="ma")
    for frac in (0.25, 0.5, 0.75, 1.0):
        y = bottom - frac * (bottom - top)
        d.line([(left - 3, y), (left, y)], fill="black")
        d.text((left - 5, y), f"{frac:.2g}", fill="black", font=font(9), anchor="rm")
    return img


def text_page(width: int = 168, height: int = 224) -> Image.Image:
    img = Image.new("RGB", (width, height), "#fbfaf5")
    d = ImageDraw.Draw(img)
    d.text((10, 8), "Penguins", fill="#1a1a1a", font=font(18))
    lines = [
        "Penguins are flightless",
        "seabirds of the southern",
        "hemisphere. They swim",
        "with wings shaped into",
        "flippers and feed on",
        "krill, fish and squid.",
        "",
        "Emperor penguins breed",
        "in the Antarctic winter,",
        "huddling against the",
        "cold for months.",
    ]
    y = 36
    for line in lines:
        d.text((10, y), line, fill="#222222", font=font(11))
        y += 15
    d.line([(10, height - 14), (width - 10, height - 14)], fill="#999999")
    return img


def landscape(width: int = 196, height: int = 196) -> Image.Image:
    img = Image.new("RGB", (width, height))
    d = ImageDraw.Draw(img)
    for y in range(height):
        t = y / (height - 1)
        d.line([(0, y), (width, y)], fill=(int(70 + 150 * t), int(130 + 90 * t), int(220 - 40 * t)))
    d.ellipse([130, 26, 166, 62], fill=(255, 226, 140))
    d.polygon([(0, 130), (50, 90), (100, 125), (150, 80), (196, 120), (196, 196), (0, 196)], fill=(60, 110, 70))
    d.polygon([(0, 160), (70, 135), (140, 158), (196, 140), (196, 196), (0, 196)], fill=(40, 85, 50))
    return img.filter(ImageFilter.GaussianBlur(1.2))


def clip_frames(n: int = 4, width: int = 140, height: int = 112) -> list[Image.Image]:
    frames = []
    for i in range(n):
        img = Image.new("RGB", (width, height), "#e8f0f8")
        d = ImageDraw.Draw(img)
        x = 20 + i * (width - 60) / (n - 1)
        d.ellipse([x, 40, x + 28, 68], fill="#d04030")
        d.line([(0, 90), (width, 90)], fill="#445566", width=3)
        frames.append(img)
    return frames


def pan_video(path: Path, seconds: int = 4, rate: int = 12) -> None:
    """The landscape panned left to right, the sun setting, then a cut to the chart: H.264 in MP4, so
    that sampling at 1 fps keeps frames of both scenes and the cut starts a new key frame."""
    scene = landscape(392, 168)
    chart = bar_chart(224, 168)
    n = seconds * rate
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 224, 168, "yuv420p"
        stream.options = {"crf": "30"}
        for i in range(n):
            if i < 3 * n // 4:
                x = round(i * (scene.width - 224) / (3 * n // 4))
                img = scene.crop((x, 0, x + 224, 168))
                ImageDraw.Draw(img).ellipse([150 - x // 4, 30 + i, 180 - x // 4, 60 + i], fill=(255, 200, 120))
            else:
                img = chart
            frame = av.VideoFrame.from_ndarray(np.asarray(img.convert("RGB")), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main() -> None:
    bar_chart().save(HERE / "chart.png", optimize=True)
    text_page().save(HERE / "page.png", optimize=True)
    landscape().save(HERE / "landscape.png", optimize=True)
    (HERE / "clip").mkdir(exist_ok=True)
    for i, frame in enumerate(clip_frames()):
        frame.save(HERE / "clip" / f"frame_{i:03d}.png", optimize=True)
    pan_video(HERE / "pan.mp4")


if __name__ == "__main__":
    main()
