"""The executor layer: runs a step's `SchedulerOutput` on the workers and returns rank 0's
`ModelRunnerOutput`. `uni`: one worker in this process; `mp`: one process per rank
(torch.distributed, gloo on CPU / NCCL on CUDA); `ray`: Ray actors, for more than one machine."""

from fast.executor.abstract import Executor, WorkerDiedError

__all__ = ["Executor", "WorkerDiedError"]
