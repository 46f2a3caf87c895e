"""The training app: ``convnn-train`` (:mod:`~convnn.train.app`) and ``convnn-profile``
(:mod:`~convnn.train.profile`), the config schema and its validation, the data modules, the
LightningModule, callbacks, loggers and the process settings of a job (allocator, warnings)."""
