"""The dataset builder's settings: one dataclass, its validation, and the PMC-15M split fractions."""

from __future__ import annotations

from dataclasses import dataclass, fields

from bmclip.errors import ConfigError

__all__ = ["BuildOptions", "DEFAULT_TEST_FRACTION", "DEFAULT_VAL_FRACTION", "PMC15M_PAIRS", "SPLITS"]

# Split fractions default to PMC-15M's (BiomedCLIP paper: 13.9M train / 13.6k val / 725,739 test of
# 15,282,336 pairs).
PMC15M_PAIRS = 15_282_336
DEFAULT_VAL_FRACTION = 13_600 / PMC15M_PAIRS
DEFAULT_TEST_FRACTION = 725_739 / PMC15M_PAIRS
SPLITS = ("train", "val", "test")


@dataclass
class BuildOptions:
    """All builder settings. Stage-time ones are recorded in the staging plan; merge-time ones are not."""

    # stage time (changing them requires a fresh staging dir)
    max_side: int = 512
    jpeg_quality: int = 90
    jpeg_passthrough: bool = True  # JPEGs that already fit max_side are stored as is (media.process_image)
    min_side: int = 64
    max_aspect: float = 10.0
    max_pixels: int = 89_478_485
    min_caption_chars: int = 10
    # Longer captions are skipped (caption_too_long) before they are tokenized or stored. Real PMC captions
    # stay far below: the longest of the sample articles' 256 is 3,960 characters, long multi-panel legends
    # run to a few thousand words; 50k is also under the tokenizer's 64 KiB text budget.
    max_caption_chars: int = 50_000
    max_member_bytes: int = 256 << 20
    max_package_bytes: int = 16 << 30  # uncompressed; beyond it a package is refused (gzip bomb)
    chunk_size: int = 16
    subcaptions: bool = True
    use_gif: bool = False  # PMC's .gif files are ~100 px thumbnails of the real figure
    # merge time
    shard_size: int = 1000
    dedup: bool = True  # exact + near duplicate image removal
    near_dup_threshold: int = 7  # dHash Hamming radius of near-duplicate candidates (copies: <= 4 bits measured)
    near_dup_max_mad: float = 2.0  # decides: their 16x16 thumbnails' mean abs difference (grey levels)
    val_fraction: float = DEFAULT_VAL_FRACTION
    test_fraction: float = DEFAULT_TEST_FRACTION
    seed: int = 0

    STAGE_KEYS = (
        "max_side",
        "jpeg_quality",
        "jpeg_passthrough",
        "min_side",
        "max_aspect",
        "max_pixels",
        "min_caption_chars",
        "max_caption_chars",
        "max_member_bytes",
        "max_package_bytes",
        "chunk_size",
        "subcaptions",
        "use_gif",
    )

    def validate(self) -> None:
        """Raise ConfigError naming the first bad option."""
        if self.max_side < 16:
            raise ConfigError(f"max_side must be >= 16, got {self.max_side}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.min_side < 1 or self.max_aspect < 1 or self.max_pixels < 1:
            raise ConfigError("min_side, max_aspect and max_pixels must be positive (max_aspect >= 1)")
        if self.chunk_size < 1 or self.shard_size < 1:
            raise ConfigError("chunk_size and shard_size must be >= 1")
        if not (0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise ConfigError("val_fraction and test_fraction must be >= 0 with a sum < 1")
        if not -1 <= self.near_dup_threshold <= 31:
            raise ConfigError(f"near_dup_threshold must be in [-1, 31] (-1 disables near-duplicate removal), got "
                              f"{self.near_dup_threshold}")
        if self.near_dup_max_mad < 0:
            raise ConfigError(f"near_dup_max_mad must be >= 0, got {self.near_dup_max_mad}")
        if self.min_caption_chars < 0:
            raise ConfigError(f"min_caption_chars must be >= 0, got {self.min_caption_chars}")
        if self.max_caption_chars < 1:
            raise ConfigError(f"max_caption_chars must be >= 1, got {self.max_caption_chars}")

    def stage_dict(self) -> dict:
        """The stage-time options as a plain dict."""
        return {k: getattr(self, k) for k in self.STAGE_KEYS}

    @classmethod
    def stage_dict_of_plan(cls, recorded: dict) -> dict:
        """Stage-time options recorded in a staging plan, with the default filled in for each option that the
        version which wrote the plan did not have yet (e.g. ``max_caption_chars``): such a staging dir is
        taken as made with the default, so it resumes and merges under default options (and is refused,
        as any other difference, under another value)."""
        defaults = cls()
        return {**{k: getattr(defaults, k) for k in cls.STAGE_KEYS if k not in recorded}, **recorded}

    @classmethod
    def from_kwargs(cls, **kw) -> BuildOptions:
        """Options from keyword arguments; an unknown name is a ConfigError."""
        names = {f.name for f in fields(cls)}
        bad = sorted(set(kw) - names)
        if bad:
            raise ConfigError(f"unknown build option(s): {', '.join(bad)} (known: {', '.join(sorted(names))})")
        o = cls(**kw)
        o.validate()
        return o
