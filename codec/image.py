"""Image I/O for the codec: any image -> 8-bit RGB (noting each conversion), tensors, atomic PNG.

This is the project's one image loader: the CLI, the evaluation scripts and the training data
all read images through it, so they agree on every conversion.
"""

import io
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from codec.bitstream import write_atomic

MAX_DECODE_PIXELS = 1 << 26  # 64 Mpx: refuse before decoding pixels (the codec's own limit is lower)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")


class ImageError(ValueError):
    """The input is missing, not an image, or cannot be handled."""


def _convert(im: Image.Image, notes: list[str]) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit gray: scale to 8 bit, not clip
        notes.append("16-bit grayscale scaled to 8-bit RGB")
        a = np.asarray(im, dtype=np.float64) / 257.0
        im = Image.fromarray(a.round().clip(0, 255).astype(np.uint8))
    elif mode == "F":
        notes.append("32-bit float image clipped to [0, 255] and converted to 8-bit RGB")
        im = Image.fromarray(np.asarray(im, dtype=np.float64).round().clip(0, 255).astype(np.uint8))
    elif mode in ("1", "L"):
        notes.append(("1-bit" if mode == "1" else "grayscale") + " converted to RGB")
    elif mode in ("LA", "La"):
        notes.append("grayscale converted to RGB, alpha channel discarded")
    elif mode in ("RGBA", "RGBa"):
        notes.append("alpha channel discarded")
    elif mode in ("P", "PA"):
        alpha = mode == "PA" or "transparency" in im.info
        notes.append("palette converted to RGB" + (", transparency discarded" if alpha else ""))
    elif mode != "RGB":
        notes.append(f"{mode} converted to RGB")
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def load_image(path: str | os.PathLike, max_pixels: int = MAX_DECODE_PIXELS) -> tuple[np.ndarray, list[str]]:
    """Load any image file as (H, W, 3) uint8 RGB.

    Returns:
        (pixels, notes): notes say what was converted ("alpha channel discarded", ...).
    Raises:
        ImageError: missing/unreadable file, not an image, or more than max_pixels pixels.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError("no such file")
    if path.is_dir():
        raise ImageError("is a directory")
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: we check the size ourselves
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError(f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}")
                if any(";16" in str(getattr(t, "args", "")) for t in (im.tile or [])) and im.mode == "RGB":
                    notes.append("16-bit per channel reduced to 8-bit")
                if getattr(im, "n_frames", 1) > 1:
                    notes.append(f"first of {im.n_frames} frames used")
                x = _convert(im, notes)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"image is above the limit of {max_pixels} pixels") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image (or an unsupported format)") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as e:
        raise ImageError(f"cannot decode image: {e}") from None
    if x.ndim != 3 or x.shape[2] != 3 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ImageError(f"unexpected image shape {x.shape}")
    return x, notes


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """load_image without the conversion notes."""
    return load_image(path)[0]


def find_images(root: str | os.PathLike) -> list[Path]:
    """All image files under `root` (recursive, sorted by path), as CompressAI's tools find them."""
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def to_tensor(x: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(device).permute(2, 0, 1)[None].float() / 255.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) float in [0, 1] -> (H, W, 3) uint8 (clamped, rounded half to even)."""
    return (x[0].detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def png_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(x), "RGB").save(buf, "PNG")
    return buf.getvalue()


def save_png(x: np.ndarray, path: str | os.PathLike) -> None:
    """Write an (H, W, 3) uint8 image as PNG via a temporary file and a rename."""
    write_atomic(path, png_bytes(x))


def image_pixels(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """An (H, W, 3) uint8 array, or a (1|-, 3, H, W) tensor (uint8, or float in [0, 1]), as a (1, 3, H, W)
    tensor: uint8 stays uint8 (a view of the array; the networks convert one tile at a time), else float."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
        with warnings.catch_warnings():  # a read-only array (np.asarray of a PIL image) is only ever read
            warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
            return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    x = image if image.ndim == 4 else image[None]
    if x.shape[0] != 1 or x.shape[1] != 3:
        raise ValueError(f"expected a (1, 3, H, W) tensor, got {tuple(image.shape)}")
    return x if x.dtype == torch.uint8 else x.float()
