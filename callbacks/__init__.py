from callbacks.curriculum import CurriculumCallback
from callbacks.metrics_json import MetricsJsonCallback

__all__ = ["CurriculumCallback", "MetricsJsonCallback"]
