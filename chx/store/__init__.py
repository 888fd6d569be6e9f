"""The feature store: cached backbone feature maps of every image, ordered by study.

One interface, two backends chosen by the path: a Zarr v3 directory (default; a local path or any
fsspec URL such as ``memory://x``) or a single HDF5 file (a path ending ``.h5``/``.hdf5``). It knows
nothing of models: it stores feature maps, study metadata and a caller-given fingerprint.

Layout (format 2): ``features`` [n_images, C, H, W] (``features_flip`` too when created with
flip=True) stored as float16, bfloat16 bits or float8 e4m3 (+ a per-image, per-channel ``scale``),
read back as float16; images sorted by study, so study ``i`` is rows
``study_ptr[i]:study_ptr[i + 1]``; rows grouped into shards of ``shard_images`` consecutive rows,
each written whole by one writer and marked done (with CRC-32C checksums) in ``shard_done``; per
image ``image_id``, ``view``, ``split``; per study ``study_id`` and ``labels`` [n_studies, K]
float32 (NaN = not annotated); attributes ``format_version``, ``chx_feature_store``,
``class_names``, ``fingerprint``, ``feature_shape``, ``flip``, ``dtype``, ``shard_images``,
``checksum``, ``complete``; since issue 26 also ``integrity`` (1: each done record also holds a
CRC-32C per row and map array, and every checksum is bound to its place: fingerprint, index, image
ids; checked on every read), ``meta_crc`` (a checksum of each metadata array, checked at open) and,
HDF5, ``in_flight`` (the shard being written; checked on reopen). Stores without ``integrity`` are
read as before. Format 1 (older stores: one object per image, a ``done`` flag per
image, float16) is still opened and read; create_store reopens one for writing only when
format_version=1 is asked for (tests of older stores), so extract-features asks for --overwrite.

Readers use the public reads (``read_rows``, ``read_study``, ``read_shard``...), every row checked.
"""

from chx.store._api import backend_class, create_store, is_hdf5_path, open_store
from chx.store._buffer import ShardBuffer
from chx.store._base import FeatureStore
from chx.store._common import local_path, projected_size
from chx.store._read import StoredMaps, StudyFeatures
from chx.store._report import ShardProblem, VerifyReport
from chx.store._layout import FORMAT_VERSION, StoreSpec, fingerprint_diff, precision_option
from chx.store._codec import DTYPES, default_shard_images
from chx.store._codec import decode as decode_maps
from chx.store._remote import stopped_answering

__all__ = ["FeatureStore", "ShardBuffer", "StudyFeatures", "StoredMaps", "StoreSpec", "VerifyReport", "ShardProblem",
           "create_store", "open_store", "backend_class", "projected_size", "default_shard_images", "is_hdf5_path",
           "local_path", "FORMAT_VERSION", "DTYPES", "decode_maps", "fingerprint_diff", "precision_option",
           "stopped_answering"]
