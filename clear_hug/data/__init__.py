"""ECG data pipeline: WFDB readers, preprocessing, multi-lead R-peak detection, heartbeat tokens, token caches."""

from .cache import (
                    ArraySource,
                    PathSource,
                    SyntheticSource,
                    TokenDataset,
                    build_cache,
                    long_synthetic_source,
                    pad_collate,
                    synthetic_source,
)
from .leads import LEADS, NUM_LEADS, lead_index, map_leads
from .preprocess import bandpass, flat_leads, preprocess, repair_nans, resample
from .readers import CinCFolderDataset, PTBXLDataset, RecordReadError, parse_header_comments, read_record
from .rpeaks import BEAT_SYMBOLS, detect_rpeaks, detection_scores, match_beats
from .tokenize import BeatTokens, NoBeatsError, tokenize_beats, tokenize_records

__all__ = [
    "LEADS", "NUM_LEADS", "lead_index", "map_leads",
    "CinCFolderDataset", "PTBXLDataset", "RecordReadError", "parse_header_comments", "read_record",
    "bandpass", "flat_leads", "preprocess", "repair_nans", "resample",
    "BEAT_SYMBOLS", "detect_rpeaks", "detection_scores", "match_beats",
    "BeatTokens", "NoBeatsError", "tokenize_beats", "tokenize_records",
    "ArraySource", "PathSource", "SyntheticSource", "TokenDataset", "build_cache", "synthetic_source",
    "long_synthetic_source", "pad_collate",
]
