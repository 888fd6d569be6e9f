"""The feature store: cached backbone feature maps of every image, ordered by study.

One interface, two backends chosen by the path: a Zarr v3 directory (default; a local path or any
fsspec URL such as ``memory://x``) or a single HDF5 file (a path ending ``.h5``/``.hdf5``). It knows
nothing of models: it stores float16 arrays, study metadata and a caller-given fingerprint.

Layout: ``features`` [n_images, C, H, W] float16 (one chunk per image; ``features_flip`` too when
created with flip=True), images sorted by study so study ``i`` is rows
``study_ptr[i]:study_ptr[i + 1]``; per image ``image_id``, ``view``, ``split``, ``done``; per study
``study_id`` and ``labels`` [n_studies, K] float32 (NaN = not annotated); attributes
``format_version``, ``class_names``, ``fingerprint``, ``feature_shape``, ``flip``, ``complete``.
"""

from chx.store._api import create_store, is_hdf5_path, open_store
from chx.store._base import FORMAT_VERSION, VIEWS, FeatureStore, StudyFeatures, local_path, projected_size

__all__ = ["FeatureStore", "StudyFeatures", "create_store", "open_store", "projected_size", "is_hdf5_path",
           "local_path", "FORMAT_VERSION", "VIEWS"]
