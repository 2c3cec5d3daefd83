"""Datasets read from local files, with augmentation that a resumed run repeats exactly.

Every training sample's augmentation is drawn from its own generator seeded
by ``(seed, epoch, index)``, so a batch depends on nothing but its position in
the epoch: not on worker processes, not on when the run was interrupted.

Supported sources (no downloads):

``cifar10``   ``<data>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``
``cifar100``  ``<data>/cifar-100-python/{train, test, meta}``
              (the python-version archives from https://www.cs.toronto.edu/~kriz/cifar.html, unpacked)
``imagenet``  an ImageFolder tree ``<data>/train/<class>/<image>`` and ``<data>/val/<class>/<image>``,
              decoded with Pillow (torchvision is not needed)
``digits``    scikit-learn's bundled 8x8 handwritten digits, upsampled to 32x32, fixed 80/20 split
"""
from __future__ import annotations

import copy
import itertools
import math
import pickle
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..extras import require

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng((seed, epoch, index))


def _normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``[C, H, W]`` -> float ``(x / 255 - mean) / std``."""
    return (images.float().div_(255) - mean[:, None, None]) / std[:, None, None]


class InMemoryImages(Dataset):
    """uint8 images ``[N, C, H, W]`` with labels; items are ``(image, label)``.

    Keys are ``(index, epoch)``. With ``crop_padding = p`` a training sample is
    zero-padded by ``p`` pixels and cropped back at a random offset; with
    ``flip`` it is mirrored with probability 1/2.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std,
                 crop_padding: int = 0, flip: bool = False, seed: int = 0):
        self.images, self.labels = images, labels
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        self.crop_padding, self.flip, self.seed = crop_padding, flip, seed

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> InMemoryImages:
        return InMemoryImages(self.images[indices], self.labels[indices], self.mean, self.std,
                              self.crop_padding, self.flip, self.seed)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        image = self.images[index]
        if self.crop_padding or self.flip:
            rng = sample_rng(self.seed, epoch, index)
            if self.crop_padding:
                p = self.crop_padding
                top, left = rng.integers(0, 2 * p + 1, size=2)
                height, width = image.shape[1:]
                image = F.pad(image, (p, p, p, p))[:, top:top + height, left:left + width]
            if self.flip and rng.random() < 0.5:
                image = image.flip(2)
        return _normalise(image, self.mean, self.std), int(self.labels[index])


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 ``[N, C, H, W]`` images scaled to [0, 1]."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        block = images[start:start + chunk].to(torch.float64).div_(255)
        total += block.sum((0, 2, 3))
        squares += block.square().sum((0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()


# --- CIFAR ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: bytes
    names_key: bytes


CIFAR = {
    "cifar10": _CifarLayout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                            ("test_batch",), "batches.meta", b"labels", b"label_names"),
    "cifar100": _CifarLayout("cifar-100-python", ("train",), ("test",), "meta",
                             b"fine_labels", b"fine_label_names"),
}


def _cifar_folder(root: Path, layout: _CifarLayout, name: str) -> Path:
    """``root`` itself or ``root/<layout.folder>``, whichever holds every file."""
    expected = [*layout.train, *layout.test, layout.meta]
    for folder in (root / layout.folder, root):
        if all((folder / f).is_file() for f in expected):
            return folder
    folder = root / layout.folder if (root / layout.folder).is_dir() else root
    missing = [f for f in expected if not (folder / f).is_file()]
    raise FileNotFoundError(
        f"{name} not found under --data {str(root)!r}: expected "
        f"{root / layout.folder}/{{{', '.join(expected)}}} (the python-version archive, "
        f"unpacked); missing in {folder}: {', '.join(missing)}")


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _read_cifar_batches(folder: Path, files, label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name in files:
        batch = _unpickle(folder / name)
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch[label_key])
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)


def load_cifar(name: str, root: str | Path):
    """``(train_images, train_labels, test_images, test_labels, num_classes)``."""
    layout = CIFAR[name]
    folder = _cifar_folder(Path(root).expanduser(), layout, name)
    num_classes = len(_unpickle(folder / layout.meta)[layout.names_key])
    train = _read_cifar_batches(folder, layout.train, layout.label_key)
    test = _read_cifar_batches(folder, layout.test, layout.label_key)
    return (*train, *test, num_classes)


# --- digits -----------------------------------------------------------------------------------

DIGITS_TEST_SIZE = 360


def load_digits_32(split_seed: int = 0):
    """scikit-learn's digits as uint8 ``[N, 1, 32, 32]`` and a fixed stratified split."""
    datasets = require("sklearn.datasets", "train", "--dataset digits")
    model_selection = require("sklearn.model_selection", "train", "--dataset digits")

    digits = datasets.load_digits()
    small = torch.from_numpy(digits.images).float()[:, None] / 16.0
    images = F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
    images = images.mul(255).round().clamp(0, 255).to(torch.uint8)
    labels = torch.from_numpy(digits.target).long()
    train_idx, test_idx = model_selection.train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_SIZE, random_state=split_seed,
        stratify=digits.target)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], 10


# --- ImageFolder ------------------------------------------------------------------------------

