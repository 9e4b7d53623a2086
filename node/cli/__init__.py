"""The ``ainode`` command line: ``main`` (serve, worker, config, models) and ``ops`` (status,
jobs, studies, destinations).
"""
