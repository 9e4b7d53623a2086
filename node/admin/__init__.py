"""The admin HTTP server: dashboard, JSON API, health and Prometheus metrics.

:func:`node.admin.app.create_app` builds it; :mod:`node.admin.server` runs it in
``ainode serve``; :mod:`node.cli.ops` offers the same reads and actions at a terminal.
"""
