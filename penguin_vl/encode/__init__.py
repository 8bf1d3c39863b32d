"""Feature extraction at scale: image files, clips and videos in, safetensors features out (``penguin-vl encode``).

One job per module:

- :mod:`~penguin_vl.encode.inputs`: what the arguments name (files, directories, globs, clips), expanded
  into a deterministic list, shared among ranks (:func:`shard`), and read into pixels (:func:`read`);
- :mod:`~penguin_vl.encode.pipeline`: read and preprocess in a thread pool, pack into varlen batches,
  run the encoder, hand each input's features to the sink (:func:`encode`);
- :mod:`~penguin_vl.encode.sinks`: one file for the run or one per input, written atomically, the
  metadata of what produced them and the run index (:func:`merge_index`);
- :mod:`~penguin_vl.encode.checkpoints`: ``--model`` resolved and loaded, the preprocessor of a
  checkpoint, and random-weight checkpoints in the released layout (:func:`init_checkpoint`);
- :mod:`~penguin_vl.encode.progress`: the progress line.

Under ``torchrun`` (``RANK`` / ``WORLD_SIZE``), every rank collects the same input list, takes the inputs
``i`` with ``i % world_size == rank``, and writes its own part; no process group is needed (see
:mod:`~penguin_vl.encode.sinks`).
"""

from penguin_vl.encode.checkpoints import (
    RANDOM,
    RANDOM_LLM_HIDDEN,
    TINY_CONFIG,
    TINY_LLM_HIDDEN,
    init_checkpoint,
    load_model,
    make_processor,
    resolve_model,
)
from penguin_vl.encode.files import OutputError
from penguin_vl.encode.inputs import Input, InputError, VideoOptions, collect_inputs, read, shard
from penguin_vl.encode.pipeline import Prepared, Summary, encode, prepare
from penguin_vl.encode.progress import Progress
from penguin_vl.encode.sinks import (
    FORMAT,
    INDEX_FORMAT,
    SAME_OUTPUT,
    DirSink,
    FileSink,
    RunInfo,
    Sink,
    files_fingerprint,
    index_path,
    merge_index,
    package_version,
    part_path,
    run_digest,
    run_metadata,
    source_stamp,
)
from penguin_vl.hub import ModelNotFoundError, hub_cache_dir

__all__ = [
    "FORMAT",
    "INDEX_FORMAT",
    "RANDOM",
    "RANDOM_LLM_HIDDEN",
    "SAME_OUTPUT",
    "TINY_CONFIG",
    "TINY_LLM_HIDDEN",
    "DirSink",
    "FileSink",
    "Input",
    "InputError",
    "ModelNotFoundError",
    "OutputError",
    "Prepared",
    "Progress",
    "RunInfo",
    "Sink",
    "Summary",
    "VideoOptions",
    "collect_inputs",
    "encode",
    "files_fingerprint",
    "hub_cache_dir",
    "index_path",
    "init_checkpoint",
    "load_model",
    "make_processor",
    "merge_index",
    "package_version",
    "part_path",
    "prepare",
    "read",
    "resolve_model",
    "run_digest",
    "run_metadata",
    "shard",
    "source_stamp",
]
