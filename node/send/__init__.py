"""Delivering results: the outbox sender, the per-destination circuit breaker and C-ECHO.
"""
