"""The engine under the stages: one trainer, checkpoints, inference and the checks that two
artifacts belong together. Stage modules (:mod:`chx.pipeline`) import the engine, never each other.

- :mod:`chx.engine.distributed`   devices and torchrun process groups
- :mod:`chx.engine.trainer`       the training loop of every stage (resume, DDP, EMA, AMP), ``Stage``
- :mod:`chx.engine.run_folder`    a run's folder (config.json, metrics.jsonl, last.pt, best.pt, lock)
- :mod:`chx.engine.tensorboard`   TensorBoard scalars of a run (``--tensorboard``)
- :mod:`chx.engine.objective`     class prior, weighted ASL, sampler and baseline for one stage
- :mod:`chx.engine.inference`     THE feature computation, image and study prediction, flip TTA
- :mod:`chx.engine.joint`         a joint model's study probabilities from images
- :mod:`chx.engine.compat`        class lists and backbone fingerprints that must match
- :mod:`chx.engine.store_writer`  filling a store in whole shards (extract-features, cache-images)
- :mod:`chx.engine.predictor`     a bundle's models applied to a study's files; export folders, integrity
- :mod:`chx.engine.onnx_runtime`  a bundle's ONNX graphs and their ONNX Runtime predictor
- :mod:`chx.engine.attribution`   explanations: attention maps and shares, Grad-CAM, pointing scores
"""
