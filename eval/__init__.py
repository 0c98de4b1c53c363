"""The evaluation harness (``unimoe.eval``): task specs, metrics, the batched runner and reports."""

from unimoe.eval.runner import TaskResult, evaluate
from unimoe.eval.tasks import TaskSpec, list_task_names, load_task_specs, resolve_tasks

__all__ = ["TaskResult", "TaskSpec", "evaluate", "list_task_names", "load_task_specs", "resolve_tasks"]
