"""KV-cache scales: the ``kvquant_scales.json`` sidecar, its checks, TP sharding, conversion
from other tools and the calibration math. Importing this package loads neither torch nor vLLM.
"""

from .calibration import (
    DEFAULT_FLOOR,
    AmaxRecorder,
    build_scales_file,
    combine_rank_stats,
    default_granularity,
    scales_from_amax,
)
from .convert import FORMATS as CONVERT_FORMATS
from .convert import convert_scales, convert_to_sidecar, detect_format
from .errors import (
    ScalesError,
    ScalesMismatchError,
    ScalesValidationError,
    ShardingError,
    SidecarNotFoundError,
)
from .fallback import FALLBACK_METHOD, resolve_scales, unit_scales
from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    CalibrationInfo,
    Granularity,
    KVCacheDType,
    LayerScales,
    ModelFacts,
    ScalesFile,
)
from .io import SCHEMA_PATH, SIDECAR_FILENAME, find_sidecar, load_schema, load_scales, save_scales
from .sharding import ShardedScales, kv_heads_for_rank, layer_scales_for_rank, scales_as_tensors, shard_scales
from .validate import parse_scales, validate_for_model, validate_json_dict, validate_scales

__all__ = [
    "AmaxRecorder",
    "CONVERT_FORMATS",
    "CalibrationInfo",
    "DEFAULT_FLOOR",
    "FALLBACK_METHOD",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Granularity",
    "KVCacheDType",
    "LayerScales",
    "ModelFacts",
    "SCHEMA_PATH",
    "SIDECAR_FILENAME",
    "ScalesError",
    "ScalesFile",
    "ScalesMismatchError",
    "ScalesValidationError",
    "ShardedScales",
    "ShardingError",
    "SidecarNotFoundError",
    "build_scales_file",
    "combine_rank_stats",
    "default_granularity",
    "convert_scales",
    "convert_to_sidecar",
    "detect_format",
    "find_sidecar",
    "kv_heads_for_rank",
    "layer_scales_for_rank",
    "load_schema",
    "load_scales",
    "parse_scales",
    "resolve_scales",
    "save_scales",
    "scales_as_tensors",
    "scales_from_amax",
    "shard_scales",
    "unit_scales",
    "validate_for_model",
    "validate_json_dict",
    "validate_scales",
]
