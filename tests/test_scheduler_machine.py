"""The scheduler state machine (conformance/scheduler_machine.py) run against fast's scheduler."""

from hypothesis import settings

from conformance.scheduler_machine import SchedulerMachine

TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(settings(), stateful_step_count=40)
