"""The input pipeline: converted shards -> batches of paired HR/LR views (see ``pipeline``).

Modules: ``decode`` (shards -> decoded tiles, corrupt-record checks), ``augment`` and ``stain``
(stateless augmentation ops and presets), ``views`` (paired views of one tile), ``mixing``
(labeled/unlabeled ratio, class balance, subsets), ``pipeline`` (``PipelineConfig``,
``make_dataset``).
"""

from kd_histo.data.pipeline import (
    PipelineConfig,
    epoch_examples,
    lr_size,
    make_dataset,
    steps_per_epoch,
)

__all__ = ["PipelineConfig", "epoch_examples", "lr_size", "make_dataset", "steps_per_epoch"]
