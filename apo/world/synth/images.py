"""X-ray-like frontal chest images drawn around real lung shapes.

The lung fields come from the 516 lung segmentation masks torchxrayvision ships
(`semantic_masks_v7labs_lungs.zip`, read from the installed package). Around them we draw what a reader of a PA film
expects to see: body, spine and mediastinum, heart, ribs and clavicles, vessels branching from the hila; then the
findings, each where and how radiologists describe it, so a model could learn them from pixels:
  pleural effusion   dense fluid filling the base with a meniscus climbing laterally, costophrenic angle blunted
  cardiomegaly       heart wider than half the thorax (cardiothoracic ratio 0.56-0.68 vs 0.40-0.47)
  pneumothorax       a dark rim at the apex/lateral lung with no vessel markings, bounded by a thin pleural line
  atelectasis        plate-like band of opacity at the base
  consolidation,     patchy confluent opacity in one zone (upper/mid/lower); pneumonia is drawn the same way
  pneumonia
  edema              perihilar haze on both sides with short septal (Kerley B) lines at the bases
  support devices    central line, PICC, pacemaker with leads, or endotracheal tube
Convention: the patient's right is the left of the image. Severity v in [0, 1] scales each finding's extent, which is
what the MS-CXR-T pairs vary between the previous and the current image.
"""

from __future__ import annotations

import functools
import io
import zipfile
from dataclasses import dataclass

import numpy as np

from apo.world.synth.reports import package_data

SIZE = 224
JPEG_QUALITY = 90
MASKS_ZIP = "semantic_masks_v7labs_lungs.zip"


@functools.lru_cache(maxsize=1)
def _zip():
    return zipfile.ZipFile(package_data(MASKS_ZIP))


@functools.lru_cache(maxsize=1)
def mask_names() -> tuple[str, ...]:
    return tuple(sorted(n for n in _zip().namelist() if n.lower().endswith((".png", ".jpg", ".jpeg"))))


@functools.lru_cache(maxsize=None)
def lung_pair(name: str):
    """(right lung, left lung) as boolean arrays cropped to the lungs' bounding box, or None if the mask is unusable
    (empty, one blob, fragments, odd proportions: a few of the 516 are)."""
    from PIL import Image
    from scipy import ndimage

    with Image.open(io.BytesIO(_zip().read(name))) as im:
        im.draft("L", (512, 512))  # JPEG masks decode at reduced size; PNGs ignore this
        g = im.convert("L")
    g.thumbnail((320, 320), Image.NEAREST)
    m = np.asarray(g) > 127
    if m.sum() < 400:
        return None
    lab, n = ndimage.label(m)
    if n < 2:
        return None
    areas = ndimage.sum_labels(m, lab, index=np.arange(1, n + 1))
    a, b = np.argsort(-areas)[:2] + 1
    if areas[b - 1] < 0.35 * areas[a - 1] or areas[a - 1] + areas[b - 1] < 0.9 * m.sum():
        return None
    ys, xs = np.nonzero((lab == a) | (lab == b))
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = y1 - y0, x1 - x0
    if not (0.7 <= h / w <= 1.35) or not (0.3 <= (areas[a - 1] + areas[b - 1]) / (h * w) <= 0.8):
        return None
    ca, cb = [np.nonzero(lab[y0:y1, x0:x1] == k)[1].mean() for k in (a, b)]
    if abs(ca - cb) < 0.3 * w:  # the two blobs must be side by side
        return None
    first, second = (a, b) if ca < cb else (b, a)  # image-left blob = patient's right lung
    return lab[y0:y1, x0:x1] == first, lab[y0:y1, x0:x1] == second


def usable_masks(n: int, rng) -> list[str]:
    """n distinct usable mask names in a seeded order (reads only as many masks as it needs)."""
    names = list(mask_names())
    order = rng.permutation(len(names))
    out = []
    for i in order:
        if lung_pair(names[i]) is not None:
            out.append(names[i])
            if len(out) == n:
                break
    return out


def _resize_mask(m: np.ndarray, w: int, h: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.BILINEAR)) > 127


