from provq_lightning.callbacks.curriculum import CurriculumCallback
from provq_lightning.callbacks.metrics_json import MetricsJsonCallback

__all__ = ["CurriculumCallback", "MetricsJsonCallback"]
