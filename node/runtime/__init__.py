"""The running service: serve, process supervision, the scheduler, logging, the clock, fault
injection and metrics.
"""
