"""Every option of every command, declared once: its default, help, choices, bounds and flag form.

Plain dataclasses without torch or click, so `chx --help` stays fast. A field declared with
:func:`option` is a command-line option: the CLI builds its click option from the field
(``chx.cli.options.options``), a config file (``--config``) is checked against it, the stages take
these objects, and a run folder's config.json records them (the model card reads them back). A
field declared without :func:`option` is internal (not on the command line).

Adding an option is one step: a field with :func:`option` in the dataclass of its command.

The declarations live in three modules: :mod:`chx.options._declare` (:func:`option` and the shared
declarations), :mod:`chx.options.stages` (what the stages take) and :mod:`chx.options.commands` (each
command's inputs and outputs, and the other commands' options); every name is importable from here.
"""

from chx.options._declare import (AUGMENT_ON, BOOTSTRAP_RESAMPLES, DEFAULT_BACKBONE, GROUPS, HEADS, LOSSES,
                                  PRELOAD, RECORDED_ROOT, RESIZE_MODES, SHUFFLE_HELP, SOFT_TARGETS,
                                  SOFT_TARGETS_HELP, choices_of, option, option_fields, option_meta)
from chx.options.commands import (CacheImagesOptions, CompareOptions, DemoInputs, EXPORT_FORMATS,
                                  EnsembleOptions, EvaluateOptions, ExplainOptions, ExportOptions,
                                  ImportReferenceOptions, MakeDemoDataOptions, PredictOptions, PrepareOptions,
                                  PseudoLabelOptions, RunControl, TrainBackboneInputs, TrainFusionInputs,
                                  TrainJointInputs)
from chx.options.stages import (BackboneOptions, DemoConfig, ExtractInputs, ExtractOptions, FusionOptions,
                                ImagesCacheOption, JointOptions, TrainConfig, resume_rule)
from chx.store._codec import FEATURE_DTYPES as DTYPES   # feature maps' dtypes (torch-free; chx.store loads zarr)
