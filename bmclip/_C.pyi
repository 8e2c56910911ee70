"""Type stubs for the compiled extension bmclip._C (built from csrc/; see csrc/README.md)."""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

class TarIndex:
    """Index of a webdataset tar shard (memory-mapped, read-only)."""

    def __init__(self, path: str) -> None: ...
    def __len__(self) -> int: ...
    def keys(self) -> list[str]: ...
    def key(self, i: int) -> str: ...
    def sample(self, i: int) -> dict[str, tuple[int, int]]: ...
    def samples(self) -> list[tuple[str, dict[str, tuple[int, int]]]]: ...
    def member_table(
        self,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], list[str]]: ...
    def read(self, offset: int, size: int) -> npt.NDArray[np.uint8]: ...
    @property
    def errors(self) -> list[str]: ...
    @property
    def truncated(self) -> bool: ...
    @property
    def dropped(self) -> int: ...
    @property
    def skipped_members(self) -> int: ...
    @property
    def path(self) -> str: ...
    @property
    def file_size(self) -> int: ...

class Decoder:
    """Persistent C++ thread pool decoding JPEG/PNG into uint8 NHWC batches."""

    def __init__(self, num_threads: int = 1, max_pixels: int = 178956970) -> None: ...
    @property
    def num_threads(self) -> int: ...
    @property
    def max_pixels(self) -> int: ...
    def decode_batch(
        self,
        buffers: Sequence[Buffer],
        out: npt.NDArray[np.uint8],
        *,
        augment: str = "random_resized_crop",
        seed: int = 0,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (0.75, 4 / 3),
        interpolation: str = "bicubic",
        dct_scaling: bool = True,
        dct_min_ratio: float = 2.0,
    ) -> list[str | None]: ...
    def decode_fit(
        self,
        buffer: Buffer,
        width: int,
        height: int,
        *,
        interpolation: str = "bilinear",
        dct_scaling: bool = True,
        dct_min_ratio: float = 1.0,
    ) -> npt.NDArray[np.uint8]: ...
    def decode_image(self, buffer: Buffer) -> npt.NDArray[np.uint8]: ...

def image_info(buffer: Buffer) -> tuple[int, int, str]: ...
def crop_box(
    width: int,
    height: int,
    size: int,
    seed: int,
    index: int,
    augment: str = "random_resized_crop",
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (0.75, 4 / 3),
) -> tuple[tuple[int, int, int, int], tuple[int, int], tuple[int, int]]: ...
def _set_simd(enabled: bool) -> None: ...
def _simd() -> bool: ...
