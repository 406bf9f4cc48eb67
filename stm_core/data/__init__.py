"""Datasets for training and evaluation: palette-mask I/O, video and image-set readers with
validation, the affine clip synthesizer, the real-video clip sampler and the built-in datasets.

Pure numpy / Pillow / scikit-image / torch: no Ray, MLflow or DVC here.
"""

from stm_core.data.augment import AffineRange, ColorJitter
from stm_core.data.builtin import BuiltinImagesConfig, write_builtin_images
from stm_core.data.builtin_videos import BuiltinVideosConfig, write_builtin_videos
from stm_core.data.clips import (
    SyntheticClipDataset,
    decode_clip,
    decode_clip_arrays,
    decode_clip_batch,
    encode_clip_row,
)
from stm_core.data.images import ImageMaskPair, StaticImageSet, read_image_mask_pairs
from stm_core.data.io import (
    DAVIS_PALETTE,
    DataError,
    decode_image,
    decode_index_mask_png,
    read_frame,
    read_image,
    read_index_mask,
    rgb_to_index_mask,
    write_image,
    write_index_mask,
)
from stm_core.data.sampler import (
    VideoClip,
    VideoClipDataset,
    VideoClipSampler,
    VideoSamplerConfig,
    max_skip_schedule,
    sample_positions,
)
from stm_core.data.synth import Clip, SynthConfig, clip_rng, synthesize_clip
from stm_core.data.video import (
    VideoSequence,
    davis_split,
    read_davis,
    read_frame_folder,
    read_youtube_vos,
    validate_sequence,
    validate_videos,
)

__all__ = [
    "DAVIS_PALETTE", "AffineRange", "BuiltinImagesConfig", "BuiltinVideosConfig", "Clip", "ColorJitter",
    "DataError", "ImageMaskPair", "StaticImageSet", "SynthConfig", "SyntheticClipDataset", "VideoClip",
    "VideoClipDataset", "VideoClipSampler", "VideoSamplerConfig", "VideoSequence", "clip_rng", "davis_split",
    "decode_clip", "decode_clip_arrays", "decode_clip_batch", "decode_image", "decode_index_mask_png",
    "encode_clip_row", "max_skip_schedule", "read_davis", "read_frame", "read_frame_folder", "read_image",
    "read_image_mask_pairs", "read_index_mask", "read_youtube_vos", "rgb_to_index_mask", "sample_positions",
    "synthesize_clip", "validate_sequence", "validate_videos", "write_builtin_images", "write_builtin_videos",
    "write_image", "write_index_mask",
]
