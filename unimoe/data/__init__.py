"""The offline benchmark suite: task builders, the chat-JSONL record format and split readers."""

from unimoe.data.build import DATA_BUILDERS, DataError, TaskCard, build_suite, build_task, list_tasks, task_dir
from unimoe.data.records import prompt_messages, read_split, write_jsonl

__all__ = [
    "DATA_BUILDERS",
    "DataError",
    "TaskCard",
    "build_suite",
    "build_task",
    "list_tasks",
    "prompt_messages",
    "read_split",
    "task_dir",
    "write_jsonl",
]
