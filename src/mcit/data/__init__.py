"""Task data: one on-disk format (LLaVA conversation JSON + images) for every benchmark."""

from mcit.data.benchmark import Benchmark, TaskSpec, load_benchmark
from mcit.data.format import Sample, load_task_file

__all__ = ["Benchmark", "TaskSpec", "Sample", "load_benchmark", "load_task_file"]
