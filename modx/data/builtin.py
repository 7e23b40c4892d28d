"""Built-in offline image-text datasets for the demo and tests (nothing is downloaded).

- ``digits``: scikit-learn's 1797 real 8x8 handwritten digits, upscaled to 32 px.
- ``textiles``: the 2000 simulated textile images of the ``conformal-clip-data`` package
  (nominal / local defect / global defect; where a local defect lies), 64 px.
- ``shapes``: procedurally drawn coloured shapes (shape x colour x size x position), 32 px.

Every image has 4-5 caption templates that all name its class and the attributes computed
from its own pixels (digits: stroke weight, slant, horizontal position; textiles: brightness,
contrast, grain, darkest quarter, where a local defect lies; shapes: size, colour, position,
background), so that most images get a caption of their own. All go to ``KEY.json``
``"captions"``, the first to ``KEY.txt``.
Read in this order they make a continual stream: handwriting, industrial textures,
synthetic scenes.
"""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import random
import shutil
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from tqdm import tqdm

from modx.data.sources import split_of
from modx.data.writer import write_shards

VERSION = 5  # bump when the generated data changes; ensure_builtin then rebuilds (5: val splits)

_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

Item = tuple[str, Image.Image, list[str], dict]  # key, image, captions, metadata


def tercile_levels(values: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """0 / 1 / 2 for the lower / middle / upper third of ``values`` (each group's own
    thirds when ``groups`` is given, e.g. stroke weight compared within one digit class)."""
    values = np.asarray(values, dtype=np.float64)
    groups = np.zeros(len(values), int) if groups is None else np.asarray(groups)
    levels = np.zeros(len(values), dtype=np.int64)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        ranks = np.argsort(np.argsort(values[idx], kind="stable"), kind="stable")  # 0..n-1
        levels[idx] = 3 * ranks // len(idx)
    return levels


def digit_features(pixels: np.ndarray) -> dict[str, float]:
    """Ink mass, slant and horizontal centre of one digit image (ink bright, any size).

    ``ink`` is the pixel sum; ``slant`` is the shear -mu11 / mu02 of the central second
    moments (y down, so > 0 when the top leans right); ``x`` is the ink centroid's column
    relative to the image centre, in fractions of the width (< 0 left of centre)."""
    a = np.asarray(pixels, dtype=np.float64)  # (H, W)
    ys, xs = np.mgrid[0 : a.shape[0], 0 : a.shape[1]]
    mass = a.sum()
    cx, cy = (a * xs).sum() / mass, (a * ys).sum() / mass
    mu11 = (a * (xs - cx) * (ys - cy)).sum() / mass
    mu02 = (a * (ys - cy) ** 2).sum() / mass
    return {
        "ink": float(mass),
        "slant": float(-mu11 / max(mu02, 1e-9)),
        "x": float(cx / (a.shape[1] - 1) - 0.5),
    }


_WEIGHT = (("thin", "thin strokes"), ("regular", "regular strokes"), ("bold", "thick bold strokes"))
_SLANT = (
    ("left-leaning", "slanted to the left"),
    ("upright", "standing upright"),
    ("right-leaning", "slanted to the right"),
)
_XPOS = (
    ("left of centre", "shifted to the left"),
    ("centred", "in the middle"),
    ("right of centre", "shifted to the right"),
)


def _digit_captions(n: int, weight: int, slant: int, xpos: int) -> list[str]:
    word = _WORDS[n]
    (w, ws), (s, ss), (p, ps) = _WEIGHT[weight], _SLANT[slant], _XPOS[xpos]
    return [
        f"a {w} {s} handwritten digit {n}, {p}",
        f"the number {word} in {ws}, {ss}, {ps}",
        f"a low resolution scan of {'an' if s == 'upright' else 'a'} {s} handwritten {word}"
        f" with {ws}, {p}",
        f"the digit {word} ({n}) written by hand: {w}, {s}, {p}",
        f"a white {word} on a black background, {ss}, {w}, {ps}",
    ]


def _digits(seed: int) -> Iterator[Item]:
    from sklearn.datasets import load_digits

    data = load_digits()
    labels = np.asarray(data.target)
    feats = [digit_features(p) for p in data.images]
    # each attribute in thirds within the digit's class: a bold 1 has less ink than a thin 8
    weight, slant, xpos = (
        tercile_levels([f[k] for f in feats], labels) for k in ("ink", "slant", "x")
    )
    for i, (pixels, label) in enumerate(zip(data.images, labels)):
        gray = (np.asarray(pixels) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(gray, "L").resize((32, 32), Image.BILINEAR).convert("RGB")
        n = int(label)
        attrs = {
            "weight": _WEIGHT[weight[i]][0],
            "slant": _SLANT[slant[i]][0],
            "position": _XPOS[xpos[i]][0],
        }
        captions = _digit_captions(n, weight[i], slant[i], xpos[i])
        yield f"digit{i:05d}", img, captions, {"label": n, "class": _WORDS[n], **attrs}


_PLACE_NAMES = {
    ("top", "left"): "top left", ("top", "centre"): "top", ("top", "right"): "top right",
    ("middle", "left"): "left", ("middle", "centre"): "centre", ("middle", "right"): "right",
    ("bottom", "left"): "bottom left", ("bottom", "centre"): "bottom",
    ("bottom", "right"): "bottom right",
}  # fmt: skip


def defect_place(gray: np.ndarray, margin: int = 12) -> str | None:
    """Where the strongest small texture anomaly of a full-size textile image lies ("top
    left", ..., "centre"), or None when no spot stands out: the peak of the high-pass
    energy averaged over 15 px windows must exceed 2.3 times its median."""
    a = gray.astype(np.float32)
    high = a - ndimage.uniform_filter(a, 5, mode="reflect")
    energy = ndimage.uniform_filter(high * high, 15, mode="reflect")[margin:-margin, margin:-margin]
    if energy.max() < 2.3 * np.median(energy):
        return None
    y, x = np.unravel_index(np.argmax(energy), energy.shape)
    row = ("top", "middle", "bottom")[min(2, 3 * (y + margin) // a.shape[0])]
    col = ("left", "centre", "right")[min(2, 3 * (x + margin) // a.shape[1])]
    return _PLACE_NAMES[row, col]


_QUARTERS = ("top left", "top right", "bottom left", "bottom right")


def textile_features(gray: np.ndarray) -> dict:
    """Brightness (mean), contrast (standard deviation), grain and darkest quarter of a
    grey textile image.

    ``grain`` is the share of the variance left after a 3 px box blur: high for a fine,
    pixel-level texture, low for coarse streaks and blotches. ``darkest`` names the
    quarter with the lowest mean ("top left", ...)."""
    a = np.asarray(gray, dtype=np.float32)  # (H, W)
    high = a - ndimage.uniform_filter(a, 3, mode="reflect")
    h, w = a.shape[0] // 2, a.shape[1] // 2
    quarters = [a[:h, :w].mean(), a[:h, w:].mean(), a[h:, :w].mean(), a[h:, w:].mean()]
    return {
        "brightness": float(a.mean()),
        "contrast": float(a.std()),
        "grain": float((high * high).mean() / max(float(a.var()), 1e-9)),
        "darkest": _QUARTERS[int(np.argmin(quarters))],
    }


_SHADE = (("dark", "dark grey"), ("mid-grey", "mid grey"), ("light", "light grey"))
_CONTRAST = (
    ("low-contrast", "faint streaks"),
    ("medium-contrast", "moderate streaks"),
    ("high-contrast", "strong streaks"),
)
_GRAIN = ("coarse", "medium", "fine")
_DEFECT = {
    "nominal": ("with no defect", "defect-free", "without flaws"),
    "local": ("with a local defect", "with one small localized flaw", "with a small defect spot"),
    "global": (
        "with a global defect",
        "with a defect spread over the whole surface",
        "with a global distortion of its texture",
    ),
}


def _textile_captions(
    cls: str, place: str | None, shade: int, contrast: int, grain: int, darkest: str
) -> list[str]:
    (s, sg), (c, cs), g = _SHADE[shade], _CONTRAST[contrast], _GRAIN[grain]
    d1, d2, d3 = _DEFECT[cls]
    if cls == "local" and place is not None:
        d1, d2, d3 = (f"{d} at the {place}" for d in (d1, d2, d3))
    first = "a nominal" if cls == "nominal" else "a"
    return [
        f"{first} {s} {c} textile {d1}, {g} grain, darkest at the {darkest}",
        f"a photo of {sg} fabric with {cs} and a {g} grain, {d2}, shaded towards the {darkest}",
        f"a {g}-grained woven textile surface, {s} and {c}, darker at the {darkest}, {d3}",
        f"{sg} fabric {d1}: {c}, {g} grain, its {darkest} quarter darkest",
    ]


def _textile_images() -> Iterator[tuple[str, str, Image.Image, str | None]]:
    import conformal_clip_data as ccd

    dirs = {"nominal": ccd.nominal_dir(), "local": ccd.local_dir(), "global": ccd.global_dir()}
    for cls, directory in dirs.items():
        for name in sorted(os.listdir(directory)):
            if not name.lower().endswith((".jpg", ".jpeg", ".png")):
                continue
            place = None
            with Image.open(os.path.join(directory, name)) as img:
                if cls == "local":  # find the defect at full resolution
                    img = img.convert("RGB")
                    place = defect_place(np.asarray(img.convert("L")))
                else:
                    img.draft("RGB", (64, 64))  # JPEG: decode at reduced scale
                    img = img.convert("RGB")
                img = img.resize((64, 64), Image.BILINEAR)
            yield f"{cls}{os.path.splitext(name)[0].split('_')[-1]}", cls, img, place


def _textiles(seed: int) -> Iterator[Item]:
    items = list(_textile_images())
    classes = np.array([cls for _, cls, _, _ in items])
    feats = [textile_features(np.asarray(img.convert("L"))) for _, _, img, _ in items]
    # brightness in thirds of the whole set; contrast and grain within the class, since
    # global defects are fainter and finer than nominal fabric as a whole
    shade = tercile_levels([f["brightness"] for f in feats])
    contrast = tercile_levels([f["contrast"] for f in feats], classes)
    grain = tercile_levels([f["grain"] for f in feats], classes)
    labels = {"nominal": 0, "local": 1, "global": 2}
    for i, (key, cls, img, place) in enumerate(items):
        meta = {
            "label": labels[cls],
            "class": cls,
            "place": place,
            "brightness": _SHADE[shade[i]][0],
            "contrast": _CONTRAST[contrast[i]][0],
            "grain": _GRAIN[grain[i]],
            "darkest": feats[i]["darkest"],
        }
        captions = _textile_captions(cls, place, shade[i], contrast[i], grain[i], meta["darkest"])
        yield key, img, captions, meta


_COLOURS = {
    "red": (220, 30, 30),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "cyan": (40, 210, 220),
}
_SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
_PLACES = {
    "left": (0.3, 0.5),
    "right": (0.7, 0.5),
    "top": (0.5, 0.3),
    "bottom": (0.5, 0.7),
    "centre": (0.5, 0.5),
}
_BACKGROUNDS = {"black": (0, 0, 0), "gray": (110, 110, 110)}


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        angles = [-90, 30, 150]
    elif shape == "diamond":
        angles = [-90, 0, 90, 180]
    elif shape == "square":
        angles = [-135, -45, 45, 135]
    else:  # star: ten points alternating between r and r / 2.4
        pts = []
        for k in range(10):
            a, rr = math.radians(-90 + 36 * k), r if k % 2 == 0 else r / 2.4
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    return [
        (cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in angles
    ]


def draw_shape(shape: str, colour: str, size: str, place: str, background: str) -> Image.Image:
    """Render one 32 px scene (drawn at 128 px and downsampled for smooth edges)."""
    s = 128
    img = Image.new("RGB", (s, s), _BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    fx, fy = _PLACES[place]
    cx, cy, r = fx * s, fy * s, s * (0.26 if size == "large" else 0.13)
    fill = _COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "cross":
        w = r / 2.8
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)
    return img.resize((32, 32), Image.LANCZOS)


def _shapes(seed: int, n: int = 4000) -> Iterator[Item]:
    rng = random.Random(seed)
    for i in range(n):
        shape, colour = rng.choice(_SHAPES), rng.choice(list(_COLOURS))
        size, place = rng.choice(("small", "large")), rng.choice(list(_PLACES))
        background = (
            "gray" if colour in ("white", "yellow", "cyan") else rng.choice(list(_BACKGROUNDS))
        )
        captions = [
            f"a {size} {colour} {shape} at the {place} on a {background} background",
            f"a drawing of a {colour} {shape}, {size}, at the {place}, {background} background",
            f"a picture of one {size} {shape}, coloured {colour}, at the {place} over {background}",
            f"{shape}, {colour}, {size}, {place}, {background} background",
            f"a {background} picture with a {colour} {shape} ({size}) at the {place}",
        ]
        meta = {
            "shape": shape,
            "colour": colour,
            "size": size,
            "place": place,
            "background": background,
            "class": shape,
        }
        yield f"shape{i:05d}", draw_shape(shape, colour, size, place, background), captions, meta


BUILTINS: dict[str, Callable[[int], Iterator[Item]]] = {
    "digits": _digits,
    "textiles": _textiles,
    "shapes": _shapes,
}
STREAM = ("digits", "textiles", "shapes")  # the demo's continual order

# Zero-shot classification sets of the built-in data (modx.data.benchmark builds them from
# the test split): the metadata "class" values in label order, the class names put into
# the prompt templates, and the templates, in the vocabulary of the captions.
ZEROSHOT: dict[str, tuple[list[str], list[str], list[str]]] = {
    "digits": (
        list(_WORDS),
        list(_WORDS),
        ["a handwritten digit {c}.", "the number {c} written by hand.",
         "a low resolution scan of a handwritten {c}.", "a white {c} on a black background."],
    ),
    "textiles": (
        ["nominal", "local", "global"],
        ["with no defect", "with a local defect", "with a global defect"],
        ["a textile {c}.", "a photo of fabric {c}.", "a woven textile surface {c}."],
    ),
    "shapes": (
        list(_SHAPES),
        list(_SHAPES),
        ["a drawing of a {c}.", "a picture of one {c}.", "a {c} on a background.", "{c}."],
    ),
}  # fmt: skip


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def builtin_samples(name: str, seed: int = 0) -> Iterator[dict]:
    """The shard samples (``__key__``, ``png``, ``txt``, ``json``) of a built-in dataset."""
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in dataset {name!r}; choose from {sorted(BUILTINS)}")
    for key, img, captions, meta in BUILTINS[name](seed):
        yield {
            "__key__": key,
            "png": _png(img),
            "txt": captions[0],
            "json": {"captions": captions, "domain": name, **meta},
        }


class Splits(NamedTuple):
    """Shard URLs of a built-in dataset's splits (None: the split is empty)."""

    train: str
    val: str | None
    test: str | None


SPLITS = ("train", "val", "test")


def _brace(directory: str, prefix: str, n: int) -> str:
    if n == 1:
        return os.path.join(directory, f"{prefix}-000000.tar")
    return os.path.join(directory, f"{prefix}-{{000000..{n - 1:06d}}}.tar")


def _urls(directory: str, counts: dict[str, int]) -> Splits:
    """The splits' URLs from their shard counts (``builtin.json``'s ``"shards"``)."""
    return Splits(*(_brace(directory, s, counts[s]) if counts.get(s) else None for s in SPLITS))


def _options(num_shards: int, test_fraction: float, val_fraction: float, seed: int) -> dict:
    return {
        "version": VERSION,
        "num_shards": num_shards,
        "test_fraction": test_fraction,
        "val_fraction": val_fraction,
        "seed": seed,
    }


def build_builtin(
    name: str,
    out_dir: str,
    *,
    num_shards: int = 4,
    test_fraction: float = 0.1,
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = False,
) -> Splits:
    """Write train/val/test shards of a built-in dataset to ``out_dir`` (and ``builtin.json``
    recording how); return their URLs. The splits are disjoint by sample key
    (``split_of``): test is what it was before val splits existed (the same keys for the
    same ``test_fraction`` and ``seed``), val is carved from the former training keys."""
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in dataset {name!r}; choose from {sorted(BUILTINS)}")
    items = list(tqdm(builtin_samples(name, seed), desc=name, unit="img", disable=not progress))
    split = {s: [] for s in SPLITS}
    for sample in items:
        split[split_of(sample["__key__"], test_fraction, seed, val_fraction)].append(sample)
    random.Random(seed).shuffle(split["train"])  # mix classes across shards (textiles come sorted)
    per_shard = math.ceil(len(split["train"]) / max(1, num_shards))
    counts = {"train": len(write_shards(split["train"], out_dir, "train", per_shard))}
    for s in ("val", "test"):
        counts[s] = len(write_shards(split[s], out_dir, s, max(1, len(split[s]))))
    info = {"name": name, "options": _options(num_shards, test_fraction, val_fraction, seed)}
    with open(os.path.join(out_dir, "builtin.json"), "w") as f:
        json.dump({**info, "shards": counts, "samples": {s: len(v) for s, v in split.items()}}, f, indent=1)
    return _urls(out_dir, counts)


def ensure_builtin(
    name: str,
    root: str = "data",
    *,
    num_shards: int = 4,
    test_fraction: float = 0.1,
    val_fraction: float = 0.1,
    seed: int = 0,
    force: bool = False,
) -> tuple[str, str | None]:
    """Build ``root/name/{train,val,test}-*.tar`` unless present; return (train_urls, eval_urls)
    (``ensure_builtin_splits`` gives the val URLs too).

    Idempotent (a ``builtin.json`` with the same options means "already built") and safe to
    call from several ranks at once: a file lock serialises the build, and the finished
    folder replaces the old one in one rename.
    """
    splits = ensure_builtin_splits(name, root, num_shards=num_shards, test_fraction=test_fraction,
                                   val_fraction=val_fraction, seed=seed, force=force)
    return splits.train, splits.test


def ensure_builtin_splits(
    name: str,
    root: str = "data",
    *,
    classes: Sequence[str] | None = None,
    num_shards: int = 4,
    test_fraction: float = 0.1,
    val_fraction: float = 0.1,
    seed: int = 0,
    force: bool = False,
) -> Splits:
    """``ensure_builtin`` with every split: (train, val, test) URLs. ``classes``: a narrow
    subset of the dataset (metadata "class" values, e.g. ``["zero", "one"]`` of digits), its
    splits the full dataset's splits filtered to those classes, at ``root/NAME.CLS+CLS``."""
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in dataset {name!r}; choose from {sorted(BUILTINS)}")
    options = _options(num_shards, test_fraction, val_fraction, seed)
    if classes is not None:
        classes = check_classes(name, classes)
        full = ensure_builtin_splits(name, root, num_shards=num_shards, test_fraction=test_fraction,
                                     val_fraction=val_fraction, seed=seed, force=force)
        info = {"name": name, "classes": classes, "options": options}
        return _locked_build(root, subset_name(name, classes), info, force,
                             lambda tmp: _write_subset(full, classes, tmp, num_shards, info))

    def build(tmp: str) -> None:
        build_builtin(name, tmp, num_shards=num_shards, test_fraction=test_fraction,
                      val_fraction=val_fraction, seed=seed)

    return _locked_build(root, name, {"name": name, "options": options}, force, build)


def check_classes(name: str, classes: Sequence[str]) -> list[str]:
    """``classes`` of built-in dataset ``name`` in label order; ValueError names the bad one."""
    values = ZEROSHOT[name][0]
    bad = [c for c in classes if c not in values]
    if bad or not classes:
        what = f"no class {bad[0]!r}" if bad else "an empty class list"
        raise ValueError(f"built-in dataset {name!r} has {what}; its classes are {values}")
    return [v for v in values if v in set(classes)]


def subset_name(name: str, classes: Sequence[str]) -> str:
    """The directory (and default eval-set) name of a class subset: ``digits.zero+one``."""
    return f"{name}.{'+'.join(check_classes(name, classes))}"


def _locked_build(root: str, dirname: str, info: dict, force: bool, build: Callable[[str], None]) -> Splits:
    """``root/dirname`` built by ``build(tmp)`` unless its builtin.json holds ``info`` already;
    a file lock serialises builders, the finished folder replaces the old one in one rename."""
    target = os.path.join(root, dirname)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".{dirname}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = os.path.join(target, "builtin.json")
        if not force and os.path.isfile(marker):
            with open(marker) as f:
                built = json.load(f)
            if {k: built.get(k) for k in info} == info and "shards" in built:
                return _urls(target, built["shards"])
        tmp = os.path.join(root, f".{dirname}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        with open(marker) as f:
            return _urls(target, json.load(f)["shards"])


def _write_subset(full: Splits, classes: list[str], out_dir: str, num_shards: int, info: dict) -> None:
    """Write the samples of ``classes`` from every split of ``full`` to ``out_dir``."""
    from modx.data.samples import tar_samples
    from modx.data.stats import SkipStats
    from modx.data.urls import parse_sources

    counts, sizes = {}, {}
    for split, urls in zip(SPLITS, full):
        shards = [u for src in parse_sources(urls) for u in src.urls] if urls else []
        kept = [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
                for s in tar_samples(({"url": u} for u in shards), SkipStats())
                if json.loads(s["json"])["class"] in classes]  # fmt: skip
        per_shard = math.ceil(len(kept) / num_shards) if split == "train" else len(kept)
        counts[split] = len(write_shards(kept, out_dir, split, max(1, per_shard)))
        sizes[split] = len(kept)
    with open(os.path.join(out_dir, "builtin.json"), "w") as f:
        json.dump({**info, "shards": counts, "samples": sizes}, f, indent=1)