@dataclass
class Anatomy:
    """One subject's fixed anatomy: lungs on the canvas plus the textures drawn from the subject's seed."""

    right: np.ndarray  # bool [SIZE, SIZE], patient's right lung (image left)
    left: np.ndarray
    box: tuple  # lung fields' bounding box y0, y1, x0, x1
    mid: float  # x of the mediastinum's centre
    ctr: float  # normal cardiothoracic ratio of this subject
    markings: np.ndarray  # vessel markings, float [SIZE, SIZE]
    ribs: np.ndarray
    base: float  # lung density
    exposure: tuple  # (contrast, brightness, gamma) of this subject's films

    def lung(self, side: str) -> np.ndarray:
        return self.right if side == "right" else self.left


def make_anatomy(mask_name: str, rng) -> Anatomy:
    right_c, left_c = lung_pair(mask_name)
    h0, w0 = right_c.shape
    w = int(rng.integers(146, 170))
    h = int(np.clip(round(w * h0 / w0), 130, 175))
    y0 = int(rng.integers(30, 40))
    x0 = int(SIZE // 2 - w // 2 + rng.integers(-4, 5))
    right = np.zeros((SIZE, SIZE), bool)
    left = np.zeros((SIZE, SIZE), bool)
    right[y0 : y0 + h, x0 : x0 + w] = _resize_mask(right_c, w, h)
    left[y0 : y0 + h, x0 : x0 + w] = _resize_mask(left_c, w, h)
    rx = np.nonzero(right.any(0))[0]
    lx = np.nonzero(left.any(0))[0]
    mid = (rx.max() + lx.min()) / 2 if len(rx) and len(lx) else SIZE / 2
    box = (y0, y0 + h, x0, x0 + w)
    return Anatomy(
        right,
        left,
        box,
        float(mid),
        float(rng.uniform(0.40, 0.47)),
        _markings(right, left, box, mid, rng),
        _ribs(box, mid, rng),
        float(rng.uniform(0.13, 0.19)),
        (float(rng.uniform(0.9, 1.1)), float(rng.uniform(-0.03, 0.03)), float(rng.uniform(0.9, 1.1))),
    )


def _markings(right, left, box, mid, rng) -> np.ndarray:
    """Vessels: random walks from each hilum towards the periphery, thinning and fading."""
    from PIL import Image, ImageDraw
    from scipy import ndimage

    y0, y1, x0, x1 = box
    layer = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(layer)
    for side, sign in (("right", -1), ("left", 1)):
        hx, hy = mid + sign * 0.1 * (x1 - x0), y0 + 0.45 * (y1 - y0)
        for _ in range(26):
            ang = rng.uniform(-1.25, 1.25) + (np.pi if sign < 0 else 0.0)  # fan out laterally
            ang += rng.uniform(-0.3, 0.3) * (1 if rng.random() < 0.5 else -1)
            x, y, width, val = hx, hy, 3, 255
            for _ in range(7):
                step = rng.uniform(7, 13)
                ang += rng.normal(0, 0.25)
                nx, ny = x + step * np.cos(ang), y + step * np.sin(ang) * 1.1
                draw.line([(x, y), (nx, ny)], fill=int(val), width=max(1, int(width)))
                x, y, width, val = nx, ny, width * 0.8, val * 0.8
    m = np.asarray(layer, np.float32) / 255.0
    m = ndimage.gaussian_filter(m, 0.8)
    return m * (right | left)


def _ribs(box, mid, rng) -> np.ndarray:
    """Posterior ribs (arcs sloping down laterally, evenly spaced) and clavicles, as a density layer."""
    y0, y1, x0, x1 = box
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    h, w = y1 - y0, x1 - x0
    dx = np.abs(xx - mid) / (w / 2)
    gap = h / 9.2
    first = y0 - 0.06 * h + rng.uniform(-0.03, 0.03) * h + 0.22 * h * dx**1.6 - 0.05 * h * dx
    k = np.rint((yy - first) / gap)  # nearest rib: ribs are 6-7 sigmas apart, the others add nothing visible
    dist = yy - first - k * gap
    out = np.exp(-((dist / 2.4) ** 2)) * (dx < 1.08) * (k >= 0) * (k <= 9)
    clav = y0 - 0.02 * h + 0.08 * h * dx - 0.06 * h * dx**2
    out += 1.6 * np.exp(-(((yy - clav) / 2.6) ** 2)) * (dx > 0.12) * (dx < 0.85)
    return out.astype(np.float32)


def _zone_rows(a: Anatomy, lung: np.ndarray, zone: str):
    ys = np.nonzero(lung.any(1))[0]
    top, bot = ys.min(), ys.max()
    h = bot - top
    lo, hi = {"upper": (0.08, 0.38), "mid": (0.35, 0.65), "lower": (0.58, 0.92)}[zone]
    return top + lo * h, top + hi * h


def render(a: Anatomy, findings: dict, rng) -> np.ndarray:
    """uint8 [SIZE, SIZE] image of the anatomy with `findings` {obs: {side, severity, zone, device}}.

    Placement within a finding comes from the finding's own "seed", so the same finding at another severity grows
    in place; `rng` drives what varies between studies of a subject (a little exposure jitter, noise), so a previous
    and a current image differ in the findings and hardly anything else.
    """
    from scipy import ndimage

    y0, y1, x0, x1 = a.box
    h, w = y1 - y0, x1 - x0
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    lungs = a.right | a.left
    # Body and abdomen.
    cy = y0 + 0.55 * h
    r = np.sqrt(((xx - a.mid) / (0.62 * w)) ** 2 + ((yy - cy) / (0.95 * h)) ** 2)
    d = 0.04 + 0.40 / (1 + np.exp((r - 1) * 14))
    bottom = np.full(SIZE, y1, np.float32)
    cols = lungs.any(0)
    bottom[cols] = SIZE - 1 - np.argmax(lungs[::-1, cols], axis=0)
    bottom = ndimage.uniform_filter1d(bottom, 9)
    d += 0.16 / (1 + np.exp(-(yy - bottom[None, :] - 2) / 3)) * (r < 1.05)
    # Mediastinum and spine: a column widening towards the heart; the trachea is an air column inside it.
    half = 0.07 * w + 0.05 * np.clip(yy - y0, 0, None)
    d = np.maximum(d, 0.66 * (np.abs(xx - a.mid) < half) * (yy > y0 - 0.3 * h))
    trachea = (np.abs(xx - a.mid - 1) < 4.5) & (yy < y0 + 0.27 * h)
    d = np.where(trachea, d - 0.22, d)
    # Lungs: dark, with vessel markings. A pneumothorax replaces the lung at its edge by air without markings.
    lung_d = a.base + 0.22 * a.markings
    f = findings.get("Pneumothorax")
    if f:
        v = float(f.get("severity", 0.5))
        for s in ["right", "left"] if f.get("side") == "bilateral" else [f.get("side")]:
            lung = a.lung(s)
            ys = np.nonzero(lung.any(1))[0]
            xs = np.nonzero(lung.any(0))[0]
            inner = ndimage.distance_transform_edt(lung)
            t = (xx - xs.min()) / max(1, xs.max() - xs.min())
            lateral = (t < 0.6) if s == "right" else (t > 0.4)
            lh = ys.max() - ys.min()
            zone = (yy < ys.min() + 0.25 * lh) | (lateral & (yy < ys.min() + 0.65 * lh))
            width = 3 + 14 * v
            air = lung & zone & (inner < width)
            line = lung & zone & (inner >= width) & (inner < width + 1.3)
            lung_d = np.where(air, 0.35 * a.base, lung_d) + 0.18 * line
    soft = ndimage.gaussian_filter(lungs.astype(np.float32), 1.5)
    d = d * (1 - soft) + soft * lung_d
    d += 0.06 * a.ribs * (r < 1.0)
    # Heart: an ellipse on the diaphragm, a third right and two thirds left of the midline; drawn after the lung
    # findings so an opacity never brightens the heart.
    ctr = a.ctr
    if "Cardiomegaly" in findings:
        ctr = 0.56 + 0.12 * findings["Cardiomegaly"].get("severity", 0.5)
    hw = ctr * w / 2
    hh = 0.20 * h + 0.25 * hw
    hcx, hcy = a.mid + hw / 3, y0 + 0.93 * h - hh
    heart = np.clip((1.25 - np.sqrt(((xx - hcx) / hw) ** 2 + ((yy - hcy) / hh) ** 2)) * 4, 0, 1)

    for obs, f in findings.items():
        v = float(f.get("severity", 0.5))
        place = np.random.default_rng(int(f.get("seed", 0)))  # where the finding sits: fixed across studies
        sides = ["right", "left"] if f.get("side") == "bilateral" else [f.get("side")]
        if obs == "Pleural Effusion":
            for s in sides:
                lung = a.lung(s)
                xs = np.nonzero(lung.any(0))[0]
                ys = np.nonzero(lung.any(1))[0]
                lat, med = (xs.min(), xs.max()) if s == "right" else (xs.max(), xs.min())
                t = np.clip((xx - med) / (lat - med), 0, 1)
                level = ys.max() - (0.10 + 0.38 * v) * (ys.max() - ys.min()) * (1 + 0.5 * t**2)
                region = (yy > level) & (np.abs(xx - (xs.min() + xs.max()) / 2) <= (xs.max() - xs.min()) / 2 + 2)
                region &= (lung | (yy > bottom[None, :] - 8)) & (yy < ys.max() + 8)
                fluid = ndimage.gaussian_filter(region.astype(np.float32), 2.0)
                d = d * (1 - fluid) + fluid * np.maximum(d, 0.60)
        elif obs == "Atelectasis":
            for s in sides:
                lung = a.lung(s)
                lo, hi = _zone_rows(a, lung, "lower")
                xs = np.nonzero(lung.any(0))[0]
                cx = xs.mean() + place.normal(0, 4)
                cyb = lo + 0.5 * (hi - lo) + place.normal(0, 3)
                tilt = place.uniform(-0.25, 0.25)
                u = (xx - cx) * np.cos(tilt) + (yy - cyb) * np.sin(tilt)
                vv = -(xx - cx) * np.sin(tilt) + (yy - cyb) * np.cos(tilt)
                band = np.exp(-((u / (0.3 * (xs.max() - xs.min()))) ** 4) - (vv / (1.5 + 3 * v)) ** 2)
                d += (0.34 * band + 0.14 * ndimage.gaussian_filter(band, 4)) * lung
        elif obs in ("Consolidation", "Pneumonia"):
            for s in sides:
                lung = a.lung(s)
                lo, hi = _zone_rows(a, lung, f.get("zone") or "lower")
                rows = np.clip(np.arange(int(lo), int(hi) + 1), 0, SIZE - 1)
                pts = np.argwhere(lung[rows])
                field = np.zeros((SIZE, SIZE), np.float32)
                for _ in range(5):
                    py, px = pts[int(place.integers(len(pts)))]
                    py += rows[0]
                    rad = place.uniform(6, 11) * (0.45 + 0.8 * v)
                    field += np.exp(-(((xx - px) ** 2 + (yy - py) ** 2) / (2 * rad**2)))
                field = np.clip(field, 0, 1.2) * ndimage.gaussian_filter(lung.astype(np.float32), 2)
                d += 0.36 * field * (1 - 0.5 * a.markings)
        elif obs == "Edema":
            for s, sign in (("right", -1), ("left", 1)):
                lung = a.lung(s)
                hx, hy = a.mid + sign * 0.16 * w, y0 + 0.5 * h
                sig = 0.22 * w * (0.7 + 0.6 * v)
                haze = np.exp(-(((xx - hx) ** 2 + (yy - hy) ** 2) / (2 * sig**2)))
                d += (0.08 + 0.30 * v) * haze * ndimage.gaussian_filter(lung.astype(np.float32), 2)
                xs = np.nonzero(lung.any(0))[0]
                lat = xs.min() if s == "right" else xs.max()
                for k in range(4 + int(3 * v)):  # Kerley B: short horizontal lines at the lateral bases
                    ky = y0 + (0.72 + 0.045 * k) * h
                    kl = (np.abs(yy - ky) < 0.8) & (np.abs(xx - (lat - sign * 7)) < 6)
                    d += 0.12 * (kl & lung)
    d = np.maximum(d, 0.68 * heart)
    d = ndimage.gaussian_filter(d, 0.7)
    if "Support Devices" in findings:
        d = np.maximum(d, _device(a, findings["Support Devices"], heart_center=(hcx, hcy, hw, hh)))
    # The subject's exposure, jittered a little per study, and quantum noise.
    contrast, brightness, gamma = a.exposure
    d = (d - 0.3) * contrast * rng.uniform(0.98, 1.02) + 0.3 + brightness + rng.uniform(-0.008, 0.008)
    d += rng.normal(0, 0.012, d.shape)
    img = np.clip(d, 0, 1) ** (gamma * rng.uniform(0.98, 1.02))
    return (img * 255 + 0.5).astype(np.uint8)


def _device(a: Anatomy, f: dict, heart_center) -> np.ndarray:
    """A radiopaque device as a density layer."""
    from PIL import Image, ImageDraw
    from scipy import ndimage

    y0, y1, x0, x1 = a.box
    h, w = y1 - y0, x1 - x0
    hcx, hcy, hw, hh = heart_center
    layer = Image.new("L", (SIZE, SIZE), 0)
    dr = ImageDraw.Draw(layer)
    kind, side = f.get("device", "central_line"), f.get("side") or "right"
    sx = -1 if side == "right" else 1  # image direction of the device's side
    svc = (a.mid - 0.06 * w, y0 + 0.30 * h)
    if kind == "central_line":
        pts = [
            (a.mid + sx * 0.16 * w, y0 - 30),
            (a.mid + sx * 0.12 * w, y0 - 6),
            (a.mid + sx * 0.06 * w, y0 + 0.1 * h),
            (svc[0], y0 + 0.2 * h),
            svc,
        ]
        dr.line(pts, fill=245, width=2, joint="curve")
    elif kind == "picc":
        pts = [
            (0 if sx < 0 else SIZE - 1, y0 + 0.02 * h),
            (a.mid + sx * 0.45 * w, y0 - 2),
            (a.mid + sx * 0.2 * w, y0 + 0.04 * h),
            (svc[0], y0 + 0.18 * h),
            (svc[0] + 1, y0 + 0.42 * h),
        ]
        dr.line(pts, fill=240, width=2, joint="curve")
    elif kind == "pacemaker":
        gx, gy = a.mid + sx * 0.33 * w, y0 + 0.02 * h
        dr.rounded_rectangle([gx - 9, gy - 6, gx + 9, gy + 6], radius=4, fill=250)
        for tip in ((hcx - 0.5 * hw, hcy - 0.6 * hh), (hcx + 0.3 * hw, hcy + 0.5 * hh)):
            dr.line(
                [(gx, gy), (a.mid + sx * 0.1 * w, y0 + 0.08 * h), (svc[0], svc[1] + 4), tip],
                fill=235,
                width=2,
                joint="curve",
            )
    else:  # endotracheal tube: two parallel walls down the trachea
        for off in (-3, 3):
            dr.line([(a.mid + off, 0), (a.mid + off, y0 + 0.12 * h)], fill=220, width=1)
    m = np.asarray(layer, np.float32) / 255.0
    return ndimage.gaussian_filter(m, 0.5) * 1.05


def resize(arr: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """The rendered [SIZE, SIZE] image upscaled to `size` (width, height); unchanged for None or SIZE x SIZE."""
    if size is None or tuple(size) == (SIZE, SIZE):
        return arr
    from PIL import Image

    return np.asarray(Image.fromarray(arr, "L").resize(tuple(size), Image.BICUBIC))


def jpeg_roundtrip(arr: np.ndarray) -> np.ndarray:
    """The image as a reader of the saved JPEG gets it (same quality as `save_jpeg`), without touching the disk."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=JPEG_QUALITY)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("L"))


def save_jpeg(arr: np.ndarray, path) -> None:
    """Grayscale JPEG with fixed settings, so the same array always gives the same bytes."""
    from PIL import Image

    Image.fromarray(arr, "L").save(
        path, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False, subsampling=0
    )
