"""A job's container from start to end: the prolog's steps, the epilog and teardown,
leftovers of jobs whose epilog never ran, job-step adoption, the state teardown
needs, and the record the prolog publishes for shifter.
"""
