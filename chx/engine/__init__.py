"""The engine under the stages: one trainer, checkpoints, inference and the checks that two
artifacts belong together. Stage modules (:mod:`chx.pipeline`) import the engine, never each other.

- :mod:`chx.engine.distributed`  devices and torchrun process groups
- :mod:`chx.engine.trainer`      the training loop shared by both stages (resume, DDP, EMA, AMP)
- :mod:`chx.engine.objective`    class prior, weighted ASL, sampler and baseline for one stage
- :mod:`chx.engine.inference`    THE feature computation, image and study prediction, flip TTA
- :mod:`chx.engine.compat`       class lists and backbone fingerprints that must match
"""