def _scan_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    samples = [(path, k) for k, name in enumerate(classes)
               for path in sorted((root / name).rglob("*"))
               if path.suffix.lower() in IMAGE_SUFFIXES]
    return classes, samples


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of an Inception-style crop: a random area
    fraction in ``scale`` and aspect ratio in ``ratio`` (log-uniform), as in ResNet."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    aspect = width / height
    w, h = width, height
    if aspect < ratio[0]:
        h = round(width / ratio[0])
    elif aspect > ratio[1]:
        w = round(height * ratio[1])
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_crop_box(width: int, height: int, size: int, resize: int) -> tuple[float, ...]:
    """The box that ``resize`` (shorter side) then a central ``size`` crop keeps."""
    side = min(width, height) * size / resize
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


class ImageFolderImages(Dataset):
    """ImageFolder tree read with Pillow; items are ``(image, label)``.

    Training: random-resized crop to ``size`` and a random flip; evaluation:
    shorter side to ``resize``, central ``size`` crop. ImageNet normalisation.
    """

    def __init__(self, root: Path, train: bool, size: int = 224, resize: int = 256,
                 flip: bool = True, seed: int = 0, classes: list[str] | None = None):
        require("PIL", "train", "--dataset imagenet (images read with Pillow)")
        self.root, self.train, self.size, self.resize = root, train, size, resize
        self.flip, self.seed = flip, seed
        self.classes, self.samples = _scan_image_folder(root)
        if classes is not None and self.classes != classes:
            raise ValueError(f"class folders of {root} differ from the training set's: "
                             f"{len(self.classes)} vs {len(classes)} classes")
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}/<class>/")
        self.mean = torch.tensor(IMAGENET_MEAN)
        self.std = torch.tensor(IMAGENET_STD)

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices: torch.Tensor) -> ImageFolderImages:
        other = copy.copy(self)
        other.samples = [self.samples[i] for i in indices.tolist()]
        return other

    def __getitem__(self, key: tuple[int, int]):
        from PIL import Image

        index, epoch = key
        path, label = self.samples[index]
        with Image.open(path) as raw:
            image = raw.convert("RGB")
        if self.train:
            rng = sample_rng(self.seed, epoch, index)
            box = random_resized_crop_box(*image.size, rng)
            image = image.resize((self.size, self.size), Image.BILINEAR, box=box)
            if self.flip and rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            box = center_crop_box(*image.size, self.size, self.resize)
            image = image.resize((self.size, self.size), Image.BILINEAR, box=box)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return _normalise(pixels, self.mean, self.std), label


def load_image_folder(root: str | Path, flip: bool, seed: int):
    root = Path(root).expanduser()
    missing = [str(root / split) for split in ("train", "val") if not (root / split).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"ImageNet not found under --data {str(root)!r}: expected an ImageFolder tree "
            f"{root}/train/<class>/<image> and {root}/val/<class>/<image>; missing: {', '.join(missing)}")
    train = ImageFolderImages(root / "train", train=True, flip=flip, seed=seed)
    test = ImageFolderImages(root / "val", train=False, classes=train.classes)
    return train, test, len(train.classes)


# --- samplers and loaders ---------------------------------------------------------------------

class ResumableSampler(DistributedSampler):
    """:class:`DistributedSampler` whose keys are ``(index, epoch)`` and which can
    start ``start`` samples into its shard of the epoch (a mid-epoch resume)."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self):
        return ((i, self.epoch) for i in itertools.islice(super().__iter__(), self.start, None))

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler):
    """Every ``num_replicas``-th sample from ``rank``, in order, no padding (evaluation)."""

    def __init__(self, size: int, num_replicas: int, rank: int):
        self.indices = range(rank, size, num_replicas)

    def __iter__(self):
        return ((i, 0) for i in self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class Data:
    train: Dataset
    test: Dataset
    num_classes: int
    channels: int


def load_data(config) -> Data:
    """The datasets a resolved :class:`~gunn_ext.train.config.TrainConfig` asks for."""
    flip = config.augment and config.flip
    if config.dataset == "imagenet":
        train, test, num_classes = load_image_folder(config.data, flip, config.seed)
        channels = 3
    else:
        if config.dataset == "digits":
            x_train, y_train, x_test, y_test, num_classes = load_digits_32()
        else:
            x_train, y_train, x_test, y_test, num_classes = load_cifar(config.dataset, config.data)
        mean, std = channel_stats(x_train)
        padding = 4 if config.augment else 0
        train = InMemoryImages(x_train, y_train, mean, std, padding, flip, config.seed)
        test = InMemoryImages(x_test, y_test, mean, std)
        channels = x_train.shape[1]
    if config.train_samples is not None and config.train_samples < len(train):
        chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))
        train = train.subset(chosen[:config.train_samples].sort().values)
    return Data(train, test, num_classes, channels)


def _ignore_interrupts(_worker_id: int) -> None:
    """Workers leave SIGINT/SIGTERM to the main process, which stops after its step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset: Dataset, sampler: Sampler, batch_size: int, workers: int,
                pin_memory: bool, drop_last: bool, seed: int = 0) -> DataLoader:
    """A loader with its own generator, so creating it draws nothing from the global RNG."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=_ignore_interrupts if workers else None)
