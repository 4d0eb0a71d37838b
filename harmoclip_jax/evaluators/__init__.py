"""Evaluator plugins, named by `type` in `config.evals.<name>`.

An evaluator is built as `EVALUATORS[type](name, eval_config, context)` and `run(params)` returns
`{metric: float}`; the trainer logs them as `eval/<name>/<metric>`.
"""
from harmoclip_jax.evaluators.box_classification import BoxClassificationEvaluator, box_classification_metrics
from harmoclip_jax.evaluators.common import EvalContext, EvalFns
from harmoclip_jax.evaluators.retrieval import RetrievalEvaluator, retrieval_metrics
from harmoclip_jax.evaluators.segmentation import SegmentationEvaluator, confusion_matrix, segmentation_metrics

EVALUATORS = {"retrieval": RetrievalEvaluator, "box_classification": BoxClassificationEvaluator,
              "segmentation": SegmentationEvaluator}


def build(name: str, eval_config, context: EvalContext):
    """The evaluator for `config.evals[name]`."""
    if eval_config.type not in EVALUATORS:
        raise ValueError(f"config.evals.{name}.type={eval_config.type!r}; known: {sorted(EVALUATORS)}")
    return EVALUATORS[eval_config.type](name, eval_config, context)


__all__ = ["EVALUATORS", "EvalContext", "EvalFns", "build", "box_classification_metrics", "retrieval_metrics",
           "confusion_matrix", "segmentation_metrics", "BoxClassificationEvaluator", "RetrievalEvaluator",
           "SegmentationEvaluator"]
