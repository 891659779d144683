"""Notebooks 03-04, training: run YAMLs (`runconfig`), optimizers and schedules (`optim`), compiled
steps (`steps`), the loop (`loop`), training checkpoints (`checkpoints`), metrics (`metrics`, pure)
and msrun launching (`launch`)."""
